"""`cm3leon sft`: the task mixture, its token documents, the start from pretrained parameters."""

import json
import os

import jax
import numpy as np
import pytest
from flax import nnx

from cm3leon_jax import cli, configs
from cm3leon_jax.data import records, sft_data, shapes, tasks
from cm3leon_jax.errors import InputError
from cm3leon_jax.paths import artifacts
from cm3leon_jax.tokenizers.text import TextTokenizer
from cm3leon_jax.tokenizers.vocab import ImageSegment, TextSegment, Vocab
from cm3leon_jax.tokenizers.vq import ImageTokenizer, VQModel
from cm3leon_jax.train import sft, trainer
from cm3leon_jax.train.mesh import make_mesh
from cm3leon_jax.train.state import init_train_state
from tests.eval_fixtures import random_module


# --- the mixture -----------------------------------------------------------------------------

def test_equal_task_sizes_get_equal_weights():
  assert sft.balance_weights([500, 500, 500, 500], 3.0, 0.3) == pytest.approx([0.25] * 4)


def test_balancing_clips_the_scaling_at_the_thresholds():
  # shares 1/12, 1/12, 10/12; towards 1/3: factors 4 -> 3 (clipped), 4 -> 3, 0.4;
  # weights 0.25, 0.25, 0.333 -> normalised 0.3, 0.3, 0.4.
  assert sft.balance_weights([100, 100, 1000], 3.0, 0.3) == pytest.approx([0.3, 0.3, 0.4])
  # without clipping (thresholds wide open) every task gets the equal share
  assert sft.balance_weights([100, 100, 1000], 100.0, 0.01) == pytest.approx([1 / 3] * 3)


def test_a_task_with_no_records_is_an_error():
  with pytest.raises(InputError, match="needs >= 1 record"):
    sft.balance_weights([10, 0], 3.0, 0.3)


def test_task_list_is_checked():
  assert sft_data.parse_tasks(" vqa, edit ") == ("vqa", "edit")
  with pytest.raises(InputError, match="unknown \\['vqa2'\\]"):
    sft_data.parse_tasks("vqa2,edit")
  with pytest.raises(InputError, match="is empty"):
    sft_data.parse_tasks(" , ")
  with pytest.raises(InputError, match="names a task twice"):
    sft_data.parse_tasks("vqa,vqa")


@pytest.mark.parametrize("field,value", [("balance_down", "0.0"), ("balance_up", "0.5"),
                                         ("steps", "0"), ("peak_lr", "0.0"),
                                         ("records_per_task", "0"), ("pretrain_weight", "-1.0")])
def test_bad_sft_fields_are_config_errors(field, value):
  with pytest.raises(InputError, match=f"--config.sft.{field}"):
    configs.load("tiny", [f"sft.{field}={value}"])


def test_sft_config_takes_the_schedule_from_sft_and_leaves_the_original():
  config = configs.load("tiny", ["sft.steps=7", "sft.peak_lr=2e-4", "sft.warmup_steps=3"])
  c = sft.sft_config(config)
  assert (c.train.steps, c.optimizer.peak_lr, c.optimizer.warmup_steps) == (7, 2e-4, 3)
  assert (c.train.eval_every, c.train.checkpoint_every) == (2, 2)  # tiny's sft values
  assert (config.train.steps, config.optimizer.peak_lr) == (20, 3e-3)


# --- the token documents ---------------------------------------------------------------------

@pytest.fixture(scope="module")
def tokenizers():
  config = configs.load("tiny")
  texts = [shapes.caption(shapes.scene_at(0, i, "train"), i) for i in range(100)]
  texts += [t for r in tasks.task_records("train", 90, 16) for t in r.segments
            if isinstance(t, str)]
  text = TextTokenizer.train(texts, config.vocab.text_size, min_frequency=1)
  image = ImageTokenizer(random_module(config, lambda: VQModel(config.vq, rngs=nnx.Rngs(1)), 1),
                         make_mesh(config.mesh))
  return text, image


def build(config, tokenizers, task="vqa", split="train", count=5):
  text, image = tokenizers
  return sft_data.build(config, task, split, count, text, image, text_tokenizer_id="t",
                        vq_id="v")


def stored_documents(directory, vocab):
  import array_record.python.array_record_data_source as ards
  source = ards.ArrayRecordDataSource(records.shard_paths(directory))
  out = []
  for i in range(len(source)):
    doc_id, ids = records.decode_tokens(source[i])
    assert doc_id == i
    out.append(vocab.ids_to_documents(np.concatenate([[vocab.eos_id], ids]))[0])
  return out


def test_task_records_become_token_documents_in_the_template_order(tmp_path, tokenizers):
  config = configs.load("tiny", [f"workdir={tmp_path}"])
  text, image = tokenizers
  vocab = Vocab.from_config(config)
  directory = build(config, tokenizers, "vqa", "train", 5)
  assert directory == os.path.join(str(tmp_path), "sft_tokens", "vqa")
  docs = stored_documents(directory, vocab)
  assert len(docs) == 5
  for i, doc in enumerate(docs):
    record = tasks.make_task("vqa", 0, i, "train", 16, 3)
    picture, words = record.segments
    assert doc == [ImageSegment(image.encode(picture[None])[0]),
                   TextSegment(text.encode(words))]
    assert text.decode(doc[1].tokens).startswith("Question: ")


def test_eval_records_come_from_eval_scenes(tmp_path, tokenizers):
  config = configs.load("tiny", [f"workdir={tmp_path}"])
  text, _ = tokenizers
  directory = build(config, tokenizers, "image_caption", "eval", 3)
  assert directory.endswith("image_caption-eval")
  docs = stored_documents(directory, Vocab.from_config(config))
  want = tasks.make_task("image_caption", 0, 2, "eval", 16, 3).segments[1]
  assert text.decode(docs[2][1].tokens) == text.decode(text.encode(want))


def test_a_built_task_is_reused_and_a_changed_job_rebuilds_it(tmp_path, tokenizers):
  config = configs.load("tiny", [f"workdir={tmp_path}"])
  directory = build(config, tokenizers, "edit", "train", 4)
  meta = os.path.join(directory, records.META)
  before = os.stat(meta).st_mtime_ns
  build(config, tokenizers, "edit", "train", 4)
  assert os.stat(meta).st_mtime_ns == before  # same job: not rewritten
  build(config, tokenizers, "edit", "train", 6)
  assert records.read_meta(directory)["num_records"] == 6


# --- starting from the pretrained decoder -----------------------------------------------------

def test_a_fresh_optimizer_is_exactly_a_new_init():
  config = configs.load("tiny")
  mesh = make_mesh(config.mesh)
  fresh = init_train_state(config, mesh)
  used = init_train_state(config, mesh)
  pure = nnx.to_pure_dict(used.state)
  pure[1] = jax.tree.map(lambda x: x + 1, pure[1])  # as after some updates
  nnx.replace_by_pure_dict(used.state, pure)
  got = nnx.to_pure_dict(trainer.fresh_optimizer(used.state))[1]
  want = nnx.to_pure_dict(fresh.state)[1]
  jax.tree.map(np.testing.assert_array_equal, got, want)


def test_pretrained_state_takes_the_checkpoints_parameters(tmp_path):
  config = configs.load("tiny", [f"workdir={tmp_path}", "train.steps=2", "model.num_layers=1"])
  from cm3leon_jax.train.synthetic import synthetic_dataset
  result = trainer.train(config, iter(synthetic_dataset(config, 8, seed=0)), progress=False)
  mesh = make_mesh(config.mesh)
  ts = trainer.pretrained_state(config, mesh,
                                os.path.join(artifacts(config).decoder, "checkpoints"))
  got, trained = nnx.to_pure_dict(ts.state), nnx.to_pure_dict(result.state.state)
  jax.tree.map(np.testing.assert_array_equal, got[0], trained[0])
  assert all(float(np.abs(x).max()) == 0.0 for x in jax.tree.leaves(got[1]))


def test_pretrained_state_without_a_checkpoint_is_an_input_error(tmp_path):
  config = configs.load("tiny", [f"workdir={tmp_path}"])
  with pytest.raises(InputError, match="no checkpoint to start from"):
    trainer.pretrained_state(config, make_mesh(config.mesh), str(tmp_path / "nothing"))


def test_sft_before_pretraining_is_one_clear_error(tmp_path, capsys):
  code = cli.main(["sft", "--config", "tiny", f"--config.workdir={tmp_path}"])
  assert code == cli.EXIT_INPUT_ERROR
  assert "no pretrained decoder checkpoint" in capsys.readouterr().err


def test_an_unknown_sft_task_fails_before_anything_loads(tmp_path, capsys):
  code = cli.main(["sft", "--config", "tiny", f"--config.workdir={tmp_path}",
                   "--config.sft.tasks=vqa,dance"])
  assert code == cli.EXIT_INPUT_ERROR
  assert "unknown ['dance']" in capsys.readouterr().err


# --- the command end to end --------------------------------------------------------------------

@pytest.mark.slow
def test_sft_command_trains_from_the_pretrained_decoder_and_resumes(tmp_path, capsys):
  workdir = str(tmp_path / "run")
  common = ["--config", "tiny", f"--config.workdir={workdir}", "--config.retrieval.enabled=False",
            "--config.data.num_train=64", "--config.vq.steps=2", "--config.train.steps=2",
            "--config.sft.tasks=vqa,image_caption,seg_to_image"]
  for argv in (["data", "build", "shapes"], ["train-text-tokenizer"], ["train-vq"],
               ["train", "--synthetic", "--no-progress"]):
    assert cli.main([*argv, *common]) == 0, argv
  capsys.readouterr()
  assert cli.main(["sft", *common, "--no-progress", "--max-steps", "2"]) == 0
  out = capsys.readouterr().out
  assert "sft mixture: sft/vqa 0.333, sft/image_caption 0.333, sft/seg_to_image 0.333" in out
  assert "sft: step 2/4" in out
  paths = artifacts(configs.load("tiny", [f"workdir={workdir}"]))
  for task in ("vqa", "image_caption", "seg_to_image"):
    assert records.read_meta(os.path.join(paths.sft_tokens, task))["num_records"] == 16
    assert records.read_meta(os.path.join(paths.sft_tokens, f"{task}-eval"))["num_records"] == 8
  assert cli.main(["sft", *common, "--no-progress"]) == 0  # resumes at 2, ends at 4
  assert "sft: step 4/4" in capsys.readouterr().out
  assert sorted(os.listdir(os.path.join(paths.sft, "checkpoints"))) == ["2", "4"]
  with open(os.path.join(paths.sft, "metrics.jsonl")) as f:
    logged = [json.loads(line) for line in f]
  # held-out loss of the pretrained parameters (step 0), then every sft.eval_every = 2 steps
  assert [r["step"] for r in logged if "eval_loss" in r] == [0, 2, 4]
  # the instruction-tuned decoder answers questions through `cm3leon eval --decoder`
  assert cli.main(["eval", "--suite", "vqa", *common, "--decoder", paths.sft]) == 0
  assert os.path.isfile(os.path.join(paths.eval, "vqa-sft", "metrics.json"))

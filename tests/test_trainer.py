"""`cm3leon train` (cm3leon_jax/train/trainer.py, train_cli.py) on the project's data: token
documents + neighbours through the Grain pipeline, metrics, checkpoints, exact resume."""

import json
import os

import jax
import numpy as np
import pytest

from cm3leon_jax import cli, configs
from cm3leon_jax.configs.base import tokens_per_image
from cm3leon_jax.data import synthetic
from cm3leon_jax.paths import artifacts
from cm3leon_jax.tokenizers.vocab import Vocab
from cm3leon_jax.train.checkpoint import Checkpointer

OVERRIDES = ["--config.data.num_workers=0", "--config.train.steps=4",
             "--config.train.log_every=1", "--config.train.checkpoint_every=2",
             "--config.model.num_layers=1", "--config.model.seq_len=64"]


def write_project_data(workdir: str, eval_split: bool = False) -> None:
  """What `cm3leon encode` and `cm3leon retrieve` leave in a workdir (random contents)."""
  config = configs.load("tiny", [o[len("--config."):] for o in OVERRIDES])
  vocab, rng = Vocab.from_config(config), np.random.default_rng(0)
  paths = artifacts(configs.load("tiny", [f"workdir={workdir}"]))
  for suffix in ("", "-eval") if eval_split else ("",):
    docs = synthetic.random_documents(vocab, 40, tokens_per_image(config), rng, max_text=12)
    synthetic.write_token_documents(paths.tokens + suffix, vocab, docs)
    synthetic.write_neighbours(paths.neighbours + suffix, synthetic.random_neighbours(40, 4, rng))


def train(workdir, *extra):
  return cli.main(["train", "--config", "tiny", f"--config.workdir={workdir}", *OVERRIDES,
                   "--no-progress", *extra])


def final_params(workdir):
  config = configs.load("tiny", [f"workdir={workdir}"] + [o[9:] for o in OVERRIDES])
  from cm3leon_jax.train.mesh import make_mesh
  from cm3leon_jax.train.state import abstract_train_state
  from flax import nnx
  ckpt = Checkpointer(os.path.join(artifacts(config).decoder, "checkpoints"), config)
  state = ckpt.restore(abstract_train_state(config, make_mesh(config.mesh)))
  ckpt.close()
  return ckpt.all_steps(), jax.tree.map(np.asarray, nnx.to_pure_dict(state[0]))


def metrics(workdir):
  with open(os.path.join(workdir, "decoder", "metrics.jsonl")) as f:
    return [json.loads(line) for line in f]


def test_train_on_project_data_resumes_exactly(tmp_path, capsys):
  for name in ("straight", "resumed"):
    write_project_data(str(tmp_path / name))
  assert train(tmp_path / "straight") == 0
  assert train(tmp_path / "resumed", "--max-steps", "2") == 0
  assert train(tmp_path / "resumed") == 0  # picks up the model and the data position at 2
  assert "train: step 4/4" in capsys.readouterr().out

  straight, resumed = metrics(tmp_path / "straight"), metrics(tmp_path / "resumed")
  assert [m["step"] for m in straight] == [1, 2, 3, 4] == [m["step"] for m in resumed]
  for a, b in zip(straight, resumed):
    assert a["loss"] == pytest.approx(b["loss"], abs=1e-6)
  for key in ("loss", "text_loss", "image_loss", "z_loss", "grad_norm", "lr", "step_time_s",
              "tokens_per_s", "mfu", "tokens"):
    assert key in straight[-1], key
  assert straight[-1]["loss"] < straight[0]["loss"]

  steps_a, params_a = final_params(tmp_path / "straight")
  steps_b, params_b = final_params(tmp_path / "resumed")
  assert steps_a == steps_b == [2, 4]
  jax.tree.map(np.testing.assert_array_equal, params_a, params_b)
  assert os.listdir(tmp_path / "straight" / "decoder" / "tensorboard")


def test_missing_data_is_an_input_error(tmp_path, capsys):
  assert train(tmp_path) == 2
  assert capsys.readouterr().err.startswith("error: ")


def test_multi_process_flags_must_come_together(tmp_path, capsys):
  assert train(tmp_path, "--num-processes", "2") == 2
  assert "--process-id" in capsys.readouterr().err


def test_held_out_loss_is_logged_every_eval_every_steps_and_at_the_end(tmp_path):
  write_project_data(str(tmp_path), eval_split=True)
  assert train(tmp_path, "--config.train.eval_every=3", "--config.train.eval_batches=2") == 0
  logged = {m["step"]: m for m in metrics(tmp_path)}
  assert [s for s, m in logged.items() if "eval_loss" in m] == [3, 4]
  for key in ("eval_loss", "eval_text_loss", "eval_image_loss"):
    assert 0 < logged[4][key] < 20, key
  # The same fixed batches both times: the loss moves only because the model trained.
  assert logged[4]["eval_loss"] != logged[3]["eval_loss"]


def test_no_eval_split_trains_without_a_held_out_loss(tmp_path, capsys):
  write_project_data(str(tmp_path))
  assert train(tmp_path, "--config.train.eval_every=2") == 0
  assert not any("eval_loss" in m for m in metrics(tmp_path))
  assert "no held-out loss" in capsys.readouterr().err

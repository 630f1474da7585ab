"""`cm3leon train-vq`: the sharded train step, restarts inside it, resume, outputs, bad input."""

import json
import os

import jax
import numpy as np
import pytest
from flax import nnx

from cm3leon_jax import configs
from cm3leon_jax.errors import InputError
from cm3leon_jax.tokenizers import vq, vq_train


def _blocks(n, size=16, seed=0):
  """Flat-colour squares on a white background: a tiny Shapes-like training set."""
  rng = np.random.default_rng(seed)
  images = np.full((n, size, size, 3), 255, np.uint8)
  for img in images:
    y, x = rng.integers(0, size - 6, 2)
    img[y:y + 6, x:x + 6] = rng.integers(0, 256, 3)
  return list(images)


def _config(*overrides):
  return configs.load("tiny", ["data.dataset=image_text_folder", *overrides])


def test_train_step_lowers_the_loss_on_a_mesh_of_8():
  c = _config("vq.learning_rate=3e-3")
  model, opt, extras = vq_train.init_train_state(c, steps=40)
  graphdef, state = nnx.split((model, opt, extras))
  step = jax.jit(vq_train.make_train_step(graphdef, c.vq, use_gan=False), donate_argnums=0)
  from cm3leon_jax.train import mesh as mesh_lib
  mesh = mesh_lib.make_mesh(c.mesh)
  assert mesh.devices.size == 8
  images = np.stack(_blocks(16))
  batch = mesh_lib.global_batch({"x": images}, mesh)["x"]
  losses = []
  for i in range(40):
    state, m = step(state, batch, jax.random.key(i))
    losses.append(float(m["recon"]))
  assert losses[-1] < 0.5 * losses[0]


def test_dead_codes_are_restarted_during_training():
  c = _config()
  model, opt, extras = vq_train.init_train_state(c, steps=10)
  model.usage[...] = model.usage[...].at[:10].set(0.0)  # codes 0..9 look dead
  images = np.stack(_blocks(16))
  used = set(np.asarray(model.quantize(vq.to_float(images)).codes_BN).ravel().tolist())
  dead = [k for k in range(10) if k not in used]  # a code used in this batch revives
  before = np.asarray(model.codebook[...])
  graphdef, state = nnx.split((model, opt, extras))
  step = jax.jit(vq_train.make_train_step(graphdef, c.vq, use_gan=False))
  state, m = step(state, images, jax.random.key(0))
  after_model = nnx.merge(graphdef, state)[0]
  assert len(dead) >= 5 and int(m["restarted"]) == len(dead)
  moved = np.abs(np.asarray(after_model.codebook[...]) - before).max(axis=1)
  assert (moved[dead] > 0.1).all()  # moved onto encoder outputs
  assert (moved[10:] == 0).all()  # the first step's learning rate is 0: nothing else moves
  np.testing.assert_allclose(np.asarray(after_model.usage[...])[dead], 1 / c.vq.codebook_size)


def test_gan_step_trains_the_discriminator():
  c = _config("vq.gan_weight=0.1", "vq.gan_start_step=0")
  model, opt, extras = vq_train.init_train_state(c, steps=5)
  assert extras  # a discriminator and its optimiser
  graphdef, state = nnx.split((model, opt, extras))
  step = jax.jit(vq_train.make_train_step(graphdef, c.vq, use_gan=True))
  before = jax.tree.leaves(nnx.state(extras[0]))
  for i in range(2):  # the warm-up's first learning rate is 0
    state, m = step(state, np.stack(_blocks(16)), jax.random.key(i))
  after = jax.tree.leaves(nnx.state(nnx.merge(graphdef, state)[2][0]))
  assert {"gan_g", "gan_d"} <= set(m)
  assert any(not np.allclose(a, b) for a, b in zip(before, after))


# Three short runs (one compile each): the slow tests below share them.
@pytest.fixture(scope="module")
def trained(tmp_path_factory):
  """4 steps in one go, and 4 steps stopped after 1 (a zero time budget) then resumed."""
  root = tmp_path_factory.mktemp("vq")
  c = _config()
  data, held_out = _blocks(64), _blocks(16, seed=1)
  whole = vq_train.train(c, data, held_out, str(root / "whole"), steps=4, log_every=2,
                         checkpoint_every=100, num_eval_images=16, progress=False)
  stopped = vq_train.train(c, data, held_out, str(root / "split"), steps=4, max_minutes=0,
                           log_every=2, num_eval_images=16, progress=False)
  assert stopped["step"] == 1
  resumed = vq_train.train(c, data, held_out, str(root / "split"), steps=4, log_every=2,
                           num_eval_images=16, progress=False)
  return c, root, whole, resumed


@pytest.mark.slow
def test_resumed_run_matches_an_uninterrupted_one(trained):
  c, root, whole, resumed = trained
  a, step_a = vq.restore_model(str(root / "whole"), c.vq)
  b, step_b = vq.restore_model(str(root / "split"), c.vq)
  assert step_a == step_b == 4
  for x, y in zip(jax.tree.leaves(nnx.state(a)), jax.tree.leaves(nnx.state(b))):
    np.testing.assert_allclose(x, y, rtol=1e-6, atol=1e-7)
  assert resumed["eval_psnr"] == pytest.approx(whole["eval_psnr"], abs=1e-3)


@pytest.mark.slow
def test_writes_metrics_checkpoints_and_a_picture(trained):
  c, root, whole, _ = trained
  rows = [json.loads(l) for l in open(root / "whole" / "metrics.jsonl")]
  assert [r["step"] for r in rows] == [2, 4, 4]
  assert {"loss", "recon", "commit", "codebook", "psnr", "batch_usage",
          "batch_perplexity"} <= set(rows[0])
  assert rows[-1]["final"] and {"eval_psnr", "eval_usage", "eval_perplexity"} <= set(rows[-1])
  assert 0 < whole["eval_usage"] <= 1 and 1 <= whole["eval_perplexity"] <= 64
  assert os.path.isfile(root / "whole" / "recon-000004.png")
  from PIL import Image
  assert Image.open(root / "whole" / "recon-000004.png").size == (16 * 128, 2 * 128)


@pytest.mark.slow
def test_tokenizer_loads_from_the_trainer_output(trained):
  c, root, _, _ = trained
  tok = vq.ImageTokenizer.load(c, str(root / "whole"))
  assert tok.checkpoint_step == 4
  assert tok.encode(np.stack(_blocks(2))).shape == (2, 16)


@pytest.mark.slow
def test_another_architecture_cannot_resume_or_load_a_checkpoint(trained):
  _, root, _, _ = trained
  other = _config("vq.codebook_size=32")
  with pytest.raises(InputError, match="vq.codebook_size: checkpoint 64, config 32"):
    vq.ImageTokenizer.load(other, str(root / "whole"))
  with pytest.raises(InputError, match="vq.codebook_size"):
    vq_train.train(other, _blocks(16), _blocks(4), str(root / "whole"), steps=1, progress=False)


def test_batch_must_divide_over_the_mesh(tmp_path):
  with pytest.raises(InputError, match="vq.batch_size=12"):
    vq_train.train(_config("vq.batch_size=12"), _blocks(16), _blocks(4), str(tmp_path),
                   steps=1, progress=False)


def test_missing_checkpoint_is_a_clear_error(tmp_path):
  with pytest.raises(InputError, match="run `cm3leon train-vq` first"):
    vq.ImageTokenizer.load(_config(), str(tmp_path))


def test_analyzer_scores_catch_a_lost_background():
  from cm3leon_jax.data import shapes
  scenes = [shapes.scene_at(0, i) for i in range(4)]
  originals = np.stack([shapes.render(s, 32) for s in scenes])
  assert {s.background for s in scenes} != {"grey"}
  greyed = np.stack([shapes.render(shapes.Scene(s.objects, "grey"), 32) for s in scenes])
  scores = vq_train.analyzer_scores(originals, greyed)
  assert scores["analyzer_all"] == 1.0  # every object survives
  assert scores["analyzer_background"] == np.mean([s.background == "grey" for s in scenes])
  assert vq_train.analyzer_scores(originals, originals)["analyzer_background"] == 1.0


def test_negative_warmup_is_a_config_error():
  with pytest.raises(InputError, match="vq.warmup_steps"):
    configs.load("tiny", ["--config.vq.warmup_steps=-5"])


def test_warmup_steps_sets_the_schedule():
  config = configs.load("tiny", ["--config.vq.warmup_steps=7", "--config.vq.learning_rate=1.0"])
  opt = vq_train.make_optimizer(config.vq, steps=100)
  params = {"w": np.zeros(3, np.float32)}
  state, moved = opt.init(params), []
  for _ in range(8):
    # A constant gradient: each Adam step moves a weight by the current learning rate.
    updates, state = opt.update({"w": np.ones(3, np.float32)}, state, params)
    moved.append(-float(updates["w"][0]))
  # Linear from 0 to the peak over 7 steps, then the peak.
  np.testing.assert_allclose(moved, [0, 1 / 7, 2 / 7, 3 / 7, 4 / 7, 5 / 7, 6 / 7, 1], atol=1e-5)

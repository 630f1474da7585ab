"""The sharded train step (cm3leon_jax/train/): overfitting, mesh invariance, gradient
accumulation, the loss split, the schedule, and clear errors before compiling."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from cm3leon_jax import configs
from cm3leon_jax.errors import InputError
from cm3leon_jax.tokenizers.vocab import Vocab
from cm3leon_jax.train.mesh import global_batch, make_mesh
from cm3leon_jax.train.optimizer import schedule
from cm3leon_jax.train.state import abstract_train_state, init_train_state
from cm3leon_jax.train.step import check_batch_arrays, grads_fn, loss_sums, make_train_step
from cm3leon_jax.train.synthetic import synthetic_batch


def tiny(*overrides):
  return configs.load("tiny", list(overrides))


def run_steps(config, batch, steps, devices=None):
  """Train `steps` steps on one batch; returns (per-step metrics, final params as numpy)."""
  mesh = make_mesh(config.mesh, devices)
  ts = init_train_state(config, mesh)
  step = make_train_step(config, ts, mesh)
  state, history = ts.state, []
  with jax.set_mesh(mesh):
    for _ in range(steps):
      state, metrics = step(state, global_batch(batch, mesh))
      history.append({k: float(v) for k, v in metrics.items()})
  params = jax.tree.map(np.asarray, nnx.to_pure_dict(state[0]))
  return history, params, state


def test_overfits_one_batch():
  config = tiny("optimizer.peak_lr=1e-2", "optimizer.warmup_steps=5", "optimizer.decay=constant",
                "model.seq_len=64", "mesh.data=1")
  batch = synthetic_batch(config, 2, seed=0)
  history, _, _ = run_steps(config, batch, 60, jax.devices()[:1])
  first, last = history[0]["loss"], history[-1]["loss"]
  assert first > 0.9 * np.log(Vocab.from_config(config).size)  # starts near uniform
  assert last < 0.3, [round(h["loss"], 3) for h in history[::10]]
  lr = schedule(config.optimizer, config.train.steps)
  assert [h["lr"] for h in history[:6]] == pytest.approx([float(lr(i)) for i in range(6)])
  assert history[0]["lr"] == pytest.approx(1e-2 / 5) and history[5]["lr"] == pytest.approx(1e-2)
  assert all(h["grad_norm"] > 0 for h in history)


def test_same_loss_on_every_mesh_of_8_devices():
  batch = synthetic_batch(tiny(), 8, seed=1)
  results = {}
  for data, fsdp, tensor in [(1, 8, 1), (2, 4, 1), (2, 2, 2)]:
    config = tiny(f"mesh.data={data}", f"mesh.fsdp={fsdp}", f"mesh.tensor={tensor}")
    history, params, state = run_steps(config, batch, 1)
    results[(data, fsdp, tensor)] = (history, params)
    embed = state[0]["embed"][...]
    assert embed.sharding.spec == jax.sharding.PartitionSpec("tensor", "fsdp")
    assert embed.addressable_shards[0].data.shape == (512 // tensor, 64 // fsdp)
  (h0, p0), *others = results.values()
  for h, p in others:
    for a, b in zip(h0, h):
      assert a["loss"] == pytest.approx(b["loss"], abs=1e-5)
      assert a["grad_norm"] == pytest.approx(b["grad_norm"], rel=1e-4)
    # The first AdamW step moves each weight by about lr = 6e-4 (Adam normalises away the
    # gradient's scale, so float-rounding differences of tiny gradients show); agree to 1%.
    jax.tree.map(lambda x, y: np.testing.assert_allclose(x, y, atol=6e-6), p0, p)


def test_gradient_accumulation_over_4_microbatches_equals_one_big_batch():
  batch = synthetic_batch(tiny(), 8, seed=2)
  batch["weights"][0, :50] = 0  # uneven token counts per microbatch must not matter
  config = tiny("mesh.data=2")
  mesh = make_mesh(config.mesh, jax.devices()[:2])
  ts = init_train_state(config, mesh)
  model, _ = nnx.merge(ts.graphdef, ts.state)
  model_def, params = nnx.split(model, nnx.Param)
  results = []
  with jax.set_mesh(mesh):
    for accum in (1, 4):
      fn = grads_fn(tiny("mesh.data=2", f"train.grad_accum={accum}"), model_def)
      grads, sums = jax.jit(fn)(params, global_batch(batch, mesh))
      results.append((jax.tree.map(np.asarray, nnx.to_pure_dict(grads)),
                      {k: float(v) for k, v in sums.items()}))
  (g1, s1), (g4, s4) = results
  assert s1 == pytest.approx(s4, rel=1e-6)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-8), g1, g4)
  assert max(np.abs(g).max() for g in jax.tree.leaves(g1)) > 1e-3  # not trivially zero


def test_loss_is_split_by_target_modality():
  vocab = Vocab.from_config(tiny())
  text, image, eos = vocab.text_range[0], vocab.image_range[0], vocab.eos_id
  targets = jnp.array([[text, text + 1, image, eos]])
  weights = jnp.array([[1.0, 1.0, 1.0, 0.0]])
  logits = jnp.zeros((1, 4, vocab.size)).at[0, 0, text].set(np.log(3.0 * (vocab.size - 1)))
  sums = loss_sums(logits, targets, weights, vocab, z_loss=0.0)
  uniform = np.log(vocab.size)
  # Row 0 puts 3/4 of the mass on its target: -log(3/4); the others are uniform.
  assert float(sums["text_ce"]) == pytest.approx(-np.log(0.75) + uniform, rel=1e-5)
  assert float(sums["text_weight"]) == 2 and float(sums["image_weight"]) == 1
  assert float(sums["image_ce"]) == pytest.approx(uniform, rel=1e-5)
  assert float(sums["weight"]) == 3  # the weight-0 <eos> target counts nowhere


def test_z_loss_is_weight_times_log_z_squared():
  vocab = Vocab.from_config(tiny())
  logits = jnp.zeros((1, 2, vocab.size))
  sums = loss_sums(logits, jnp.array([[5, 6]]), jnp.array([[1.0, 0.0]]), vocab, z_loss=1e-4)
  assert float(sums["z"]) == pytest.approx(1e-4 * np.log(vocab.size) ** 2, rel=1e-5)


def test_warmup_then_cosine_schedule():
  config = tiny("optimizer.peak_lr=1e-3", "optimizer.warmup_steps=10",
                "optimizer.end_lr_ratio=0.1", "train.steps=110")
  lr = schedule(config.optimizer, config.train.steps)
  assert float(lr(0)) == pytest.approx(1e-4)
  assert float(lr(9)) == pytest.approx(1e-3)
  assert float(lr(60)) == pytest.approx(0.55e-3, rel=1e-4)  # half way down the cosine
  assert float(lr(110)) == pytest.approx(1e-4)


def test_mesh_that_does_not_divide_the_devices_is_an_input_error():
  with pytest.raises(InputError, match="mesh"):
    make_mesh(tiny("mesh.data=3").mesh)


def test_batch_not_divisible_by_data_axes_fails_before_compiling():
  config = tiny("train.batch_size=6", "mesh.data=4", "mesh.fsdp=2")
  mesh = make_mesh(config.mesh)
  with pytest.raises(InputError, match="train.batch_size=6"):
    make_train_step(config, abstract_train_state(config, mesh), mesh)


def test_grad_accum_not_dividing_the_per_device_batch_is_an_input_error():
  config = tiny("train.grad_accum=3", "mesh.data=8")
  mesh = make_mesh(config.mesh)
  with pytest.raises(InputError, match="train.grad_accum=3"):
    make_train_step(config, abstract_train_state(config, mesh), mesh)


def test_heads_not_divisible_by_the_tensor_axis_is_an_input_error():
  config = tiny("mesh.tensor=4", "mesh.data=2")
  with pytest.raises(InputError, match="model.num_heads=2"):
    init_train_state(config, make_mesh(config.mesh))


@pytest.mark.parametrize("change, message", [
    (lambda b: b.pop("positions"), "missing"),
    (lambda b: b.update(inputs=b["inputs"][:, :64]), "shape"),
    (lambda b: b.update(weights=b["weights"].astype(np.float64)), "dtype"),
])
def test_malformed_batches_are_input_errors(change, message):
  config = tiny()
  batch = synthetic_batch(config, 2, seed=0)
  change(batch)
  with pytest.raises(InputError, match=message):
    check_batch_arrays(batch, config)

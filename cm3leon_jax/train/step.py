"""The functional, jitted, sharded train step: loss, gradient accumulation, AdamW update.

    step = make_train_step(config, ts, mesh)
    with jax.set_mesh(mesh):
      state, metrics = step(state, batch)      # `state` is donated

Loss (REFERENCE.md section 2): next-token cross-entropy weighted by the batch's `weights`
(0 on padding, sentinel targets, segment boundaries), averaged over the weighted tokens of the
whole global batch; plus an optional z-loss `z_loss * log(Z)^2` (Chameleon). It is reported
for all targets and separately for text and image targets (by the vocabulary's ranges).

Gradient accumulation: the global batch is split into `train.grad_accum` microbatches run by
`lax.scan`; each contributes its loss *sum* divided by the weight of the whole batch, so the
accumulated gradient equals the one-big-batch gradient exactly (up to float rounding).
"""

from __future__ import annotations

from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from cm3leon_jax.errors import InputError
from cm3leon_jax.tokenizers.vocab import Vocab
from cm3leon_jax.train.mesh import BATCH_AXES, batch_divisor, batch_sharding, check_batch
from cm3leon_jax.train.optimizer import refit_of, schedule

BATCH_DTYPES = {"inputs": np.int32, "targets": np.int32, "weights": np.float32,
                "image_index": np.int32, "segment_ids": np.int32, "positions": np.int32}


def check_batch_arrays(batch: dict, config, batch_size: int | None = None) -> None:
  """InputError unless `batch` follows the batch contract ([B, seq_len] arrays, right dtypes)."""
  missing = sorted(set(BATCH_DTYPES) - set(batch))
  if missing:
    raise InputError(f"batch is missing {missing} (expected {sorted(BATCH_DTYPES)})")
  expected = (batch_size or batch["inputs"].shape[0], config.model.seq_len)
  for key, dtype in BATCH_DTYPES.items():
    array = batch[key]
    if tuple(array.shape) != expected:
      raise InputError(f"batch[{key!r}] has shape {tuple(array.shape)}, expected {expected} "
                       "(train.batch_size / processes, model.seq_len)")
    if np.dtype(array.dtype) != np.dtype(dtype):
      raise InputError(f"batch[{key!r}] has dtype {array.dtype}, expected {np.dtype(dtype)}")


def check_accumulation(config, mesh: Mesh) -> None:
  """Batch and microbatches must split evenly over the data x fsdp axes (clear error first)."""
  check_batch(config.train.batch_size, mesh)
  accum, per_device = config.train.grad_accum, config.train.batch_size // batch_divisor(mesh)
  if per_device % accum:
    raise InputError(f"--config.train.grad_accum={accum} does not divide the per-device batch "
                     f"({config.train.batch_size} sequences / {batch_divisor(mesh)} data x fsdp "
                     f"shards = {per_device})")


def loss_sums(logits_BLV, targets_BL, weights_BL, vocab: Vocab, z_loss: float,
              scores=None) -> dict:
  """Weighted sums (not means) of the loss terms and their token weights, float32.

  `scores`: (log_z_BL, target_logit_BL) computed without logits (`Decoder.
  log_z_and_target_logit`, colour-factorised codes); `logits_BLV` is then ignored."""
  if scores is None:
    logits_BLV = logits_BLV.astype(jnp.float32)
    log_z_BL = jax.nn.logsumexp(logits_BLV, axis=-1)
    # One-hot contraction rather than a gather: stays local when the vocab axis is sharded.
    target_logit_BL = jnp.einsum("BLV,BLV->BL", logits_BLV,
                                 jax.nn.one_hot(targets_BL, logits_BLV.shape[-1],
                                                dtype=logits_BLV.dtype))
  else:
    log_z_BL, target_logit_BL = scores
  ce_BL = log_z_BL - target_logit_BL
  w_BL = weights_BL.astype(jnp.float32)
  is_text = (targets_BL >= vocab.text_range[0]) & (targets_BL < vocab.text_range[1])
  is_image = (targets_BL >= vocab.image_range[0]) & (targets_BL < vocab.image_range[1])
  w_text, w_image = w_BL * is_text, w_BL * is_image
  return {
      "ce": jnp.sum(w_BL * ce_BL), "weight": jnp.sum(w_BL),
      "z": z_loss * jnp.sum(w_BL * jnp.square(log_z_BL)),
      "text_ce": jnp.sum(w_text * ce_BL), "text_weight": jnp.sum(w_text),
      "image_ce": jnp.sum(w_image * ce_BL), "image_weight": jnp.sum(w_image),
  }


def metrics_from_sums(sums: dict) -> dict:
  safe = lambda num, den: jnp.where(den > 0, num / jnp.maximum(den, 1e-9), 0.0)
  return {
      "loss": safe(sums["ce"], sums["weight"]),
      "text_loss": safe(sums["text_ce"], sums["text_weight"]),
      "image_loss": safe(sums["image_ce"], sums["image_weight"]),
      "z_loss": safe(sums["z"], sums["weight"]),
      "tokens": sums["weight"], "text_tokens": sums["text_weight"],
      "image_tokens": sums["image_weight"],
  }


def _microbatches(batch: dict, accum: int) -> dict:
  """[B, L] -> [accum, B/accum, L]; microbatch a takes rows a, a+accum, ... so every device's
  contiguous shard of rows contributes equally to each microbatch (no data movement)."""
  def split(x):
    B = x.shape[0]
    x = x.reshape(B // accum, accum, *x.shape[1:]).swapaxes(0, 1)
    return jax.lax.with_sharding_constraint(x, P(None, BATCH_AXES, *([None] * (x.ndim - 2))))
  return jax.tree.map(split, batch)


def _forward_sums(model_def, params, mb: dict, vocab: Vocab, z_loss: float) -> dict:
  model = nnx.merge(model_def, params)
  if model.cfg.image_colour_codes:  # the loss without the G x C image logits
    x_BLD = model.hidden(mb["inputs"], mb["positions"], mb["segment_ids"], mb["image_index"])
    scores = model.log_z_and_target_logit(x_BLD, mb["targets"])
    return loss_sums(None, mb["targets"], mb["weights"], vocab, z_loss, scores)
  logits_BLV = model(mb["inputs"], mb["positions"], mb["segment_ids"], mb["image_index"])
  return loss_sums(logits_BLV, mb["targets"], mb["weights"], vocab, z_loss)


def grads_fn(config, model_def) -> Callable:
  """`(params, batch) -> (grads, loss sums)` of the mean weighted loss over the whole batch,
  accumulated over `train.grad_accum` microbatches."""
  vocab = Vocab.from_config(config)
  accum, z_loss = int(config.train.grad_accum), float(config.model.z_loss)

  def grads_and_sums(params, batch):
    total_weight = jnp.maximum(jnp.sum(batch["weights"].astype(jnp.float32)), 1.0)

    def objective(params, mb):
      sums = _forward_sums(model_def, params, mb, vocab, z_loss)
      return (sums["ce"] + sums["z"]) / total_weight, sums

    grad_fn = jax.grad(objective, has_aux=True)
    if accum == 1:
      return grad_fn(params, batch)

    def body(carry, mb):
      return jax.tree.map(jnp.add, carry, grad_fn(params, mb)), None
    sums_shape = jax.eval_shape(lambda: _forward_sums(model_def, params, batch, vocab, z_loss))
    init = (jax.tree.map(jnp.zeros_like, params),
            jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), sums_shape))
    (grads, sums), _ = jax.lax.scan(body, init, _microbatches(batch, accum))
    return grads, sums

  return grads_and_sums


def train_step_fn(config, graphdef) -> Callable:
  """The pure step `(state, batch) -> (state, metrics)` (not jitted; see make_train_step)."""
  lr_at = schedule(config.optimizer, config.train.steps, refit_of(config.train))

  def step(state, batch):
    model, optimizer = nnx.merge(graphdef, state)
    model_def, params = nnx.split(model, nnx.Param)
    grads, sums = grads_fn(config, model_def)(params, batch)
    lr = lr_at(optimizer.step[...])
    grad_norm = optax.tree.norm(grads)  # before clipping
    optimizer.update(model, grads)
    metrics = dict(metrics_from_sums(sums), grad_norm=grad_norm, lr=lr)
    return nnx.state((model, optimizer)), metrics

  return step


def make_train_step(config, ts, mesh: Mesh) -> Callable:
  """jit of the step: state donated, in/out shardings from the train state, batch on data x fsdp.

  Call it (and `.lower(...)` it) under `jax.set_mesh(mesh)`: activation sharding
  constraints inside the model refer to the ambient mesh.
  """
  check_accumulation(config, mesh)
  replicated = NamedSharding(mesh, P())
  batch_shardings = {k: batch_sharding(mesh, 2) for k in BATCH_DTYPES}
  return jax.jit(train_step_fn(config, ts.graphdef), donate_argnums=0,
                 in_shardings=(ts.shardings, batch_shardings),
                 out_shardings=(ts.shardings, replicated))


def make_eval_step(config, ts, mesh: Mesh) -> Callable:
  """jit of `(state, batch) -> loss sums` (`loss_sums`) without an update: sums of several
  batches add up, and `metrics_from_sums` turns the total into token-weighted losses."""
  vocab = Vocab.from_config(config)
  z_loss = float(config.model.z_loss)

  def evaluate(state, batch):
    model, _ = nnx.merge(ts.graphdef, state)
    model_def, params = nnx.split(model, nnx.Param)
    return _forward_sums(model_def, params, batch, vocab, z_loss)

  batch_shardings = {k: batch_sharding(mesh, 2) for k in BATCH_DTYPES}
  return jax.jit(evaluate, in_shardings=(ts.shardings, batch_shardings),
                 out_shardings=NamedSharding(mesh, P()))

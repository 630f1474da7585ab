"""Teacher-forced scoring: the decoder's negative log-likelihood of given continuations.

    nll_B = continuation_nll(model, prompts, continuations)   # nats, one per row

What a probe needs to ask "which of these captions makes this image most likely" without
sampling (eval/binding.py). Rows are right-padded to the model's window, so one compiled
forward serves every batch of the same size.
"""

from __future__ import annotations

import functools
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from cm3leon_jax.errors import InputError


@functools.partial(jax.jit, static_argnames=("graphdef",))
def _token_nll(graphdef, params, ids_BL, segment_ids_BL, targets_BL, weights_BL):
  model = nnx.merge(graphdef, params)
  positions_BL = jnp.broadcast_to(jnp.arange(ids_BL.shape[1]), ids_BL.shape)
  # -log p(target) = log Z - the target's logit; with colour-factorised image codes without the
  # [B, L, V] logits (model/decoder.py), which doubled the quickstart's binding probe.
  x_BLD = model.hidden(ids_BL, positions_BL, segment_ids_BL)
  log_z_BL, target_BL = model.log_z_and_target_logit(x_BLD, targets_BL)
  return ((log_z_BL - target_BL) * weights_BL).sum(-1)


def continuation_nll(model, prompts: Sequence[np.ndarray], continuations: Sequence[np.ndarray],
                     batch_size: int = 16) -> np.ndarray:
  """Sum over the continuation's tokens of -log p(token | prompt, earlier tokens), per row.

  prompts[b], continuations[b]: 1-D global ids (the prompt starts with `<eos>`). float64 [B].
  """
  if len(prompts) != len(continuations):
    raise InputError(f"{len(prompts)} prompts but {len(continuations)} continuations")
  seq_len = int(model.cfg.seq_len)
  graphdef, params = nnx.split(model)
  out = np.zeros(len(prompts))
  for lo in range(0, len(prompts), batch_size):
    rows = range(lo, min(lo + batch_size, len(prompts)))
    ids = np.zeros((batch_size, seq_len), np.int32)
    targets, seg = np.zeros_like(ids), np.zeros_like(ids)
    weights = np.zeros(ids.shape, np.float32)
    for i, b in enumerate(rows):
      p, c = np.asarray(prompts[b], np.int32), np.asarray(continuations[b], np.int32)
      if len(p) == 0 or len(c) == 0:
        raise InputError(f"row {b}: an empty prompt or continuation")
      if len(p) + len(c) > seq_len:
        raise InputError(f"row {b}: {len(p)} prompt + {len(c)} continuation tokens exceed the "
                         f"model's {seq_len}-token window (model.seq_len)")
      full = np.concatenate([p, c])
      ids[i, :len(full)] = full
      seg[i, :len(full)] = 1
      # The logit at position t predicts token t + 1: continuation token j sits at len(p) + j.
      targets[i, len(p) - 1:len(full) - 1] = c
      weights[i, len(p) - 1:len(full) - 1] = 1.0
    nll = _token_nll(graphdef, params, jnp.asarray(ids), jnp.asarray(seg), jnp.asarray(targets),
                     jnp.asarray(weights))
    out[lo:lo + len(rows)] = np.asarray(nll)[:len(rows)]
  return out

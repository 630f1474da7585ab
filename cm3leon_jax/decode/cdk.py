"""Contrastive Decoding TopK (CD-K, REFERENCE.md section 5).

expert = the text-conditioned stream, amateur = the mask-conditioned stream;
score(t) = log p_exp(t) - log p_ama(t) for t in V, -inf outside, with
V = {t : p_exp(t) >= alpha * (k-th largest p_exp)}. (The original contrastive decoding used the
max instead of the k-th largest, which collapses to greedy on the expert.) One then samples from
softmax(score / temperature) over V.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

AMATEUR_FLOOR = -1e4


def cdk_scores(expert_BV: jax.Array, amateur_BV: jax.Array, k: int, alpha) -> jax.Array:
  log_exp = jax.nn.log_softmax(expert_BV.astype(jnp.float32), axis=-1)
  log_ama = jax.nn.log_softmax(amateur_BV.astype(jnp.float32), axis=-1)
  k = max(1, min(int(k), expert_BV.shape[-1]))
  kth_B1 = jax.lax.top_k(log_exp, k)[0][:, -1:]
  alpha = jnp.asarray(alpha, jnp.float32)
  alpha = alpha[:, None] if alpha.ndim == 1 else alpha
  # p_exp >= alpha * p_kth  <=>  log p_exp >= log alpha + log p_kth (alpha in (0, 1]).
  in_v = log_exp >= jnp.log(alpha) + kth_B1
  # A token the amateur forbids (-inf) but the expert allows would score +inf: floor the
  # amateur so the score stays finite (and largest) instead of poisoning the softmax.
  contrast = log_exp - jnp.maximum(log_ama, AMATEUR_FLOOR)
  return jnp.where(in_v & jnp.isfinite(log_exp), contrast, -jnp.inf)

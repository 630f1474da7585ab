"""Classifier-free guidance (REFERENCE.md section 5).

The unconditional stream is the same prompt with its text replaced by the CM3 mask token, so a
model trained with CM3 needs no extra training for it. Streams run in one batch; these functions
combine their log-probabilities `[B, V]` (log-softmax makes the guidance independent of each
stream's logit offset).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp


def cfg(cond_BV: jax.Array, uncond_BV: jax.Array, weight) -> jax.Array:
  """uncond + w * (cond - uncond): w = 1 is the conditional model, w = 0 the unconditional."""
  cond = jax.nn.log_softmax(cond_BV.astype(jnp.float32), axis=-1)
  uncond = jax.nn.log_softmax(uncond_BV.astype(jnp.float32), axis=-1)
  w = jnp.asarray(weight, jnp.float32)
  w = w[:, None] if w.ndim == 1 else w
  # Where a token is forbidden in both streams (-inf), keep -inf instead of nan.
  mixed = uncond + w * (cond - uncond)
  return jnp.where(jnp.isneginf(cond) & jnp.isneginf(uncond), -jnp.inf, mixed)


def cfg_two(uncond_BV: jax.Array, image_cond_BV: jax.Array, full_BV: jax.Array,
            image_weight, text_weight) -> jax.Array:
  """Editing guidance (InstructPix2Pix style, 3 streams):
  uncond + s_img * (image_cond - uncond) + s_txt * (full - image_cond)."""
  u, i, f = (jax.nn.log_softmax(x.astype(jnp.float32), axis=-1)
             for x in (uncond_BV, image_cond_BV, full_BV))
  mixed = u + image_weight * (i - u) + text_weight * (f - i)
  return jnp.where(jnp.isneginf(u) & jnp.isneginf(i) & jnp.isneginf(f), -jnp.inf, mixed)

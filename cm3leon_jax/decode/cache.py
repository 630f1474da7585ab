"""The static-shape KV cache and the cached forward pass of the decoder.

The cache holds every layer's keys and values, stacked on the same leading 'layers' axis as
the decoder's parameters, so the cached forward scans layers exactly like training does:

    k_NBSHK, v_NBSHK : [layers, batch, slots, heads, head_dim] (compute dtype)
    segment_ids_BS   : 1 for a written slot, 0 for empty / left padding (never attended)
    index_BS         : the slot's column, or a value past every query for empty slots

Prompts of different lengths are left-padded to one width P: every row writes slot t at step
t, padding slots carry segment id 0, and a row's position embedding index is its column minus
its padding. Decoding writes one slot per step. Shapes never change, so prefill and the
decode loop each compile once.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp

from cm3leon_jax.model import layers as L
from cm3leon_jax.model.decoder import Decoder

EMPTY_INDEX = jnp.iinfo(jnp.int32).max


class KVCache(NamedTuple):
  k_NBSHK: jax.Array
  v_NBSHK: jax.Array
  segment_ids_BS: jax.Array
  index_BS: jax.Array

  @property
  def size(self) -> int:
    return self.segment_ids_BS.shape[1]


CACHE_AXES = KVCache(("layers", "batch", "length", "heads", "kv"),
                     ("layers", "batch", "length", "heads", "kv"),
                     ("batch", "length"), ("batch", "length"))


def init_cache(model: Decoder, batch: int, size: int) -> KVCache:
  cfg = model.cfg
  shape = (cfg.num_layers, batch, size, cfg.num_heads, cfg.head_dim)
  zeros = jnp.zeros(shape, jnp.dtype(cfg.dtype))
  cache = KVCache(zeros, zeros, jnp.zeros((batch, size), jnp.int32),
                  jnp.full((batch, size), EMPTY_INDEX, jnp.int32))
  shard = model.shard
  return KVCache(*(shard(x, axes) for x, axes in zip(cache, CACHE_AXES)))


def forward_cached(model: Decoder, cache: KVCache, inputs_BT: jax.Array, positions_BT: jax.Array,
                   segment_ids_BT: jax.Array, start: jax.Array) -> tuple[jax.Array, KVCache]:
  """Run T new tokens (written to slots [start, start + T)) against the cache.

  Returns float32 logits [B, T, V] and the updated cache. T is the prompt width at prefill
  and 1 in the decode loop; `start` may be traced.
  """
  cfg = model.cfg
  dtype = jnp.dtype(cfg.dtype)
  batch, steps = inputs_BT.shape
  slots_BT = jnp.broadcast_to(start + jnp.arange(steps, dtype=jnp.int32), (batch, steps))
  # Slots of this step: empty padding slots keep EMPTY_INDEX so no query ever sees them.
  index_BT = jnp.where(segment_ids_BT > 0, slots_BT, EMPTY_INDEX)
  seg_BS = jax.lax.dynamic_update_slice(cache.segment_ids_BS, segment_ids_BT, (0, start))
  index_BS = jax.lax.dynamic_update_slice(cache.index_BS, index_BT, (0, start))
  x_BTD = model.embed_tokens(inputs_BT, positions_BT)
  kwargs = dict(dtype=dtype, activation=cfg.activation, attention_backend="xla",
                shard=model.shard)

  def body(x_BTD, layer):
    p, k_BSHK, v_BSHK = layer
    q_BTHK, k_BTHK, v_BTHK = L.project_qkv(p, x_BTD, dtype, cfg.qk_norm, model.shard)
    k_BSHK = jax.lax.dynamic_update_slice(k_BSHK, k_BTHK.astype(k_BSHK.dtype), (0, start, 0, 0))
    v_BSHK = jax.lax.dynamic_update_slice(v_BSHK, v_BTHK.astype(v_BSHK.dtype), (0, start, 0, 0))
    kv = L.KV(k_BSHK, v_BSHK, seg_BS, index_BS)
    # Queries of padding rows get their slot index too; their outputs are never used.
    x_BTD = L.attend_and_mlp(p, x_BTD, q_BTHK, kv, jnp.maximum(segment_ids_BT, 1), slots_BT,
                             **kwargs)
    return x_BTD, (k_BSHK, v_BSHK)

  x_BTD, (k_NBSHK, v_NBSHK) = jax.lax.scan(
      body, x_BTD, (model.layers.arrays(), cache.k_NBSHK, cache.v_NBSHK))
  return model.logits(x_BTD), KVCache(k_NBSHK, v_NBSHK, seg_BS, index_BS)

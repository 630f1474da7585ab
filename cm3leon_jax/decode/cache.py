"""The static-shape KV cache and the cached forward pass of the decoder.

The cache holds one key and one value array per layer, heads before slots:

    k_BHSK[l], v_BHSK[l] : [batch, heads, slots, head_dim] (compute dtype), l = 0..layers-1
    segment_ids_BS       : 1 for a written slot, 0 for empty / left padding (never attended)
    index_BS             : the slot's column, or a value past every query for empty slots

Prompts of different lengths are left-padded to one width P: every row writes slot t at step
t, padding slots carry segment id 0, and a row's position embedding index is its column minus
its padding. Decoding writes one slot per step. Shapes never change, so prefill and the
decode loop each compile once.

Why this layout (measured on CPU, experiments/bench/decode.py): the attention dots batch over
(batch, heads), so with heads before slots the cache feeds them as it is; a [B, S, H, K]
cache was transposed in full every step and layer (8x slower per step at batch 8). Layers are
unrolled over per-layer weights sliced once before the decode loop (`layer_params`): scanning
the stacked weights copied every layer's weights and cache slice every step (2x slower).
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp

from cm3leon_jax.model import layers as L
from cm3leon_jax.model.decoder import Decoder

EMPTY_INDEX = jnp.iinfo(jnp.int32).max


class KVCache(NamedTuple):
  k_BHSK: tuple[jax.Array, ...]  # one per layer
  v_BHSK: tuple[jax.Array, ...]
  segment_ids_BS: jax.Array
  index_BS: jax.Array

  @property
  def size(self) -> int:
    return self.segment_ids_BS.shape[1]


KV_AXES = ("batch", "heads", "length", "kv")
SLOT_AXES = ("batch", "length")


def init_cache(model: Decoder, batch: int, size: int) -> KVCache:
  cfg = model.cfg
  shape = (batch, cfg.num_heads, size, cfg.head_dim)
  shard = model.shard
  zeros = lambda: shard(jnp.zeros(shape, jnp.dtype(cfg.dtype)), KV_AXES)
  return KVCache(tuple(zeros() for _ in range(cfg.num_layers)),
                 tuple(zeros() for _ in range(cfg.num_layers)),
                 shard(jnp.zeros((batch, size), jnp.int32), SLOT_AXES),
                 shard(jnp.full((batch, size), EMPTY_INDEX, jnp.int32), SLOT_AXES))


def layer_params(model: Decoder) -> list[dict]:
  """The stacked layer weights as one dict per layer. Slice them once, outside the decode
  loop, and pass them to every `forward_cached` call of the loop."""
  stacked = model.layers.arrays()
  return [{name: a[i] for name, a in stacked.items()} for i in range(model.cfg.num_layers)]


def forward_cached(model: Decoder, cache: KVCache, inputs_BT: jax.Array, positions_BT: jax.Array,
                   segment_ids_BT: jax.Array, start: jax.Array,
                   layers: list[dict] | None = None, image_index_BT: jax.Array | None = None
                   ) -> tuple[jax.Array, KVCache]:
  """Run T new tokens (written to slots [start, start + T)) against the cache.

  Returns float32 logits [B, T, V] and the updated cache. T is the prompt width at prefill
  and 1 in the decode loop; `start` may be traced. `layers`: `layer_params(model)`, computed
  here when not given. `image_index_BT`: the new tokens' image-position indices
  (`Decoder.image_index` over the whole sequence so far); None computes them from these T
  tokens alone, right at prefill when the prompt starts outside an image.
  """
  cfg = model.cfg
  dtype = jnp.dtype(cfg.dtype)
  layers = layer_params(model) if layers is None else layers
  batch, steps = inputs_BT.shape
  slots_BT = jnp.broadcast_to(start + jnp.arange(steps, dtype=jnp.int32), (batch, steps))
  # Slots of this step: empty padding slots keep EMPTY_INDEX so no query ever sees them.
  index_BT = jnp.where(segment_ids_BT > 0, slots_BT, EMPTY_INDEX)
  seg_BS = jax.lax.dynamic_update_slice(cache.segment_ids_BS, segment_ids_BT, (0, start))
  index_BS = jax.lax.dynamic_update_slice(cache.index_BS, index_BT, (0, start))
  x_BTD = model.embed_tokens(inputs_BT, positions_BT, image_index_BT)
  kwargs = dict(dtype=dtype, activation=cfg.activation, attention_backend="xla",
                shard=model.shard)
  new_k, new_v = [], []
  for p, k_BHSK, v_BHSK in zip(layers, cache.k_BHSK, cache.v_BHSK):
    q_BTHK, k_BTHK, v_BTHK = L.project_qkv(p, x_BTD, dtype, cfg.qk_norm, model.shard)
    k_BHSK = jax.lax.dynamic_update_slice(
        k_BHSK, jnp.swapaxes(k_BTHK, 1, 2).astype(k_BHSK.dtype), (0, 0, start, 0))
    v_BHSK = jax.lax.dynamic_update_slice(
        v_BHSK, jnp.swapaxes(v_BTHK, 1, 2).astype(v_BHSK.dtype), (0, 0, start, 0))
    # The attention takes [B, S, H, K] views of the [B, H, S, K] cache (see the docstring).
    kv = L.KV(jnp.swapaxes(k_BHSK, 1, 2), jnp.swapaxes(v_BHSK, 1, 2), seg_BS, index_BS)
    # Queries of padding rows get their slot index too; their outputs are never used.
    x_BTD = L.attend_and_mlp(p, x_BTD, q_BTHK, kv, jnp.maximum(segment_ids_BT, 1), slots_BT,
                             **kwargs)
    new_k.append(k_BHSK)
    new_v.append(v_BHSK)
  return model.logits(x_BTD), KVCache(tuple(new_k), tuple(new_v), seg_BS, index_BS)

"""The static-shape KV cache and the cached forward pass of the decoder.

The cache holds one key and one value array per layer, (batch, heads) merged, then slots:

    k_NSK[l], v_NSK[l] : [batch * heads, slots, head_dim] (compute dtype), l = 0..layers-1
    segment_ids_BS     : 1 for a written slot, 0 for empty / left padding (never attended)
    index_BS           : the slot's column, or a value past every query for empty slots

Prompts of different lengths are left-padded to one width P: every row writes slot t at step
t, padding slots carry segment id 0, and a row's position embedding index is its column minus
its padding. Decoding writes one slot per step. Shapes never change within a decode loop, so
prefill and the loop each compile once; `grow` pads the cache for the sampler's next window.

Why this layout (measured on CPU, experiments/bench/decode.py): the decode step's attention
is B * H matrix-vector products with the cache as the matrix, so a [B * H, S, K] cache feeds
XLA's batched dot exactly as it is stored. With [B, S, H, K] XLA copied every layer's keys to
[H, K, S] every step; with [B, H, S, K] it merged (B, H) with a reshape that it fused into the
in-place slot write, duplicating the write and copying the whole cache every step (batch 1,
bench preset, 8 layers: 1.4-2.9 -> 0.85 ms per step of a stand-alone loop with the flat
layout).
Layers are unrolled over per-layer weights sliced once before the decode loop
(`layer_params`): scanning the stacked weights copied every layer's weights and cache slice
every step (2x slower).

On a GPU (`model.decode_matvec`: auto, at most 2 rows; pallas, at most 8) a decode step
runs each layer's four projections as fused matrix-vector kernels (model/matvec.py) over
weights transposed to [N, D] once per call, next to the stacked ones (twice the weight memory
while decoding); the prefill and larger batches keep XLA's GEMMs. With
`model.decode_attention=pallas` those steps also attend through JAX's Pallas decode-attention
kernel (`attention.kernel_single_query_attention`), which reads only the written slots, so the
sampler runs one cache window; written and tested here in Pallas' interpreter, not yet timed
on a GPU, hence off by default.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp

from cm3leon_jax.model import layers as L
from cm3leon_jax.model import matvec as MV
from cm3leon_jax.model.attention import (kernel_single_query_attention, kernel_splits,
                                         single_query_attention)
from cm3leon_jax.model.decoder import Decoder

EMPTY_INDEX = jnp.iinfo(jnp.int32).max


class KVCache(NamedTuple):
  k_NSK: tuple[jax.Array, ...]  # one per layer; N = batch * heads, batch-major
  v_NSK: tuple[jax.Array, ...]
  segment_ids_BS: jax.Array
  index_BS: jax.Array

  @property
  def size(self) -> int:
    return self.segment_ids_BS.shape[1]


KV_AXES = (("batch", "heads"), "length", "kv")
SLOT_AXES = ("batch", "length")


def init_cache(model: Decoder, batch: int, size: int) -> KVCache:
  cfg = model.cfg
  shape = (batch * cfg.num_heads, size, cfg.head_dim)
  shard = model.shard
  zeros = lambda: shard(jnp.zeros(shape, jnp.dtype(cfg.dtype)), KV_AXES)
  return KVCache(tuple(zeros() for _ in range(cfg.num_layers)),
                 tuple(zeros() for _ in range(cfg.num_layers)),
                 shard(jnp.zeros((batch, size), jnp.int32), SLOT_AXES),
                 shard(jnp.full((batch, size), EMPTY_INDEX, jnp.int32), SLOT_AXES))


def grow(model: Decoder, cache: KVCache, size: int) -> KVCache:
  """The same cache with empty slots appended up to `size` (one copy of the cache)."""
  extra = size - cache.size
  if extra < 0:
    raise ValueError(f"cannot grow a {cache.size}-slot cache to {size} slots")
  if extra == 0:  # the first window: the cache prefill wrote into
    return cache
  kv = lambda x: model.shard(jnp.pad(x, ((0, 0), (0, extra), (0, 0))), KV_AXES)
  return KVCache(tuple(kv(k) for k in cache.k_NSK), tuple(kv(v) for v in cache.v_NSK),
                 model.shard(jnp.pad(cache.segment_ids_BS, ((0, 0), (0, extra))), SLOT_AXES),
                 model.shard(jnp.pad(cache.index_BS, ((0, 0), (0, extra)),
                                     constant_values=EMPTY_INDEX), SLOT_AXES))


def uses_matvec(model: Decoder, rows: int | None = None) -> bool:
  """Whether decode steps (of `rows` rows; None: any supported count) use the fused kernels:
  `model.decode_matvec` pallas, or auto on a GPU; one device (no partitioning of a Pallas
  call); and shapes the kernel handles."""
  cfg = model.cfg
  mode = cfg.decode_matvec
  if mode == "xla" or (mode == "auto" and jax.default_backend() != "gpu"):
    return False
  mesh = jax.sharding.get_abstract_mesh()
  if not mesh.empty and mesh.size > 1:  # a Pallas call has no partitioning rule
    return False
  d, f, hk = cfg.d_model, cfg.d_ff, cfg.num_heads * cfg.head_dim
  r = 1 if rows is None else rows
  if mode == "auto" and r > MV.AUTO_MAX_ROWS:
    return False
  return all(MV.supported(r, k, 1) for k in (d, f, hk))


def uses_attention_kernel(model: Decoder, rows: int | None = None) -> bool:
  """Whether decode steps attend with the Pallas decode-attention kernel
  (`model.decode_attention=pallas`, only together with the fused projections). The sampler
  then runs one cache window rounded up to KERNEL_CACHE_MULTIPLE slots: the kernel reads only
  the written slots."""
  return model.cfg.decode_attention == "pallas" and uses_matvec(model, rows)


def layer_params(model: Decoder) -> list[dict]:
  """The stacked layer weights as one dict per layer. Slice them once, outside the decode
  loop, and pass them to every `forward_cached` call of the loop. With the fused decode
  kernels (`uses_matvec`) each dict also holds the weights transposed to [N, D] in the
  compute dtype: `wqkv_ND` (rows ordered heads, q/k/v, head_dim as `project_qkv`'s output),
  `wo_ND`, `w_in_ND` (swiglu: w_in's rows then w_gate's) and `w_out_ND`."""
  stacked = model.layers.arrays()
  layers = [{name: a[i] for name, a in stacked.items()} for i in range(model.cfg.num_layers)]
  if not uses_matvec(model):
    return layers
  dtype = jnp.dtype(model.cfg.dtype)
  for p in layers:
    d = p["wq"].shape[0]
    p["wqkv_ND"] = jnp.stack([p["wq"], p["wk"], p["wv"]], axis=2).reshape(d, -1).T.astype(dtype)
    p["wo_ND"] = p["wo"].reshape(-1, d).T.astype(dtype)
    w_in = p["w_in"] if "w_gate" not in p else jnp.concatenate([p["w_in"], p["w_gate"]], 1)
    p["w_in_ND"] = w_in.T.astype(dtype)
    p["w_out_ND"] = p["w_out"].T.astype(dtype)
  return layers


def _matvec_layer(model: Decoder, p: dict, x_BD, k_NSK, v_NSK, start, attend):
  """One decode step of one layer with the fused kernels: same math as `project_qkv` +
  cache write + `attend` (q_BHK, k_NSK, v_NSK -> o_BHK) + `project_out_and_mlp`."""
  cfg = model.cfg
  batch, heads, head_dim = x_BD.shape[0], cfg.num_heads, cfg.head_dim
  qkv_BHTK = MV.fused_matvec(x_BD, p["wqkv_ND"], norm=True).reshape(batch, heads, 3, head_dim)
  q_BHK, k_BHK, v_BHK = (qkv_BHTK[:, :, i] for i in range(3))
  if cfg.qk_norm:
    q_BHK, k_BHK = L.layer_norm(q_BHK), L.layer_norm(k_BHK)
  as_nsk = lambda x_BHK, like: x_BHK.reshape(batch * heads, 1, head_dim).astype(like.dtype)
  k_NSK = jax.lax.dynamic_update_slice(k_NSK, as_nsk(k_BHK, k_NSK), (0, start, 0))
  v_NSK = jax.lax.dynamic_update_slice(v_NSK, as_nsk(v_BHK, v_NSK), (0, start, 0))
  o_BHK = attend(q_BHK, k_NSK, v_NSK)
  x_BD = MV.fused_matvec(o_BHK.reshape(batch, heads * head_dim), p["wo_ND"], x_BD)
  if cfg.activation == "swiglu":
    h_B2F = MV.fused_matvec(x_BD, p["w_in_ND"], norm=True)
    h_BF, gate_BF = jnp.split(h_B2F, 2, axis=-1)
    h_BF = L.activate("swiglu", h_BF, gate_BF)
  else:
    h_BF = MV.fused_matvec(x_BD, p["w_in_ND"], norm=True, activation=cfg.activation)
  x_BD = MV.fused_matvec(h_BF, p["w_out_ND"], x_BD)
  return x_BD, k_NSK, v_NSK


def forward_cached(model: Decoder, cache: KVCache, inputs_BT: jax.Array, positions_BT: jax.Array,
                   segment_ids_BT: jax.Array, start: jax.Array,
                   layers: list[dict] | None = None, image_index_BT: jax.Array | None = None,
                   hidden: bool = False) -> tuple[jax.Array, KVCache]:
  """Run T new tokens (written to slots [start, start + T)) against the cache.

  Returns float32 logits [B, T, V] and the updated cache. T is the prompt width at prefill
  and 1 in the decode loop; `start` may be traced. `layers`: `layer_params(model)`, computed
  here when not given. `image_index_BT`: the new tokens' image-position indices
  (`Decoder.image_index` over the whole sequence so far); None computes them from these T
  tokens alone, right at prefill when the prompt starts outside an image. `hidden`: return
  the last layer's output [B, T, D] instead of the logits (`model.logits` makes them).
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
  heads = cfg.num_heads
  # The decode loop: one query per row, attending the written slots of its own segment.
  mask_BS = ((index_BS <= slots_BT) & (seg_BS == jnp.maximum(segment_ids_BT, 1))
             if steps == 1 else None)
  if steps == 1 and "wqkv_ND" in layers[0] and uses_matvec(model, batch):
    if uses_attention_kernel(model, batch) and kernel_splits(cache.size):
      # A row's attended slots are one run: left padding (segment 0), then its prompt and
      # generated tokens up to this step's slot, as `sampler.pad_prompts` lays them out.
      start_B = jnp.argmax(mask_BS, axis=1).astype(jnp.int32)
      length_B = slots_BT[:, 0] + 1
      attend = lambda q, k, v: kernel_single_query_attention(q, k, v, start_B, length_B)
    else:
      attend = lambda q, k, v: single_query_attention(q, k, v, mask_BS)
    x_BD = x_BTD[:, 0]
    for p, k_NSK, v_NSK in zip(layers, cache.k_NSK, cache.v_NSK):
      x_BD, k_NSK, v_NSK = _matvec_layer(model, p, x_BD, k_NSK, v_NSK, start, attend)
      new_k.append(k_NSK)
      new_v.append(v_NSK)
    x_BTD = x_BD[:, None]
  else:
    for p, k_NSK, v_NSK in zip(layers, cache.k_NSK, cache.v_NSK):
      q_BTHK, k_BTHK, v_BTHK = L.project_qkv(p, x_BTD, dtype, cfg.qk_norm, model.shard)
      to_nsk = lambda x_BTHK: jnp.swapaxes(x_BTHK, 1, 2).reshape(batch * heads, steps, -1)
      k_NSK = jax.lax.dynamic_update_slice(k_NSK, to_nsk(k_BTHK).astype(k_NSK.dtype),
                                           (0, start, 0))
      v_NSK = jax.lax.dynamic_update_slice(v_NSK, to_nsk(v_BTHK).astype(v_NSK.dtype),
                                           (0, start, 0))
      if steps == 1:  # one query per row against the cache as it is stored
        o_BHK = single_query_attention(q_BTHK[:, 0], k_NSK, v_NSK, mask_BS)
        x_BTD = L.project_out_and_mlp(p, x_BTD, o_BHK[:, None], dtype=dtype,
                                      activation=cfg.activation, shard=model.shard)
      else:
        # Prefill: [B, S, H, K] views of the cache. Queries of padding rows get their slot index
        # too; their outputs are never used.
        to_bshk = lambda x_NSK: jnp.swapaxes(x_NSK.reshape(batch, heads, *x_NSK.shape[1:]), 1, 2)
        kv = L.KV(to_bshk(k_NSK), to_bshk(v_NSK), seg_BS, index_BS)
        x_BTD = L.attend_and_mlp(p, x_BTD, q_BTHK, kv, jnp.maximum(segment_ids_BT, 1), slots_BT,
                                 **kwargs)
      new_k.append(k_NSK)
      new_v.append(v_NSK)
  out = x_BTD if hidden else model.logits(x_BTD)
  return out, KVCache(tuple(new_k), tuple(new_v), seg_BS, index_BS)

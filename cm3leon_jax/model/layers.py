"""One decoder layer as a pure function of its parameters, plus the pieces it is made of.

REFERENCE.md section 4: pre-LayerNorm without learnable parameters, no biases, no dropout.
The layer's parameters live stacked along a leading `layers` axis in `decoder.Decoder`; this
module only does math on one slice of them, so the same function serves the scanned training
forward and a KV-cached decoder.

Logical axis names of activations (resolved to mesh axes by `config.mesh.axis_rules`):
x_BLD ('batch', 'length', None), q/k/v ('batch', 'length', 'heads', 'kv'),
hidden_BLF ('batch', 'length', 'mlp').
"""

from __future__ import annotations

from typing import NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp

from cm3leon_jax.model.attention import attention

LAYER_NORM_EPS = 1e-5

# Parameter name -> (shape given config fields, logical axes) of ONE layer; the decoder stacks
# them along a leading 'layers' axis. `wo` and `w_out` close residual branches: initialised 0.
LAYER_PARAMS = {
    "wq": (("d_model", "num_heads", "head_dim"), ("embed", "heads", "kv")),
    "wk": (("d_model", "num_heads", "head_dim"), ("embed", "heads", "kv")),
    "wv": (("d_model", "num_heads", "head_dim"), ("embed", "heads", "kv")),
    "wo": (("num_heads", "head_dim", "d_model"), ("heads", "kv", "embed")),
    "w_in": (("d_model", "d_ff"), ("embed", "mlp")),
    "w_gate": (("d_model", "d_ff"), ("embed", "mlp")),  # swiglu only
    "w_out": (("d_ff", "d_model"), ("mlp", "embed")),
}
ZERO_INIT = ("wo", "w_out")


class Sharder(NamedTuple):
  """Applies logical-axis sharding constraints to activations (a no-op without a mesh)."""
  rules: tuple

  def __call__(self, x, logical_axes):
    """`logical_axes`: one name (or None) per dimension; a tuple of names for a dimension that
    merges several logical axes, major first (e.g. ("batch", "heads") for [B * H, ...])."""
    if jax.sharding.get_abstract_mesh().empty:
      return x
    groups = [names if isinstance(names, tuple) else (names,) for names in logical_axes]
    # One call over every name, so that no mesh axis is used twice; then regroup per dimension.
    flat = list(nn.logical_to_mesh_axes(tuple(n for g in groups for n in g), self.rules))
    spec = []
    for g in groups:
      parts, flat = flat[:len(g)], flat[len(g):]
      merged = [a for part in parts if part is not None
                for a in (part if isinstance(part, tuple) else (part,))]
      spec.append(None if not merged else merged[0] if len(merged) == 1 else tuple(merged))
    return jax.lax.with_sharding_constraint(x, jax.sharding.PartitionSpec(*spec))


def layer_norm(x, eps: float = LAYER_NORM_EPS):
  """Parameter-free LayerNorm over the last axis; statistics in float32, result in x's dtype."""
  x32 = x.astype(jnp.float32)
  mean = x32.mean(-1, keepdims=True)
  var = jnp.square(x32 - mean).mean(-1, keepdims=True)
  return ((x32 - mean) * jax.lax.rsqrt(var + eps)).astype(x.dtype)


def activate(name: str, h_BLF, gate_BLF=None):
  if name == "relu":
    return jax.nn.relu(h_BLF)
  if name == "gelu":
    return jax.nn.gelu(h_BLF, approximate=False)
  if name == "swiglu":
    return jax.nn.silu(gate_BLF) * h_BLF
  raise ValueError(f"activation {name!r}: expected relu | gelu | swiglu")


class KV(NamedTuple):
  """Keys and values a layer attends over, with their segment ids and indices.

  Training passes None (self-attention over the row). A KV-cached decoder passes the cache
  after writing this step's k/v into it (shapes [B, S, H, K], [B, S], [B, S]).
  """
  k_BSHK: jax.Array
  v_BSHK: jax.Array
  segment_ids_BS: jax.Array
  index_BS: jax.Array


def project_qkv(p: dict, x_BLD, dtype, qk_norm: bool, shard: Sharder):
  """Pre-LN and the q/k/v projections: [B, L, D] -> three [B, L, H, K]."""
  h_BLD = layer_norm(x_BLD)
  # One matmul for q, k and v (a wider GEMM runs closer to peak than three narrow ones). The
  # stacked weight [D, H, 3, K] is a plain [D, 3HK] matrix and the output keeps [B, L] first, so
  # no operand is transposed: with the q/k/v axis first ("...->TBLHK") XLA copied the weights
  # into a transposed layout inside every decode step. Heads stay the major factor of the
  # fused output axis, so a heads-sharded weight stays sharded.
  w_DHTK = jnp.stack([p["wq"], p["wk"], p["wv"]], axis=2).astype(dtype)
  y_BLHTK = jnp.einsum("BLD,DHTK->BLHTK", h_BLD, w_DHTK)
  q_BLHK, k_BLHK, v_BLHK = (shard(y_BLHTK[:, :, :, i], ("batch", "length", "heads", "kv"))
                            for i in range(3))
  if qk_norm:  # Chameleon's stabiliser; parameter-free like every norm here
    q_BLHK, k_BLHK = layer_norm(q_BLHK), layer_norm(k_BLHK)
  return q_BLHK, k_BLHK, v_BLHK


def attend_and_mlp(p: dict, x_BLD, q_BLHK, kv: KV, q_segment_ids_BL, q_index_BL, *, dtype,
                   activation: str, attention_backend: str, shard: Sharder):
  """The rest of the layer once q and the keys/values are known: attention + MLP residuals."""
  o_BLHK = attention(q_BLHK, kv.k_BSHK, kv.v_BSHK, q_segment_ids_BL, kv.segment_ids_BS,
                     q_index_BL, kv.index_BS, backend=attention_backend)
  return project_out_and_mlp(p, x_BLD, o_BLHK, dtype=dtype, activation=activation, shard=shard)


def project_out_and_mlp(p: dict, x_BLD, o_BLHK, *, dtype, activation: str, shard: Sharder):
  """The attention output's projection and residual, then the MLP block: [B, L, D] -> same."""
  o_BLHK = shard(o_BLHK, ("batch", "length", "heads", "kv"))
  x_BLD = x_BLD + jnp.einsum("BLHK,HKD->BLD", o_BLHK, p["wo"].astype(dtype))
  x_BLD = shard(x_BLD, ("batch", "length", None))

  h_BLD = layer_norm(x_BLD)
  h_BLF = jnp.einsum("BLD,DF->BLF", h_BLD, p["w_in"].astype(dtype))
  gate_BLF = None
  if activation == "swiglu":
    gate_BLF = jnp.einsum("BLD,DF->BLF", h_BLD, p["w_gate"].astype(dtype))
  h_BLF = shard(activate(activation, h_BLF, gate_BLF), ("batch", "length", "mlp"))
  x_BLD = x_BLD + jnp.einsum("BLF,FD->BLD", h_BLF, p["w_out"].astype(dtype))
  return shard(x_BLD, ("batch", "length", None))


def layer(p: dict, x_BLD, segment_ids_BL, *, dtype, activation: str, qk_norm: bool,
          attention_backend: str, shard: Sharder):
  """One pre-LN transformer layer over packed rows (training / full forward): [B,L,D] -> same."""
  q_BLHK, k_BLHK, v_BLHK = project_qkv(p, x_BLD, dtype, qk_norm, shard)
  # Indices None: plain causal self-attention (lets the splash backend use its causal mask).
  kv = KV(k_BLHK, v_BLHK, segment_ids_BL, None)
  return attend_and_mlp(p, x_BLD, q_BLHK, kv, segment_ids_BL, None, dtype=dtype,
                        activation=activation, attention_backend=attention_backend, shard=shard)

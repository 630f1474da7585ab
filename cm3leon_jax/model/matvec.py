"""Decode-step matrix-vector products as fused Pallas (Triton) kernels for GPUs.

At batch 1 every projection of a decode step is a matrix-vector product. XLA:GPU rewrites a dot
with a vector operand whose (M + N) * K is under 10M elements into multiply + reduce
(`GpuAlgebraicSimplifier::ShouldStrengthReduceDotToReduce`), and on an H200 its reduction
kernels read the 350M preset's projection weights at ~0.7 TB/s of the 4.8 (profile:
experiments/results/gpu-h200-2026-11-27/5-profile-before.log, 67% of the device time per token in
reductions, 391 kernels per token). `fused_matvec` is one kernel per projection that reads the
weight once, stored [N, D] so that each program reads whole contiguous rows, and fuses what
surrounds the product in a layer: the LayerNorm before q/k/v and the MLP input, the activation
after the MLP input, the residual add after the output projections.

    y[r] = act(norm(x[r]) @ w_ND.T) (+ residual[r])      for the r = 1..8 rows of x

Measured on one H200 (experiments/results/gpu-h200-2026-12-04/): the 350M preset's batch-1 decode
1.304 -> 0.693 ms per token (1.88x; 13% -> 24% of the memory-bandwidth bound), 258 instead of
~390 kernels per token; in the decode loop the kernels take 2.5-5.1 us each, 0.8-1.7 TB/s.

Same math as `layers.layer_norm` + einsum (LayerNorm statistics in float32, normed input rounded
to x's dtype, products accumulated in float32, result rounded to `out_dtype`); only the
summation order differs. Off GPU the kernel runs in Pallas' interpreter (tests, not speed).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl

from cm3leon_jax.model import layers as L

MAX_ROWS = 8            # registers per program grow with the rows; more go to XLA's dots
AUTO_MAX_ROWS = 2       # `model.decode_matvec=auto` on a GPU: measured at 1 row; CFG makes 2
# Default tiling (read when a call is traced; experiments/bench/matvec.py --tilings sweeps it).
TARGET_PROGRAMS = 256   # about two programs per streaming multiprocessor of an H100/H200
NUM_WARPS = 4
CHUNK_ELEMENTS = 512    # columns per unrolled step x padded rows (accumulator registers)
ACTIVATIONS = (None, "relu", "gelu")


def _is_pow2(n: int) -> bool:
  return n >= 1 and n & (n - 1) == 0


def block_rows(n: int) -> int:
  """Rows of w_ND per program: the largest of 16, 8, ..., 1 dividing N that still gives
  TARGET_PROGRAMS programs (memory-level parallelism across the chip), else 1."""
  for bn in (16, 8, 4, 2):
    if n % bn == 0 and n // bn >= TARGET_PROGRAMS:
      return bn
  return 1


def supported(rows: int, d: int, n: int) -> bool:
  """Whether `fused_matvec` handles x [rows, d] @ w [n, d].T (Triton blocks are powers of 2)."""
  return 1 <= rows <= MAX_ROWS and _is_pow2(d) and d >= 16 and n >= 1


def _kernel(*refs, rows: int, norm: bool, activation: str | None, has_residual: bool,
            chunk: int, x_dtype, eps: float):
  if has_residual:
    x_ref, w_ref, r_ref, o_ref = refs
  else:
    (x_ref, w_ref, o_ref), r_ref = refs, None
  d = w_ref.shape[1]
  stats = []
  if norm:  # whole rows are at most a few thousand floats: statistics in registers
    for r in range(rows):
      x = x_ref[r, :].astype(jnp.float32)
      mean = jnp.mean(x)
      var = jnp.mean(jnp.square(x - mean))
      stats.append((mean, jax.lax.rsqrt(var + eps)))
  acc = [jnp.zeros((w_ref.shape[0], chunk), jnp.float32) for _ in range(rows)]
  for c in range(d // chunk):  # unrolled: static slices, loads the compiler can run ahead
    cols = pl.ds(c * chunk, chunk)
    w = w_ref[:, cols].astype(jnp.float32)
    for r in range(rows):
      xc = x_ref[r, cols].astype(jnp.float32)
      if norm:
        mean, rstd = stats[r]
        xc = ((xc - mean) * rstd).astype(x_dtype).astype(jnp.float32)
      acc[r] = acc[r] + w * xc[None, :]
  for r in range(rows):
    y = jnp.sum(acc[r], axis=1).astype(o_ref.dtype)
    if activation == "relu":
      y = jnp.maximum(y, 0)
    elif activation == "gelu":
      y = jax.nn.gelu(y.astype(jnp.float32), approximate=False).astype(o_ref.dtype)
    if r_ref is not None:
      y = (r_ref[r, :].astype(jnp.float32) + y.astype(jnp.float32)).astype(o_ref.dtype)
    o_ref[r, :] = y


@functools.partial(jax.jit, static_argnames=("norm", "activation", "out_dtype", "interpret",
                                             "block_n", "chunk", "num_warps"))
def fused_matvec(x_RD, w_ND, residual_RN=None, *, norm: bool = False,
                 activation: str | None = None, out_dtype=None, interpret: bool | None = None,
                 block_n: int | None = None, chunk: int | None = None,
                 num_warps: int | None = None):
  """act(norm(x_RD) @ w_ND.T) (+ residual_RN) -> [R, N] in `out_dtype` (default x's dtype).

  R <= MAX_ROWS and D a power of 2 (`supported`); `interpret` None: the interpreter off GPU.
  Tiling (experiments/bench/matvec.py sweeps it): `block_n` rows of w per program (a power of
  2 dividing N; default `block_rows(N)`), `chunk` columns per unrolled step (a power of 2
  dividing D; default CHUNK_ELEMENTS / padded rows), `num_warps` (default NUM_WARPS).
  """
  rows, d = x_RD.shape
  n, d_w = w_ND.shape
  if d_w != d:
    raise ValueError(f"fused_matvec: x has {d} columns, w_ND has {d_w}")
  if not supported(rows, d, n):
    raise ValueError(f"fused_matvec: x [{rows}, {d}] @ w [{n}, {d}].T is outside what the "
                     f"kernel handles (rows 1..{MAX_ROWS}, D a power of 2 >= 16)")
  if activation not in ACTIVATIONS:
    raise ValueError(f"fused_matvec: activation {activation!r}: expected one of {ACTIVATIONS}")
  out_dtype = jnp.dtype(x_RD.dtype if out_dtype is None else out_dtype)
  if interpret is None:
    interpret = jax.default_backend() != "gpu"
  # Triton tiles need power-of-2 shapes: pad the rows (zero rows cost no weight bytes).
  padded = 1 << (rows - 1).bit_length()
  pad = lambda a: a if padded == rows else jnp.pad(a, ((0, padded - rows), (0, 0)))
  bn = block_rows(n) if block_n is None else block_n
  chunk = min(d, max(CHUNK_ELEMENTS // padded, 16)) if chunk is None else chunk
  num_warps = NUM_WARPS if num_warps is None else num_warps
  if not (_is_pow2(bn) and n % bn == 0 and _is_pow2(chunk) and d % chunk == 0):
    raise ValueError(f"fused_matvec: block_n={bn} must be a power of 2 dividing N={n} and "
                     f"chunk={chunk} one dividing D={d}")
  kernel = functools.partial(_kernel, rows=padded, norm=norm, activation=activation,
                             has_residual=residual_RN is not None, chunk=chunk,
                             x_dtype=x_RD.dtype, eps=L.LAYER_NORM_EPS)
  in_specs = [pl.BlockSpec((padded, d), lambda j: (0, 0)),
              pl.BlockSpec((bn, d), lambda j: (j, 0))]
  operands = [pad(x_RD), w_ND]
  if residual_RN is not None:
    in_specs.append(pl.BlockSpec((padded, bn), lambda j: (0, j)))
    operands.append(pad(residual_RN))
  params = {}
  if not interpret:
    from jax.experimental.pallas import triton as plgpu
    params = dict(compiler_params=plgpu.CompilerParams(num_warps=num_warps, num_stages=1))
  y_RN = pl.pallas_call(
      kernel, grid=(n // bn,), in_specs=in_specs,
      out_specs=pl.BlockSpec((padded, bn), lambda j: (0, j)),
      out_shape=jax.ShapeDtypeStruct((padded, n), out_dtype),
      interpret=interpret, name="fused_matvec", **params)(*operands)
  return y_RN[:rows]


def reference(x_RD, w_ND, residual_RN=None, *, norm=False, activation=None, out_dtype=None):
  """The same product with XLA ops, as the decoder layer computes it (tests compare)."""
  out_dtype = jnp.dtype(x_RD.dtype if out_dtype is None else out_dtype)
  h = L.layer_norm(x_RD) if norm else x_RD
  y = jnp.einsum("RD,ND->RN", h, w_ND.astype(h.dtype),
                 preferred_element_type=jnp.float32).astype(out_dtype)
  if activation is not None:
    y = L.activate(activation, y.astype(jnp.float32)).astype(out_dtype)
  if residual_RN is not None:
    y = (residual_RN.astype(jnp.float32) + y.astype(jnp.float32)).astype(out_dtype)
  return y

"""Causal self-attention over packed sequences: one function, four backends.

    attention(q_BLHK, k_BSHK, v_BSHK, q_segment_ids_BL, kv_segment_ids_BS,
              q_index_BL, kv_index_BS, backend) -> out_BLHK

Query i may see key j when `kv_index[j] <= q_index[i]` and both carry the same segment id
(packing puts several documents in one row; a token never attends across documents). In
training the indices are `arange(L)` for both; a KV-cached decoder passes the cache slots'
indices for the keys (empty slots get an index past every query, so they are never seen).

Backends (`config.model.attention`):
- "xla": einsum + masked softmax in float32; runs everywhere. Self-attention over rows longer
  than XLA_CHUNK skips the masked upper triangle chunk by chunk (`chunked_causal_attention`);
  `xla_attention` is the plain reference.
- "cudnn": `jax.nn.dot_product_attention(implementation="cudnn")` (flash attention on NVIDIA
  GPUs; half precision only, float32 falls back to "xla") with the same boolean mask, plus
  `is_causal` for self-attention so the kernel skips the upper triangle (+24% train-step
  throughput of the 350M preset on an H200). On other platforms the same call runs JAX's XLA
  implementation, which is how the CPU tests check it against the reference.
- "cudnn_packed": as "cudnn", but self-attention over packed rows hands cuDNN the runs of
  segment ids (its packed layout: offsets + lengths) instead of a mask, so the kernel reads no
  [B, 1, L, L] bias and computes no bias gradient (`cudnn_packed_attention`): 350M train step
  on an H200 0.277 -> 0.220 s (MFU 33.7% -> 42.3%; the output and gradients checked against
  the float32 reference there by experiments/bench/train_step.py).
- "splash": Pallas splash attention on TPU (segment ids in the kernel, causal block skipping),
  under `shard_map` so each device runs the kernel on its own batch and head shard.
  Off TPU the same kernel runs in Pallas interpret mode (slow; the CPU tests use it), unless
  `compiling_for_tpu()` is active (AOT compiles for a TPU topology from a CPU host).
- "auto": splash on TPU, cudnn_packed on GPU, xla elsewhere (decided by the default backend).
"""

from __future__ import annotations

import contextlib
import functools
import warnings

import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec as P

BACKENDS = ("auto", "xla", "cudnn", "cudnn_packed", "splash")
_NEG_INF = -0.7 * float(jnp.finfo(jnp.float32).max)
XLA_CHUNK = 128  # query chunk of the XLA path's causal block skipping (rows > this only)
# Runs of segment ids per row that cuDNN's packed layout describes (cudnn_packed_attention);
# rows with more take the masked path.
MAX_PACKED_SEGMENTS = 32


_TPU_TARGET = [False]


@contextlib.contextmanager
def compiling_for_tpu():
  """Lower splash attention as the real TPU kernel even though this host is not a TPU."""
  _TPU_TARGET.append(True)
  try:
    yield
  finally:
    _TPU_TARGET.pop()


def _splash_interpret() -> bool:
  return jax.default_backend() != "tpu" and not _TPU_TARGET[-1]


def resolve_backend(backend: str, platform: str | None = None) -> str:
  """"auto" -> the fast backend of `platform` (default: JAX's default backend)."""
  if backend not in BACKENDS:
    raise ValueError(f"attention backend {backend!r}: expected one of {BACKENDS}")
  if backend != "auto":
    return backend
  platform = platform or ("tpu" if _TPU_TARGET[-1] else jax.default_backend())
  return {"tpu": "splash", "gpu": "cudnn_packed"}.get(platform, "xla")


def attention_mask(q_segment_ids_BL, kv_segment_ids_BS, q_index_BL, kv_index_BS):
  """Boolean [B, L, S]: causal by index and within one segment."""
  causal = kv_index_BS[:, None, :] <= q_index_BL[:, :, None]
  same = q_segment_ids_BL[:, :, None] == kv_segment_ids_BS[:, None, :]
  return causal & same


def xla_attention(q_BLHK, k_BSHK, v_BSHK, mask_BLS):
  """Reference: softmax((q k^T) / sqrt(K) masked) v, scores and softmax in float32."""
  scale = q_BLHK.shape[-1] ** -0.5
  scores_BHLS = jnp.einsum("BLHK,BSHK->BHLS", q_BLHK, k_BSHK,
                           preferred_element_type=jnp.float32) * scale
  scores_BHLS = jnp.where(mask_BLS[:, None], scores_BHLS, _NEG_INF)
  probs_BHLS = jax.nn.softmax(scores_BHLS, axis=-1)
  return jnp.einsum("BHLS,BSHK->BLHK", probs_BHLS.astype(v_BSHK.dtype), v_BSHK)


def single_query_attention(q_BHK, k_NSK, v_NSK, mask_BS):
  """One new token per row against a KV cache stored [B * H, S, K] (batch-major): the decode
  step. Same result as `xla_attention` with L = 1; returns [B, H, K] in q's dtype.

  The dots are B * H matrix-vector products with the cache as the matrix, in the layout it is
  stored in (decode/cache.py says what the other layouts cost on CPU).
  """
  B, H, K = q_BHK.shape
  q_NK = q_BHK.reshape(B * H, K).astype(k_NSK.dtype)
  scores_NS = jax.lax.dot_general(k_NSK, q_NK, (((2,), (1,)), ((0,), (0,))),
                                  preferred_element_type=jnp.float32) * K ** -0.5
  mask_NS = jnp.broadcast_to(mask_BS[:, None], (B, H, mask_BS.shape[1])).reshape(B * H, -1)
  probs_NS = jax.nn.softmax(jnp.where(mask_NS, scores_NS, _NEG_INF), axis=-1)
  o_NK = jax.lax.dot_general(probs_NS.astype(v_NSK.dtype), v_NSK, (((1,), (1,)), ((0,), (0,))))
  return o_NK.reshape(B, H, K).astype(q_BHK.dtype)


# Cache slots per row that `kernel_single_query_attention` needs a multiple of (16 splits of 16).
KERNEL_CACHE_MULTIPLE = 256


def kernel_splits(slots: int) -> tuple[int, int] | None:
  """(k_splits, block_k) of JAX's Pallas decode-attention kernel for a cache of `slots` slots:
  as many splits as divide it (programs across the chip), blocks of up to 256 slots; None when
  `slots` is no multiple of 16 (the kernel's smallest block)."""
  for splits in (16, 8, 4, 2, 1):
    if slots % (16 * splits) == 0:
      span = slots // splits
      return splits, next(b for b in (256, 128, 64, 32, 16) if span % b == 0)
  return None


def kernel_single_query_attention(q_BHK, k_NSK, v_NSK, start_B, length_B, interpret=None):
  """`single_query_attention` for a row whose attended slots are one run [start, length):
  JAX's Pallas (Triton) decode-attention kernel (`pallas.ops.gpu.decode_attention.mqa`, one
  kernel over (B * H) x splits programs plus a small combine), which reads only the slots
  before `length`, so the cache may be longer than what was written. Needs `kernel_splits`
  of the cache size; `interpret` None: the interpreter off GPU. Returns [B, H, K].
  """
  from jax.experimental.pallas.ops.gpu import decode_attention
  B, H, K = q_BHK.shape
  tiling = kernel_splits(k_NSK.shape[1])
  if tiling is None:
    raise ValueError(f"kernel_single_query_attention: {k_NSK.shape[1]} cache slots, need a "
                     "multiple of 16")
  splits, block_k = tiling
  if interpret is None:
    interpret = jax.default_backend() != "gpu"
  q_N1K = q_BHK.reshape(B * H, 1, K).astype(k_NSK.dtype)
  o_N1K = decode_attention.mqa(q_N1K, k_NSK, v_NSK, jnp.repeat(start_B, H),
                               jnp.repeat(length_B, H), k_splits=splits, block_k=block_k,
                               interpret=interpret)
  return o_N1K.reshape(B, H, K).astype(q_BHK.dtype)


def chunked_causal_attention(q_BLHK, k_BLHK, v_BLHK, mask_BLL, chunk: int = 128):
  """Self-attention computed in query chunks that only read the keys up to the chunk's end.

  Same result as `xla_attention` for causal masks, with about (1 + 1/n) / 2 of its work for n
  chunks: the masked upper triangle is skipped block-wise, like a flash kernel, which is what
  makes the XLA path competitive on CPUs. Normalisation happens after the p.v product
  (one pass less over the [L, L] scores). Layout [B, H, L, K] inside: one transpose each way.
  """
  B, L, H, K = q_BLHK.shape
  to_bhlk = lambda x: jnp.swapaxes(x, 1, 2)
  q_BHLK = to_bhlk(q_BLHK) * jnp.asarray(K ** -0.5, q_BLHK.dtype)
  k_BHLK, v_BHLK = to_bhlk(k_BLHK), to_bhlk(v_BLHK)
  outs = []
  for start in range(0, L, chunk):
    end = min(start + chunk, L)
    scores = jnp.einsum("BHLK,BHSK->BHLS", q_BHLK[:, :, start:end], k_BHLK[:, :, :end],
                        preferred_element_type=jnp.float32)
    scores = jnp.where(mask_BLL[:, None, start:end, :end], scores, _NEG_INF)
    # Any per-row constant gives the same softmax; no gradient needs to flow through it.
    probs = jnp.exp(scores - jax.lax.stop_gradient(scores.max(-1, keepdims=True)))
    out = jnp.einsum("BHLS,BHSK->BHLK", probs.astype(v_BHLK.dtype), v_BHLK[:, :, :end],
                     preferred_element_type=jnp.float32)
    outs.append((out / probs.sum(-1, keepdims=True)).astype(q_BLHK.dtype))
  return to_bhlk(jnp.concatenate(outs, axis=2))


def cudnn_attention(q_BLHK, k_BSHK, v_BSHK, mask_BLS, is_causal: bool = False):
  """`is_causal` (self-attention only) lets the kernel skip the upper triangle block-wise; the
  boolean mask (which cuDNN reads as a bias) still carries the packing segments."""
  implementation = "cudnn" if jax.default_backend() == "gpu" else None
  return jax.nn.dot_product_attention(q_BLHK, k_BSHK, v_BSHK, mask=mask_BLS[:, None],
                                      is_causal=is_causal, implementation=implementation)


def packed_layout(segment_ids_BL, max_segments: int = MAX_PACKED_SEGMENTS):
  """cuDNN's packed ("THD") description of a row: each run of equal segment ids is a sequence.

  Returns seqlen_BM (run lengths, -1 past the row's last run), offsets_BM1 (run starts, -1
  past the last; one extra slot, always -1: cuDNN's convention) and fits_B (the row has <= M runs).
  Padding (id 0, always a trailing run) is a run of its own: it attends to itself, exactly as
  the mask of `attention_mask` has it, so no token is left without keys. This equals the mask
  when each segment id forms one contiguous run, which the batch contract guarantees
  (data/packing.py, train/synthetic.py: ids 1, 2, ... in order, then padding).
  """
  B, L = segment_ids_BL.shape
  start_BL = jnp.concatenate([jnp.ones((B, 1), bool),
                              segment_ids_BL[:, 1:] != segment_ids_BL[:, :-1]], axis=1)
  count_B = start_BL.sum(axis=1)
  # Starts sorted first, L (= no run) after them; pad so that M + 1 slots always exist.
  keyed_BL = jnp.where(start_BL, jnp.arange(L, dtype=jnp.int32), L)
  if L < max_segments + 1:
    keyed_BL = jnp.pad(keyed_BL, ((0, 0), (0, max_segments + 1 - L)), constant_values=L)
  starts_BM1 = jnp.sort(keyed_BL, axis=1)[:, :max_segments + 1]
  valid_BM1 = starts_BM1 < L
  ends_BM = jnp.minimum(starts_BM1[:, 1:], L)
  seqlen_BM = jnp.where(valid_BM1[:, :-1], ends_BM - starts_BM1[:, :-1], -1)
  offsets_BM1 = jnp.where(valid_BM1, starts_BM1, -1).at[:, -1].set(-1)
  return seqlen_BM.astype(jnp.int32), offsets_BM1.astype(jnp.int32), count_B <= max_segments


@functools.cache
def _cudnn_sdpa_module():
  """JAX's cuDNN attention module, which takes the packed layout; `jax.nn.dot_product_attention`
  does not expose it. Private API: if a JAX release moves it, warn (once: cached) and use the
  mask."""
  try:
    from jax._src.cudnn import fused_attention_stablehlo as cudnn_sdpa
    cudnn_sdpa.dot_product_attention, cudnn_sdpa.MaskType.PADDING_CAUSAL  # noqa: B018
    return cudnn_sdpa
  except (ImportError, AttributeError) as e:
    warnings.warn(f"cudnn_packed: JAX's cuDNN packed layout is unavailable ({e}); "
                  "using the masked cuDNN path")
    return None


def cudnn_packed_attention(q_BLHK, k_BLHK, v_BLHK, segment_ids_BL):
  """Self-attention over packed rows without a mask tensor: cuDNN's packed layout (run offsets
  and lengths per row) with its causal mask, so the kernel reads no [B, 1, L, L] bias and
  computes no bias gradient. A row with more than MAX_PACKED_SEGMENTS runs takes the masked
  path (`cudnn_attention`), decided on the device per batch, so the result never depends on
  the bound. GPU only (the packed layout is a cuDNN feature, reached through JAX's cuDNN
  module); elsewhere this is `cudnn_attention`.
  """
  kernel = _packed_kernel()
  if kernel is None:
    return _masked_self_attention(q_BLHK, k_BLHK, v_BLHK, segment_ids_BL)
  seqlen_BM, offsets_BM1, fits_B = packed_layout(segment_ids_BL)

  def packed(q, k, v):
    return kernel(q, k, v, seqlen_BM, offsets_BM1)

  # The fallback builds its [B, L, L] mask inside its branch and again in the backward pass
  # (jax.checkpoint): a cond's operands and saved residuals are computed whichever branch
  # runs, so a mask passed in cost the packed path a [B, L, L] pass in every layer's backward
  # (350M train step on an H200: device time 209 -> 204 ms per step).
  @jax.checkpoint
  def masked(q, k, v):
    return _masked_self_attention(q, k, v, segment_ids_BL)

  return jax.lax.cond(jnp.all(fits_B), packed, masked, q_BLHK, k_BLHK, v_BLHK)


def _packed_kernel():
  """cuDNN's packed-layout causal attention `(q, k, v, seqlen_BM, offsets_BM1) -> out`, or
  None where it does not exist (off GPU, or JAX moved its cuDNN module)."""
  cudnn_sdpa = _cudnn_sdpa_module() if jax.default_backend() == "gpu" else None
  if cudnn_sdpa is None:
    return None

  def kernel(q, k, v, seqlen_BM, offsets_BM1):
    return cudnn_sdpa.dot_product_attention(
        q, k, v, q_seqlen=seqlen_BM, kv_seqlen=seqlen_BM, q_offsets=offsets_BM1,
        kv_offsets=offsets_BM1, scale=q.shape[-1] ** -0.5,
        mask_type=cudnn_sdpa.MaskType.PADDING_CAUSAL)
  return kernel


def _masked_self_attention(q_BLHK, k_BLHK, v_BLHK, segment_ids_BL):
  """Causal self-attention over packed rows through cuDNN with the segment mask."""
  B, L = segment_ids_BL.shape
  index_BL = jnp.broadcast_to(jnp.arange(L, dtype=jnp.int32), (B, L))
  mask_BLL = attention_mask(segment_ids_BL, segment_ids_BL, index_BL, index_BL)
  return cudnn_attention(q_BLHK, k_BLHK, v_BLHK, mask_BLL, is_causal=True)


def _splash_kernel(seq_len: int, num_heads: int, interpret: bool):
  from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_kernel as sk
  from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_mask as sm
  mask = sm.MultiHeadMask([sm.CausalMask((seq_len, seq_len))] * num_heads)
  block = min(512, seq_len)
  sizes = sk.BlockSizes(block_q=block, block_kv=block, block_kv_compute=block, block_q_dkv=block,
                        block_kv_dkv=block, block_kv_dkv_compute=block, block_q_dq=block,
                        block_kv_dq=block)
  return sk.make_splash_mha(mask, block_sizes=sizes, head_shards=1, q_seq_shards=1,
                            interpret=interpret), sk.SegmentIds


def splash_attention(q_BLHK, k_BSHK, v_BSHK, q_segment_ids_BL, kv_segment_ids_BS,
                     batch_axes=("data", "fsdp"), head_axis="tensor", interpret=None):
  """Pallas splash attention (TPU). Self-attention only (L == S, indices = arange)."""
  _, L, H, K = q_BLHK.shape
  interpret = _splash_interpret() if interpret is None else interpret
  kernel, SegmentIds = _splash_kernel(L, H, interpret)
  scale = K ** -0.5

  def per_shard(q_BHLK, k_BHSK, v_BHSK, qs_BL, ks_BS):
    segments = SegmentIds(q=qs_BL, kv=ks_BS)
    one = lambda q, k, v, s: kernel(q, k, v, segment_ids=s)
    return jax.vmap(one)(q_BHLK * scale, k_BHSK, v_BHSK, segments)

  to_bhlk = lambda x: jnp.swapaxes(x, 1, 2)
  mesh = jax.sharding.get_abstract_mesh()
  if mesh.empty:
    out_BHLK = per_shard(to_bhlk(q_BLHK), to_bhlk(k_BSHK), to_bhlk(v_BSHK), q_segment_ids_BL,
                         kv_segment_ids_BS)
  else:
    qkv = P(batch_axes, head_axis, None, None)
    seg = P(batch_axes, None)
    out_BHLK = jax.shard_map(per_shard, mesh=mesh, in_specs=(qkv, qkv, qkv, seg, seg),
                             out_specs=qkv, check_vma=False)(
                                 to_bhlk(q_BLHK), to_bhlk(k_BSHK), to_bhlk(v_BSHK),
                                 q_segment_ids_BL, kv_segment_ids_BS)
  return to_bhlk(out_BHLK)


def attention(q_BLHK, k_BSHK, v_BSHK, q_segment_ids_BL, kv_segment_ids_BS,
              q_index_BL=None, kv_index_BS=None, backend: str = "xla"):
  """Masked multi-head attention; see the module docstring. Returns [B, L, H, K] in q's dtype.

  `q_index_BL` / `kv_index_BS` default to `arange` (plain self-attention over a packed row).
  """
  B, L = q_BLHK.shape[:2]
  S = k_BSHK.shape[1]
  self_attention = q_index_BL is None and kv_index_BS is None
  if q_index_BL is None:
    q_index_BL = jnp.broadcast_to(jnp.arange(L, dtype=jnp.int32), (B, L))
  if kv_index_BS is None:
    kv_index_BS = jnp.broadcast_to(jnp.arange(S, dtype=jnp.int32), (B, S))
  backend = resolve_backend(backend)
  if backend == "splash" and self_attention and L == S:
    return splash_attention(q_BLHK, k_BSHK, v_BSHK, q_segment_ids_BL, kv_segment_ids_BS)
  half = q_BLHK.dtype in (jnp.bfloat16, jnp.float16)
  if backend == "cudnn_packed" and half and self_attention and L == S:
    return cudnn_packed_attention(q_BLHK, k_BSHK, v_BSHK, q_segment_ids_BL)
  mask_BLS = attention_mask(q_segment_ids_BL, kv_segment_ids_BS, q_index_BL, kv_index_BS)
  if backend in ("cudnn", "cudnn_packed") and half:
    return cudnn_attention(q_BLHK, k_BSHK, v_BSHK, mask_BLS,
                           is_causal=self_attention and L == S)
  if self_attention and L == S and L > XLA_CHUNK:
    return chunked_causal_attention(q_BLHK, k_BSHK, v_BSHK, mask_BLS, XLA_CHUNK)
  return xla_attention(q_BLHK, k_BSHK, v_BSHK, mask_BLS)

"""The compiled sampler: prefill, then jitted `lax.while_loop`s over a static KV cache.

One program: the prefill, then the decode loop in a few cache windows (`cache_windows`), each
a `lax.while_loop` over a cache just long enough for its steps, grown between windows.

Guidance streams run in one batch. With S streams and B prompts the cache holds S*B rows:

    stream 0: the full (conditional) prompt              -- always
    stream 1: the unconditional prompt (text -> <mask:0>) -- CFG, CD-K, mixed pools
    stream 2: the image-only-conditional prompt           -- two-weight (editing) guidance

Every step combines the streams' logits into one score per token (plain, CFG, two-weight CFG,
or CD-K, chosen per row for "mixed" pools), applies the modality constraints, samples one token
per prompt and feeds it to every stream. No Python runs per token.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from cm3leon_jax.decode import constraints as C
from cm3leon_jax.decode.cache import (KVCache, forward_cached, grow, init_cache, layer_params,
                                     uses_attention_kernel, uses_matvec)
from cm3leon_jax.decode.cdk import cdk_scores
from cm3leon_jax.decode.guidance import cfg, cfg_two
from cm3leon_jax.decode.sampling import sample, top_k_filter, top_p_filter
from cm3leon_jax.errors import InputError
from cm3leon_jax.model import matvec as MV
from cm3leon_jax.model.attention import KERNEL_CACHE_MULTIPLE
from cm3leon_jax.model.decoder import Decoder
from cm3leon_jax.tokenizers.vocab import Vocab


@dataclasses.dataclass(frozen=True)
class SamplerSpec:
  """The static part of a decode call (changing it recompiles)."""
  num_streams: int = 1            # 1 plain, 2 CFG / CD-K, 3 two-weight guidance
  max_new_tokens: int = 64
  tokens_per_image: int = 1024
  top_k: int = 0
  cdk_k: int = 8
  allow_images: bool = True       # may text open a new image with <break>
  allow_text: bool = True
  stop_after_image: bool = False  # text-to-image: stop once the image is closed
  # New tokens per cache window (0: one window). The loop runs in windows of about this many
  # steps, each attending a cache only as long as the window needs (`cache_windows`).
  cache_window: int = 256
  # While every row is inside an image, multiply only the image codes' rows of the LM head
  # (`step_logits`) and top-k / top-p filter only their columns (`_filter`); False: always the
  # whole head and vocabulary (same tokens, for tests and measurements).
  image_head: bool = True


class SamplerKnobs(NamedTuple):
  """The dynamic part (arrays; changing them does not recompile). Per-prompt where [B]."""
  temperature_B: jax.Array
  top_p_B: jax.Array
  use_cdk_B: jax.Array     # bool: CD-K for this row instead of guided top-p
  cfg_weight: jax.Array    # scalar: 2-stream guidance weight
  image_weight: jax.Array  # scalar: 3-stream guidance
  text_weight: jax.Array
  cdk_alpha: jax.Array


def make_knobs(batch: int, temperature=1.0, top_p=1.0, use_cdk=False, cfg_weight=1.0,
               image_weight=1.5, text_weight=7.5, cdk_alpha=0.1) -> SamplerKnobs:
  """Validate and broadcast knobs; bad values are InputErrors before anything compiles."""
  t = np.broadcast_to(np.asarray(temperature, np.float32), (batch,))
  p = np.broadcast_to(np.asarray(top_p, np.float32), (batch,))
  if (t < 0).any():
    raise InputError(f"decoding.temperature={temperature}: must be >= 0")
  if ((p <= 0) | (p > 1)).any():
    raise InputError(f"decoding.top_p={top_p}: must lie in (0, 1]")
  for name, w in (("cfg_weight", cfg_weight), ("image_weight", image_weight),
                  ("text_weight", text_weight)):
    if w < 0:
      raise InputError(f"decoding.{name}={w}: guidance weights must be >= 0")
  if not 0 < cdk_alpha <= 1:
    raise InputError(f"decoding.cdk_alpha={cdk_alpha}: must lie in (0, 1]")
  return SamplerKnobs(jnp.asarray(t), jnp.asarray(p),
                      jnp.broadcast_to(jnp.asarray(use_cdk, bool), (batch,)),
                      jnp.float32(cfg_weight), jnp.float32(image_weight),
                      jnp.float32(text_weight), jnp.float32(cdk_alpha))


class Prompts(NamedTuple):
  """Left-padded prompts of all streams: [S*B, P] ids, segment ids (0 = padding), positions."""
  ids: np.ndarray
  segment_ids: np.ndarray
  positions: np.ndarray
  lengths_B: np.ndarray  # stream-0 prompt lengths (the constraint state's positions)
  image_index: np.ndarray | None = None  # [S*B, P] image indices (-1 on padding), if given


def pad_prompts(streams: list[list[np.ndarray]], seq_len: int, max_new_tokens: int,
                image_index: list[list[np.ndarray]] | None = None) -> Prompts:
  """streams[s][b] = 1-D ids of prompt b in stream s -> one left-padded [S*B, P] batch.
  image_index: the prompts' image indices, shaped like `streams` (None: counted from the ids)."""
  rows = [np.asarray(p, np.int32) for stream in streams for p in stream]
  width = max(len(r) for r in rows)
  if min(len(r) for r in rows) == 0:
    raise InputError("an empty prompt: every prompt needs at least its leading <eos>")
  longest = max(len(r) for r in rows)
  if longest + max_new_tokens > seq_len:
    raise InputError(f"a prompt of {longest} tokens + {max_new_tokens} new tokens exceeds the "
                     f"model's {seq_len}-token window (model.seq_len)")
  ids = np.zeros((len(rows), width), np.int32)
  seg = np.zeros_like(ids)
  pos = np.zeros_like(ids)
  for i, r in enumerate(rows):
    ids[i, width - len(r):] = r
    seg[i, width - len(r):] = 1
    pos[i, width - len(r):] = np.arange(len(r))
  index = None
  if image_index is not None:
    index_rows = [np.asarray(x, np.int32) for stream in image_index for x in stream]
    if [len(x) for x in index_rows] != [len(r) for r in rows]:
      raise InputError("image_index must give one index per prompt token of every stream")
    index = np.full_like(ids, -1)
    for i, x in enumerate(index_rows):
      index[i, width - len(x):] = x
  return Prompts(ids, seg, pos, np.array([len(p) for p in streams[0]], np.int32), index)


def _filter(scores_BV, knobs: SamplerKnobs, spec: SamplerSpec, image_span=None):
  """top-k, then top-p. `image_span` = (image ids' start, end, inside): while `inside` (every row
  in an image, so every other id is -inf: `step_logits`) filter only the image ids' columns,
  then pad back. The same tokens survive; top-p's sort, the step's costliest op on a CPU for a
  small decoder (quickstart with joint codes: 59 of ~240 ms per 1,024-row step), then sorts the
  codebook, not the vocabulary (256 of 803 ids there; 8k of 65k at 350M). Colour-factorised
  codes skip this inside images: `_factorised_image_token` sorts G and C scores apart."""
  whole = lambda s: top_p_filter(top_k_filter(s, spec.top_k), knobs.top_p_B)
  if image_span is None:
    return whole(scores_BV)
  start, end, inside = image_span

  def image_only(s):
    pad = ((0, 0), (start, s.shape[-1] - end))
    return jnp.pad(whole(s[:, start:end]), pad, constant_values=-jnp.inf)
  return jax.lax.cond(inside, image_only, whole, scores_BV)


def _combine(logits_SBV, mask_BV, knobs: SamplerKnobs, spec: SamplerSpec, image_span=None):
  """Stream logits -> one masked score per token, [B, V]. `image_span`: see `_filter`."""
  masked = jnp.where(mask_BV[None], logits_SBV, -jnp.inf)
  cond = masked[0]
  if spec.num_streams == 1:
    guided = jax.nn.log_softmax(cond, axis=-1)
  elif spec.num_streams == 2:
    guided = cfg(cond, masked[1], knobs.cfg_weight)
  else:
    guided = cfg_two(masked[1], masked[2], cond, knobs.image_weight, knobs.text_weight)
  guided = _filter(guided, knobs, spec, image_span)
  if spec.num_streams >= 2:  # CD-K rows; computed only when a row uses it (lax.cond)
    def with_cdk(guided):
      contrastive = cdk_scores(cond, masked[1], spec.cdk_k, knobs.cdk_alpha)
      return jnp.where(knobs.use_cdk_B[:, None], contrastive, guided)
    guided = jax.lax.cond(jnp.any(knobs.use_cdk_B), with_cdk, lambda g: g, guided)
  return jnp.where(mask_BV, guided, -jnp.inf)


def cache_windows(width: int, max_new_tokens: int, window: int) -> list[int]:
  """Cache sizes of the decode loop's windows, smallest first; the last holds every slot.

  Step s of the loop (1 <= s < max_new_tokens) writes slot width + s - 1 and attends slots
  [0, width + s), so a window of size C serves the steps s <= C - width. A static-shape loop
  attends its whole cache every step: one window of width + max_new_tokens slots reads about
  twice the written slots on average; n windows read about (n + 1) / 2n of that (batch 8,
  bench preset: the cache is 2/3 of the bytes a CPU decode step reads). Each window is one
  more compiled copy of the loop body, hence windows of `window` steps, not one per step.
  """
  n = max(1, round(max_new_tokens / window)) if window > 0 else 1
  return [width + -(-max_new_tokens * j // n) for j in range(1, n + 1)]


def step_logits(model: Decoder, x_R1D: jax.Array, state: C.ModalityState, w_VD: jax.Array,
                w_image_ID: jax.Array | None, vocab: Vocab) -> jax.Array:
  """float32 logits [R, V] of one decode step from the last layer's output `x_R1D`.

  While every row is inside an image only image ids can be sampled (`constraints.allowed_mask`),
  so only the image codes' rows `w_image_ID` of the head are multiplied and every other logit is
  -inf, as the mask would make it. At the bench preset's 16k vocabulary that is half of the head,
  an eighth of the weight bytes a batch-1 step reads; at 350M (65k vocabulary, 8k codes) 17%.
  Otherwise (a row in text, closing an image, or done; `w_image_ID` None) the whole head.
  """
  full = lambda x: model.logits(x, w_VD)[:, 0]
  if w_image_ID is None:
    return full(x_R1D)

  def image_only(x):
    if uses_matvec(model, x.shape[0]):  # final LayerNorm + head rows in one kernel
      logits_RI = MV.fused_matvec(x[:, 0], w_image_ID, norm=True, out_dtype=jnp.float32)
    else:
      logits_RI = model.logits(x, w_image_ID)[:, 0]
    pad = ((0, 0), (vocab.image_start, vocab.size - vocab.image_end))
    return jnp.pad(logits_RI, pad, constant_values=-jnp.inf)

  inside = jnp.all((state.image_left_B > 0) & ~state.done_B)
  return jax.lax.cond(inside, image_only, full, x_R1D)


class _Carry(NamedTuple):
  step: jax.Array
  cache: KVCache
  tokens_B: jax.Array
  state: C.ModalityState
  rng: jax.Array
  out_BT: jax.Array
  image_index_SB: jax.Array  # image-position index of the last fed token (-1: not an image)


def _factorised_image_token(model: Decoder, x_R1D, state, rng, knobs, spec, vocab):
  """One image token per row for colour-factorised codes (model/decoder.py) while every live
  row is inside an image: its geometry and colour codes are scored, guided, filtered and sampled
  apart, token = image_start + g * C + c. The image logits are g + c, so inside an image the
  model's distribution is p(g) p(c) and guidance (linear in log-probabilities) splits exactly
  into one per factor; top-k / top-p / CD-K then act on each factor's distribution instead of
  the joint's. Costs G + C head rows and sorts G and C scores, not G x C (8,192 at the
  quickstart's 128 x 64)."""
  geo_RG, colour_RC = model.image_factor_logits(x_R1D)
  keys = jax.random.split(rng, 2)
  codes = []
  for key, logits_RF in zip(keys, (geo_RG[:, 0], colour_RC[:, 0])):
    F = logits_RF.shape[-1]
    factor_spec = dataclasses.replace(spec, top_k=min(spec.top_k, F), cdk_k=min(spec.cdk_k, F))
    logits_SBF = logits_RF.reshape(spec.num_streams, -1, F)
    everything_BF = jnp.ones(logits_SBF.shape[1:], bool)
    scores_BF = _combine(logits_SBF, everything_BF, knobs, factor_spec)
    codes.append(sample(key, scores_BF, knobs.temperature_B))
  tokens_B = vocab.image_start + codes[0] * model.cfg.image_colour_codes + codes[1]
  state = C.update(state, tokens_B, vocab, spec.tokens_per_image, spec.stop_after_image)
  return tokens_B.astype(jnp.int32), state


def _step_token(logits_SBV, state, rng, step, prompts_len_B, knobs, spec, vocab):
  positions_B = prompts_len_B + step
  # A row ends at its prompt length + max_new_tokens (never past model.seq_len: pad_prompts).
  mask_BV = C.allowed_mask(state, positions_B, vocab, spec.tokens_per_image,
                           prompts_len_B + spec.max_new_tokens, spec.allow_images,
                           spec.allow_text)
  span = None
  if spec.image_head:  # the mask allows image ids only while every live row is in an image
    inside = jnp.all((state.image_left_B > 0) & ~state.done_B)
    span = (vocab.image_start, vocab.image_end, inside)
  scores_BV = _combine(logits_SBV, mask_BV, knobs, spec, span)
  tokens_B = sample(rng, scores_BV, knobs.temperature_B)
  state = C.update(state, tokens_B, vocab, spec.tokens_per_image, spec.stop_after_image)
  return tokens_B, state


@functools.partial(jax.jit, static_argnames=("graphdef", "spec", "vocab"))
def _generate(graphdef, params, prompt_ids, prompt_seg, prompt_pos, prompt_index, lengths_B, state,
              rng, knobs, *, spec: SamplerSpec, vocab: Vocab):
  """Prefill + decode loop in one program: the cache is created, updated in place by the
  while_loop and dropped inside XLA, never copied to or from the host."""
  model = nnx.merge(graphdef, params)
  rows, width = prompt_ids.shape
  batch = rows // spec.num_streams
  sizes = cache_windows(width, spec.max_new_tokens, spec.cache_window)
  if uses_attention_kernel(model, rows):  # it reads only the written slots: one window
    sizes = [-(-sizes[-1] // KERNEL_CACHE_MULTIPLE) * KERNEL_CACHE_MULTIPLE]
  cache = init_cache(model, rows, sizes[0])
  layers = layer_params(model)  # sliced once here, not in every step of the loop
  # Colour-factorised image codes: inside an image, factor by factor; elsewhere the head's own
  # factorised logits (w_VD None; model.logits).
  factorised = bool(model.cfg.image_colour_codes) and spec.image_head
  w_VD = None if model.cfg.image_colour_codes else model.head_weight()
  w_image_ID = (w_VD[vocab.image_start:vocab.image_end]
                if spec.image_head and not factorised else None)
  if model.cfg.tokens_per_image and prompt_index is None:
    prompt_index = model.image_index(prompt_ids)  # once, for the prefill and the loop's start
  x_RPD, cache = forward_cached(model, cache, prompt_ids, prompt_pos, prompt_seg, jnp.int32(0),
                                layers, prompt_index, hidden=True)
  rng, key = jax.random.split(rng)
  # The head on the last prompt position only: [R, P, V] logits of the whole prompt were 9 GB
  # for the quickstart's 1,024 rows of ~250 tokens at 8,832 ids (colour-factorised codes).
  logits_R1V = model.logits(x_RPD[:, -1:], w_VD)
  logits_SBV = logits_R1V[:, 0].reshape(spec.num_streams, batch, -1)
  tokens_B, state = _step_token(logits_SBV, state, key, 0, lengths_B, knobs, spec, vocab)
  out_BT = jnp.full((batch, spec.max_new_tokens), vocab.pad_id, jnp.int32).at[:, 0].set(tokens_B)
  next_pos_SB = prompt_pos[:, -1] + 1  # position of the first generated token, per row
  # The index before the next image token: an infilling prompt's last sentinel carries the
  # index before its span (decode/prompts.py), so the span's codes get their raster places.
  image_index_SB = (prompt_index[:, -1] if model.cfg.tokens_per_image
                    else jnp.full((rows,), -1, jnp.int32))

  def cond_fn(c: _Carry):
    return (c.step < spec.max_new_tokens) & ~jnp.all(c.state.done_B)

  def body_fn(c: _Carry):
    rng, key = jax.random.split(c.rng)
    # Feed the last sampled token (number step-1) to every stream at slot width + step - 1.
    tokens_SB = jnp.tile(c.tokens_B, spec.num_streams)[:, None]
    positions = (next_pos_SB + c.step - 1)[:, None]
    is_image_SB = (tokens_SB[:, 0] >= vocab.image_start) & (tokens_SB[:, 0] < vocab.image_end)
    image_index_SB = jnp.where(is_image_SB, c.image_index_SB + 1, -1)
    x_R1D, cache = forward_cached(model, c.cache, tokens_SB, positions,
                                  jnp.ones_like(tokens_SB), width + c.step - 1, layers,
                                  image_index_SB[:, None], hidden=True)
    def any_token(x_R1D, state):
      logits_RV = step_logits(model, x_R1D, state, w_VD, w_image_ID, vocab)
      logits_SBV = logits_RV.reshape(spec.num_streams, batch, -1)
      return _step_token(logits_SBV, state, key, c.step, lengths_B, knobs, spec, vocab)

    if factorised:
      inside = jnp.all((c.state.image_left_B > 0) & ~c.state.done_B)
      tokens_B, state = jax.lax.cond(
          inside, lambda x, st: _factorised_image_token(model, x, st, key, knobs, spec, vocab),
          any_token, x_R1D, c.state)
    else:
      tokens_B, state = any_token(x_R1D, c.state)
    out_BT = c.out_BT.at[:, c.step].set(tokens_B)
    return _Carry(c.step + 1, cache, tokens_B, state, rng, out_BT, image_index_SB)

  carry = _Carry(jnp.int32(1), cache, tokens_B, state, rng, out_BT, image_index_SB)
  for size in sizes:  # one loop per cache window; a finished batch skips the rest at once
    carry = carry._replace(cache=grow(model, carry.cache, size))
    last_step = size - width
    carry = jax.lax.while_loop(lambda c, last=last_step: cond_fn(c) & (c.step <= last),
                               body_fn, carry)
  return carry.out_BT, carry.state.done_B


def generate(model: Decoder, vocab: Vocab, streams: list[list[np.ndarray]], spec: SamplerSpec,
             knobs: SamplerKnobs, rng: jax.Array, state: C.ModalityState | None = None,
             image_index: list[list[np.ndarray]] | None = None):
  """Sample `spec.max_new_tokens` tokens after each prompt.

  `streams` holds `spec.num_streams` lists of B prompts (1-D global ids, each starting with
  `<eos>`). `image_index`: the prompts' image indices, shaped like `streams` (CM3 prompts whose
  codes are not in raster order, e.g. `prompts.image_infill`); None counts them from the ids.
  Returns (tokens [B, max_new_tokens] int32 padded with `<pad>` after a row ends, done [B]
  bool).
  """
  if len(streams) != spec.num_streams:
    raise InputError(f"{len(streams)} prompt streams given, the sampler expects "
                     f"{spec.num_streams}")
  if len({len(s) for s in streams}) != 1:
    raise InputError("every guidance stream needs one prompt per batch row")
  if spec.max_new_tokens < 1:
    raise InputError(f"max_new_tokens={spec.max_new_tokens}: must be >= 1")
  if spec.top_k < 0:
    raise InputError(f"decoding.top_k={spec.top_k}: must be >= 0 (0 = off)")
  if spec.num_streams >= 2 and spec.cdk_k < 1:
    raise InputError(f"decoding.cdk_k={spec.cdk_k}: must be >= 1")
  if spec.cache_window < 0:
    raise InputError(f"decoding.cache_window={spec.cache_window}: must be >= 0 (0 = one window)")
  prompts = pad_prompts(streams, model.cfg.seq_len, spec.max_new_tokens, image_index)
  batch = len(streams[0])
  if state is None:
    stream0 = np.stack([np.roll(row, n) for row, n in zip(prompts.ids[:batch], prompts.lengths_B)])
    state = C.initial_state(vocab, stream0, prompts.lengths_B, spec.tokens_per_image)
  graphdef, params = nnx.split(model)
  index = None if prompts.image_index is None else jnp.asarray(prompts.image_index)
  out_BT, done_B = _generate(graphdef, params, prompts.ids, prompts.segment_ids, prompts.positions,
                             index, jnp.asarray(prompts.lengths_B), state, rng, knobs, spec=spec,
                             vocab=vocab)
  return np.asarray(out_BT), np.asarray(done_B)

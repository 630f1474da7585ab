"""The CM3 objective as a data transform on one sequence (REFERENCE.md section 2).

    <eos> a b c <break> I1 I2 I3 I4 <break> d e <eos>          (n = 2 spans: "b c", "I2 I3")
 -> <eos> a <mask:0> <break> I1 <mask:1> I4 <break> d e <eos>
    <infill> <mask:0> b c <mask:1> I2 I3 <eos>

- the number of spans n ~ Poisson(rate) clamped to [min_spans, max_spans] and never above
  the number of sentinels; n = 0 leaves the sequence untouched (plain causal LM);
- span endpoints are drawn uniformly over the maskable tokens (text and image ids) and the
  spans never overlap;
- a span lies wholly inside one text run or one image's codes: it never covers `<break>`,
  `<eos>` or any other special token, so every body image keeps both its `<break>`s and its
  N codes are exactly the body's codes plus the codes of the spans moved out of it;
- the loss ignores sentinel targets (they sit at random places) and padding;
- every image code keeps its raster index in its image (`masked_image_index`): once spans move,
  a code's place in the token stream no longer says where it sits in the image, so the
  pipeline hands the index to the model (`model.image_positions`) beside the ids.

Pure numpy; the only randomness comes from the `np.random.Generator` passed in, so a
per-example generator (Grain's `random_map`) makes the transform reproducible and resumable.
Costs O(L) numpy work plus O(n) Python steps; no per-token Python.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np

from cm3leon_jax.errors import InputError
from cm3leon_jax.tokenizers.vocab import Vocab

_SPECIAL, _TEXT, _IMAGE = 0, 1, 2


def max_spans(config) -> int:
  """The largest span count the config allows: `cm3_max_spans`, capped by the sentinels."""
  return max(0, min(int(config.data.cm3_max_spans), int(config.vocab.num_sentinels)))


def overhead(num_spans: int) -> int:
  """Tokens the transform adds for `num_spans` spans: n body sentinels, `<infill>`, n tail
  sentinels and the closing `<eos>` (0 when nothing is masked)."""
  return 2 * num_spans + 2 if num_spans > 0 else 0


def sample_num_spans(rng: np.random.Generator, rate: float, min_spans: int, max_spans_: int,
                     num_sentinels: int) -> int:
  """n ~ Poisson(rate), clamped to [min_spans, max_spans_] and to the sentinels available."""
  upper = min(int(max_spans_), int(num_sentinels))
  lower = min(max(int(min_spans), 0), upper)
  n = int(rng.poisson(rate)) if rate > 0 else 0
  return int(np.clip(n, lower, upper))


def token_classes(ids_L: np.ndarray, vocab: Vocab) -> np.ndarray:
  """Per token: 0 special (incl. sentinels and unused ids), 1 text, 2 image; int8 [L]."""
  cls_L = np.zeros(ids_L.shape, np.int8)
  cls_L[vocab.is_text(ids_L)] = _TEXT
  cls_L[vocab.is_image(ids_L)] = _IMAGE
  return cls_L


def run_ends(cls_L: np.ndarray) -> np.ndarray:
  """For each position, the (inclusive) last index of its run of equal token class; int64 [L].

  A run of maskable tokens is a maximal stretch of one class: one text run or one image's
  codes (images are fenced by `<break>`, text by specials), so a span clipped to its run
  cannot cross a segment.
  """
  L = len(cls_L)
  if L == 0:
    return np.zeros(0, np.int64)
  last_of_run = np.flatnonzero(np.append(cls_L[1:] != cls_L[:-1], True))
  run_index_L = np.concatenate([[0], np.cumsum(cls_L[1:] != cls_L[:-1])])
  return last_of_run[run_index_L]


def choose_spans(ids_L: np.ndarray, num_spans: int, rng: np.random.Generator,
                 vocab: Vocab) -> tuple[np.ndarray, np.ndarray]:
  """Pick up to `num_spans` disjoint spans; returns sorted half-open (starts, ends) int64.

  2n distinct endpoints are drawn uniformly among the maskable tokens and paired in order;
  a span whose right endpoint lies in another run is cut at the end of its left endpoint's
  run. Pairs of distinct sorted points never overlap, and cutting only shrinks them. Fewer
  than 2n maskable tokens give floor(count / 2) spans.
  """
  cls_L = token_classes(ids_L, vocab)
  maskable = np.flatnonzero(cls_L != _SPECIAL)
  n = min(int(num_spans), len(maskable) // 2)
  if n <= 0:
    return np.zeros(0, np.int64), np.zeros(0, np.int64)
  picks = np.sort(rng.choice(len(maskable), size=2 * n, replace=False))
  points = maskable[picks].reshape(n, 2)
  starts = points[:, 0]
  ends = np.minimum(points[:, 1], run_ends(cls_L)[starts]) + 1
  return starts.astype(np.int64), ends.astype(np.int64)


def image_index(ids_L: np.ndarray, vocab: Vocab) -> np.ndarray:
  """Each image token's raster index inside its image (runs of image ids count from 0), -1 on
  every other token; int32 [L]. Exact for unmasked sequences, where every image is whole; the
  numpy twin of `Decoder.image_index`."""
  is_image = vocab.is_image(np.asarray(ids_L))
  count = np.cumsum(is_image, dtype=np.int64)
  last_other = np.maximum.accumulate(np.where(is_image, 0, count)) if len(count) else count
  return np.where(is_image, count - last_other - 1, -1).astype(np.int32)


def _layout(values_L: np.ndarray, starts: np.ndarray, ends: np.ndarray, sentinels: Sequence,
            infill, eos) -> np.ndarray:
  """The CM3 rearrangement of any per-token array: span i replaced by `sentinels[i]` in the
  body, then `infill`, `sentinels[0]` span_0 ..., `eos` (nothing moves when there are no spans)."""
  if len(starts) == 0:
    return values_L.copy()
  body, tail, previous = [], [[infill]], 0
  for i, (start, end) in enumerate(zip(np.asarray(starts).tolist(), np.asarray(ends).tolist())):
    body += [values_L[previous:start], [sentinels[i]]]
    tail += [[sentinels[i]], values_L[start:end]]
    previous = end
  body.append(values_L[previous:])
  return np.concatenate(body + tail + [[eos]]).astype(values_L.dtype)


def span_sources(length: int, starts: np.ndarray, ends: np.ndarray) -> np.ndarray:
  """Where each token of `apply_spans`'s output comes from: its position in the unmasked
  sequence of `length` tokens, or -1 for the sentinels, `<infill>` and `<eos>` it adds; int64."""
  return _layout(np.arange(length, dtype=np.int64), starts, ends, [-1] * len(starts), -1, -1)


def masked_image_index(ids_L: np.ndarray, starts: np.ndarray, ends: np.ndarray,
                       vocab: Vocab) -> np.ndarray:
  """The image index of every token of `apply_spans(ids_L, starts, ends)`: an image code keeps
  its raster index in its image wherever the transform moves it (the rest of the body after a
  sentinel, or the span in the tail); -1 elsewhere. int32 [L + 2n + 2]."""
  index = image_index(ids_L, vocab)
  source = span_sources(len(index), starts, ends)
  return np.where(source >= 0, index[np.maximum(source, 0)], -1).astype(np.int32)


def apply_spans(ids_L: np.ndarray, starts: np.ndarray, ends: np.ndarray,
                vocab: Vocab) -> np.ndarray:
  """Replace span i by `<mask:i>` in place and append `<infill> <mask:0> span_0 ... <eos>`."""
  ids_L = np.asarray(ids_L, np.int32)
  n = len(starts)
  if n == 0:
    return ids_L.copy()
  if n > vocab.num_sentinels:
    raise InputError(f"{n} spans need {n} sentinels; the vocabulary has {vocab.num_sentinels}")
  return _layout(ids_L, starts, ends, [vocab.sentinel_id(i) for i in range(n)], vocab.infill_id,
                 vocab.eos_id)


def mask(ids_L: np.ndarray, num_spans: int, rng: np.random.Generator, vocab: Vocab) -> np.ndarray:
  """The CM3 transform of one sequence with (up to) `num_spans` spans; int32 [L + 2n + 2]."""
  starts, ends = choose_spans(np.asarray(ids_L), num_spans, rng, vocab)
  return apply_spans(ids_L, starts, ends, vocab)


def mask_with_index(ids_L: np.ndarray, num_spans: int, rng: np.random.Generator,
                    vocab: Vocab) -> tuple[np.ndarray, np.ndarray]:
  """`mask` and the masked sequence's image index (`masked_image_index`), both int32."""
  starts, ends = choose_spans(np.asarray(ids_L), num_spans, rng, vocab)
  return (apply_spans(ids_L, starts, ends, vocab),
          masked_image_index(np.asarray(ids_L), starts, ends, vocab))


def unmask(ids_M: np.ndarray, vocab: Vocab) -> np.ndarray:
  """Inverse of `mask`: move every span back in place of its sentinel; int32.

  A sequence without `<infill>` is returned unchanged (it was never masked). Raises
  InputError if the tail does not name the body's sentinels in order.
  """
  ids_M = np.asarray(ids_M, np.int32)
  infill = np.flatnonzero(ids_M == vocab.infill_id)
  if len(infill) == 0:
    return ids_M.copy()
  k = int(infill[0])
  body, tail = ids_M[:k], ids_M[k + 1:]
  if len(tail) == 0 or tail[-1] != vocab.eos_id:
    raise InputError("a CM3 tail must end with <eos>")
  tail = tail[:-1]
  body_at = np.flatnonzero(vocab.is_sentinel(body))
  tail_at = np.flatnonzero(vocab.is_sentinel(tail))
  n = len(body_at)
  expected = np.arange(n) + vocab.sentinel_start
  if (n == 0 or len(tail_at) != n or tail_at[0] != 0
      or not np.array_equal(body[body_at], expected)
      or not np.array_equal(tail[tail_at], expected)):
    raise InputError("the CM3 tail does not match the body's sentinels <mask:0>..<mask:n-1>")
  spans = np.split(tail, tail_at[1:])  # each starts with its sentinel
  parts, previous = [], 0
  for at, span in zip(body_at.tolist(), spans):
    parts += [body[previous:at], span[1:]]
    previous = at + 1
  parts.append(body[previous:])
  return np.concatenate(parts).astype(np.int32)


def loss_weights(targets_L: np.ndarray, vocab: Vocab) -> np.ndarray:
  """1.0 per target, 0.0 on sentinel targets and padding; float32 [L]."""
  targets_L = np.asarray(targets_L)
  return (~(vocab.is_sentinel(targets_L) | (targets_L == vocab.pad_id))).astype(np.float32)

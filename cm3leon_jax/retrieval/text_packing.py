"""Several tokenised texts per row of the text tower (sequence packing), for encoder training.

Why: the text tower costs about as much per token as it does per padding slot, and Shapes
captions average 22 of the quickstart's 40 tokens: with a caption and its hard negative per
pair, the text tower was 54% of the quickstart encoder's train step (180 of 335 ms, fwd + bwd),
and half of its slots were padding. Packed, the same texts fill ~40% fewer slots.

How: best-fit decreasing (longest text first, into the fullest row that still has room) into
rows as long as the longest allowed text (`text_max_len`), so every text fits in one row; the
row count is rounded up (`round_rows`: to 1/8 of its power of two, at least 8, and to a
multiple of the process's devices) so that a few shapes compile, not one per batch: the
quickstart's 256 captions + 256 negatives packed into 288, 320 or 352 rows of 40 in 63, 497
and 40 of its first 600 batches (three compilations of the step, ~5 s each on a 2-core CPU). Each
token carries its segment (1, 2, ... within its row; 0 = padding), its position inside its
text, and its owner (the text's index in the step's output; `num_texts` = padding), which is
what the tower needs to attend within a text only and to mean-pool per text
(`DualEncoder.embed_packed_text`). A text with no tokens (an absent hard negative) owns no
slot: its embedding pools nothing (`info_nce` leaves it out by its valid flag).
"""

from __future__ import annotations

import math

import numpy as np

from cm3leon_jax.errors import InputError


def rows_needed(lengths_N: np.ndarray, length: int) -> np.ndarray:
  """Best-fit decreasing: the row of each text (-1 for empty ones), rows numbered 0.."""
  lengths_N = np.asarray(lengths_N, np.int64)
  if lengths_N.size and (lengths_N.max() > length or lengths_N.min() < 0):
    raise InputError(f"text packing: a text of {lengths_N.max()} tokens does not fit rows of "
                     f"{length} (retrieval.text_max_len)")
  row_N = np.full(lengths_N.shape, -1, np.int64)
  # open rows by the room they have left: room -> rows (a stack; any row with that room fits)
  by_room: list[list[int]] = [[] for _ in range(length + 1)]
  rows = 0
  for i in np.argsort(-lengths_N, kind="stable"):
    n = int(lengths_N[i])
    if n == 0:
      break  # sorted: only empty texts remain
    room = next((r for r in range(n, length + 1) if by_room[r]), None)
    if room is None:
      row, room = rows, length
      rows += 1
    else:
      row = by_room[room].pop()
    row_N[i] = row
    if room - n > 0:
      by_room[room - n].append(row)
  return row_N


def round_rows(used: int, devices: int = 1) -> int:
  """`used` rows rounded up to 1/8 of its power of two (at least 8), then to a multiple of
  `devices`: 3 -> 8, 100 -> 104, 293 -> 320, 600 -> 640."""
  granule = max(8, (1 << max(int(used), 1).bit_length() - 1) // 8)
  multiple = math.lcm(granule, int(devices))
  return max(-(-int(used) // multiple), 1) * multiple


def pack(ids_NL: np.ndarray, mask_NL: np.ndarray, owners_N: np.ndarray, num_texts: int,
         devices: int = 1) -> dict[str, np.ndarray]:
  """Texts [N, L] (left-aligned tokens, as `encoder.tokenize` writes them) -> packed rows
  {'ids', 'segments', 'positions', 'owners'}, each [R, L] int32, R = `round_rows` of the rows
  used. `owners_N`: each text's index in the step's output (< num_texts)."""
  ids_NL, mask_NL = np.asarray(ids_NL), np.asarray(mask_NL, bool)
  n, length = ids_NL.shape
  lengths_N = mask_NL.sum(1)
  if not np.array_equal(mask_NL, np.arange(length)[None] < lengths_N[:, None]):
    raise InputError("text packing: masks must cover each text's first tokens (left-aligned)")
  row_N = rows_needed(lengths_N, length)
  used = int(row_N.max()) + 1 if n else 0
  rows = round_rows(used, devices)
  # Each text's first column in its row: the lengths of the texts placed in that row before it.
  start_N = np.zeros(n, np.int64)
  filled = np.zeros(rows, np.int64)
  segment_N = np.zeros(n, np.int64)
  count = np.zeros(rows, np.int64)
  for i in np.flatnonzero(row_N >= 0):
    r = row_N[i]
    start_N[i], filled[r] = filled[r], filled[r] + lengths_N[i]
    count[r] += 1
    segment_N[i] = count[r]
  text_T = np.repeat(np.arange(n), lengths_N)  # every real token's text
  within_T = np.arange(text_T.size) - np.repeat(np.cumsum(lengths_N) - lengths_N, lengths_N)
  row_T, col_T = row_N[text_T], start_N[text_T] + within_T
  out = {"ids": np.zeros((rows, length), np.int32),
         "segments": np.zeros((rows, length), np.int32),
         "positions": np.zeros((rows, length), np.int32),
         "owners": np.full((rows, length), num_texts, np.int32)}
  out["ids"][row_T, col_T] = ids_NL[text_T, within_T]
  out["segments"][row_T, col_T] = segment_N[text_T]
  out["positions"][row_T, col_T] = within_T
  out["owners"][row_T, col_T] = np.asarray(owners_N)[text_T]
  return out


def pad_rows(packed: dict[str, np.ndarray], rows: int, num_texts: int) -> dict[str, np.ndarray]:
  """`packed` with empty rows appended up to `rows` (processes of one step must agree)."""
  extra = rows - packed["ids"].shape[0]
  if extra <= 0:
    return packed
  fill = {"owners": num_texts}
  return {k: np.concatenate([v, np.full((extra, v.shape[1]), fill.get(k, 0), v.dtype)])
          for k, v in packed.items()}

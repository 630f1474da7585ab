"""Prompts for every decoding task, with their unconditional (guidance) counterparts.

All prompts are global ids starting with `<eos>` (REFERENCE.md section 1). Retrieved documents,
when given, precede the query as in training: `<eos> doc_1 <eos> doc_2 <eos> query...`, and the
unconditional stream keeps them (it drops only the query's text, replaced by `<mask:0>`,
REFERENCE.md section 5), so guidance contrasts the caption, not the retrieved context.

CM3 infilling prompts follow the transform in `data/cm3.py`: the body with `<mask:0>` in place
of the missing span, its closing `<eos>`, then `<infill> <mask:0>`; the model writes the span and
`<eos>`.
"""

from __future__ import annotations

from typing import NamedTuple, Sequence

import numpy as np

from cm3leon_jax.errors import InputError
from cm3leon_jax.tokenizers.vocab import Document, ImageSegment, TextSegment, Vocab


class Prompt(NamedTuple):
  cond: np.ndarray            # the full prompt
  uncond: np.ndarray | None   # the text replaced by <mask:0> (guidance / CD-K amateur)
  image_span: int = -1        # image infilling: number of image tokens to write, else -1
  # Image indices of `cond` where its codes are not in raster order (image infilling; the
  # final sentinel holds the index before the span); None: counted from the ids.
  image_index: np.ndarray | None = None


def _context(vocab: Vocab, retrieved: Sequence[Document]) -> list[np.ndarray]:
  return [vocab.documents_to_ids(retrieved)]  # "<eos> doc <eos> doc <eos>" or just "<eos>"


def _check_codes(codes, tokens_per_image: int, what: str) -> np.ndarray:
  codes = np.asarray(codes)
  if codes.ndim != 1 or codes.size != tokens_per_image:
    raise InputError(f"{what}: an image prompt needs exactly {tokens_per_image} codes, got shape "
                     f"{codes.shape}")
  return codes


def text_to_image(vocab: Vocab, caption_tokens: np.ndarray, retrieved: Sequence[Document] = ()
                  ) -> Prompt:
  """`<eos> caption <break>` -> the model writes N image tokens and the closing `<break>`."""
  if len(caption_tokens) == 0:
    raise InputError("text-to-image: empty caption")
  ctx = _context(vocab, retrieved)
  brk = np.array([vocab.break_id], np.int32)
  cond = np.concatenate(ctx + [vocab.text_to_ids(caption_tokens), brk])
  uncond = np.concatenate(ctx + [np.array([vocab.sentinel_id(0)], np.int32), brk])
  return Prompt(cond.astype(np.int32), uncond.astype(np.int32))


def image_to_text(vocab: Vocab, codes, tokens_per_image: int, infill: bool = False,
                  retrieved: Sequence[Document] = ()) -> Prompt:
  """Captioning. Causal: `<eos> <break> I <break>` -> text `<eos>`. CM3 infilling:
  `<eos> <mask:0> <break> I <break> <eos> <infill> <mask:0>` -> text `<eos>`."""
  image_ids = vocab.image_to_ids(_check_codes(codes, tokens_per_image, "image-to-text"))
  ctx = _context(vocab, retrieved)
  brk = np.array([vocab.break_id], np.int32)
  mask0 = np.array([vocab.sentinel_id(0)], np.int32)
  if infill:
    tail = np.array([vocab.eos_id, vocab.infill_id, vocab.sentinel_id(0)], np.int32)
    cond = np.concatenate(ctx + [mask0, brk, image_ids, brk, tail])
  else:
    cond = np.concatenate(ctx + [brk, image_ids, brk])
  return Prompt(cond.astype(np.int32), None)


def image_infill(vocab: Vocab, caption_tokens: np.ndarray | None, codes, region_mask,
                 tokens_per_image: int) -> Prompt:
  """Regenerate the image tokens where `region_mask` is True (one contiguous run in raster
  order, e.g. a band of rows): `<eos> caption <break> I_keep <mask:0> I_keep <break> <eos>
  <infill> <mask:0>` -> exactly that many image tokens, then `<eos>`."""
  codes = _check_codes(codes, tokens_per_image, "image infilling")
  region = np.asarray(region_mask, bool).reshape(-1)
  if region.shape != codes.shape or not region.any():
    raise InputError("image infilling: the region mask must match the codes and select some")
  where = np.flatnonzero(region)
  if (np.diff(where) != 1).any():
    raise InputError("image infilling: the region must be one contiguous run of codes "
                     "(CM3 masks one span per sentinel)")
  start, end = int(where[0]), int(where[-1]) + 1
  image_ids = vocab.image_to_ids(codes)
  parts = [np.array([vocab.eos_id], np.int32)]
  # The unconditional stream drops the caption (a sentinel in its place would have to come
  # before <mask:0> in CM3's order and renumber the span).
  uncond_parts = list(parts)
  if caption_tokens is not None and len(caption_tokens):
    parts.append(vocab.text_to_ids(caption_tokens))
  body = [np.array([vocab.break_id], np.int32), image_ids[:start],
          np.array([vocab.sentinel_id(0)], np.int32), image_ids[end:],
          np.array([vocab.break_id, vocab.eos_id, vocab.infill_id, vocab.sentinel_id(0)], np.int32)]
  cond = np.concatenate(parts + body).astype(np.int32)
  uncond = np.concatenate(uncond_parts + body).astype(np.int32) if len(parts) > 1 else None
  before_image = sum(len(p) for p in parts) + 1  # <eos>, the caption, <break>
  index = np.concatenate([np.full(before_image, -1), np.arange(start), [-1],
                          np.arange(end, len(codes)), [-1, -1, -1, start - 1]]).astype(np.int32)
  return Prompt(cond, uncond, image_span=end - start, image_index=index)


def text_infill(vocab: Vocab, before_tokens: np.ndarray, after_tokens: np.ndarray) -> Prompt:
  """`<eos> before <mask:0> after <eos> <infill> <mask:0>` -> the missing text, `<eos>`."""
  parts = [np.array([vocab.eos_id], np.int32)]
  if len(before_tokens):
    parts.append(vocab.text_to_ids(before_tokens))
  parts.append(np.array([vocab.sentinel_id(0)], np.int32))
  if len(after_tokens):
    parts.append(vocab.text_to_ids(after_tokens))
  parts.append(np.array([vocab.eos_id, vocab.infill_id, vocab.sentinel_id(0)], np.int32))
  return Prompt(np.concatenate(parts).astype(np.int32), None)


def continuation(vocab: Vocab, document: Document, retrieved: Sequence[Document] = ()) -> Prompt:
  """Mixed-modal continuation: `<eos> doc...` without its closing `<eos>`."""
  ids = vocab.documents_to_ids(list(retrieved) + [list(document)])
  return Prompt(ids[:-1].astype(np.int32), None)


def caption_document(caption_tokens: np.ndarray, codes: np.ndarray) -> list:
  """The caption-image document layout used by training and retrieval."""
  return [TextSegment(np.asarray(caption_tokens)), ImageSegment(np.asarray(codes))]

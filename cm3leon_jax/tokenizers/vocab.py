"""The shared vocabulary: the one owner of every token id.

Layout (REFERENCE.md section 1, DESIGN.md "Shared vocabulary"):

    [specials: <pad> <eos> <break> <infill> <unk>]
    [sentinels: <mask:0> .. <mask:S-1>]
    [text: the text tokenizer's ids, offset]
    [image: the VQ codebook's codes, offset]
    [padding: unused ids up to a multiple of `pad_multiple`]

Documents are lists of segments holding *local* ids (text-tokenizer ids or VQ codes);
`Vocab` turns them into global ids and back. Serialisation of a sequence of documents:

    <eos> doc_0 <eos> doc_1 <eos> ...

where inside a document every image is written `<break> I_1 ... I_N <break>` and text
segments are written as they are. Nothing else in the package hard-codes an id.
"""

from __future__ import annotations

import dataclasses
from typing import Iterable, Sequence, Union

import numpy as np

from cm3leon_jax.errors import InputError

SPECIAL_TOKENS = ("<pad>", "<eos>", "<break>", "<infill>", "<unk>")


def colour_codes(vq_config) -> int:
  """C: colour codes per cell (0: joint codes, one codebook; tokenizers/colour_codes.py)."""
  return int(vq_config.get("colour_codes", 0))


def num_tokens(vq_config) -> int:
  """Image token ids the VQ emits: codebook_size, times colour_codes when factorised."""
  return int(vq_config.codebook_size) * max(1, colour_codes(vq_config))


@dataclasses.dataclass(frozen=True, eq=False)
class TextSegment:
  """A run of text-tokenizer ids (local ids in [0, text_size))."""
  tokens: np.ndarray

  def __eq__(self, other):
    return isinstance(other, TextSegment) and np.array_equal(self.tokens, other.tokens)

  def __repr__(self):
    return f"TextSegment({np.asarray(self.tokens).tolist()})"


@dataclasses.dataclass(frozen=True, eq=False)
class ImageSegment:
  """One image as its flattened grid of VQ codes (local codes in [0, image_size))."""
  codes: np.ndarray

  def __eq__(self, other):
    return isinstance(other, ImageSegment) and np.array_equal(self.codes, other.codes)

  def __repr__(self):
    return f"ImageSegment({np.asarray(self.codes).tolist()})"


Segment = Union[TextSegment, ImageSegment]
Document = Sequence[Segment]


def _round_up(n: int, multiple: int) -> int:
  return -(-n // multiple) * multiple


@dataclasses.dataclass(frozen=True)
class Vocab:
  """Id layout for `text_size` text ids, `image_size` image codes and `num_sentinels` masks.

  `size` is the embedding-table size: the used ids rounded up to `pad_multiple`, or an
  explicit size (which must hold every used id).
  """
  text_size: int
  image_size: int
  num_sentinels: int = 16
  pad_multiple: int = 128
  explicit_size: int = 0

  def __post_init__(self):
    for name in ("text_size", "image_size", "num_sentinels", "pad_multiple"):
      value = getattr(self, name)
      if not isinstance(value, (int, np.integer)) or value < (0 if name == "num_sentinels" else 1):
        raise InputError(f"vocab.{name}={value!r}: must be a positive integer")
    if self.explicit_size and self.explicit_size < self.used_size:
      raise InputError(
          f"vocab.size={self.explicit_size} is too small: {len(SPECIAL_TOKENS)} specials + "
          f"{self.num_sentinels} sentinels + {self.text_size} text ids + {self.image_size} "
          f"image codes need {self.used_size}")

  @classmethod
  def from_config(cls, config) -> "Vocab":
    """Build from a full config (reads `config.vocab` and the VQ's token count, `num_tokens`)."""
    return cls(text_size=int(config.vocab.text_size), image_size=num_tokens(config.vq),
               num_sentinels=int(config.vocab.num_sentinels),
               pad_multiple=int(config.vocab.pad_multiple),
               explicit_size=int(config.vocab.size))

  # --- fixed ids -------------------------------------------------------------------------
  pad_id = 0
  eos_id = 1
  break_id = 2
  infill_id = 3
  unk_id = 4

  @property
  def sentinel_start(self) -> int:
    return len(SPECIAL_TOKENS)

  @property
  def text_start(self) -> int:
    return self.sentinel_start + self.num_sentinels

  @property
  def image_start(self) -> int:
    return self.text_start + self.text_size

  @property
  def image_end(self) -> int:
    return self.image_start + self.image_size

  @property
  def used_size(self) -> int:
    return self.image_end

  @property
  def size(self) -> int:
    return self.explicit_size or _round_up(self.used_size, self.pad_multiple)

  # --- ranges [start, end) -----------------------------------------------------------------
  @property
  def special_range(self) -> tuple[int, int]:
    return (0, self.sentinel_start)

  @property
  def sentinel_range(self) -> tuple[int, int]:
    return (self.sentinel_start, self.text_start)

  @property
  def text_range(self) -> tuple[int, int]:
    return (self.text_start, self.image_start)

  @property
  def image_range(self) -> tuple[int, int]:
    return (self.image_start, self.image_end)

  @property
  def padding_range(self) -> tuple[int, int]:
    return (self.image_end, self.size)

  def sentinel_id(self, i: int) -> int:
    if not 0 <= i < self.num_sentinels:
      raise InputError(f"sentinel index {i} outside [0, {self.num_sentinels})")
    return self.sentinel_start + i

  def token_name(self, token_id: int) -> str:
    """Human-readable name of one id, for debugging and reports."""
    t = int(token_id)
    if t < self.sentinel_start:
      return SPECIAL_TOKENS[t]
    if t < self.text_start:
      return f"<mask:{t - self.sentinel_start}>"
    if t < self.image_start:
      return f"<text:{t - self.text_start}>"
    if t < self.image_end:
      return f"<img:{t - self.image_start}>"
    if t < self.size:
      return f"<unused:{t}>"
    raise InputError(f"token id {t} outside the vocabulary [0, {self.size})")

  # --- vectorised predicates ----------------------------------------------------------------
  def is_text(self, ids) -> np.ndarray:
    ids = np.asarray(ids)
    return (ids >= self.text_start) & (ids < self.image_start)

  def is_image(self, ids) -> np.ndarray:
    ids = np.asarray(ids)
    return (ids >= self.image_start) & (ids < self.image_end)

  def is_sentinel(self, ids) -> np.ndarray:
    ids = np.asarray(ids)
    return (ids >= self.sentinel_start) & (ids < self.text_start)

  def is_special(self, ids) -> np.ndarray:
    """True for every id that is neither text nor image: specials, sentinels, unused ids."""
    return ~(self.is_text(ids) | self.is_image(ids))

  # --- local <-> global ---------------------------------------------------------------------
  def text_to_ids(self, tokens) -> np.ndarray:
    tokens = np.asarray(tokens, dtype=np.int64)
    if tokens.size and (tokens.min() < 0 or tokens.max() >= self.text_size):
      raise InputError(f"text token ids must lie in [0, {self.text_size}); got "
                       f"[{tokens.min()}, {tokens.max()}]")
    return (tokens + self.text_start).astype(np.int32)

  def image_to_ids(self, codes) -> np.ndarray:
    codes = np.asarray(codes, dtype=np.int64)
    if codes.size and (codes.min() < 0 or codes.max() >= self.image_size):
      raise InputError(f"image codes must lie in [0, {self.image_size}); got "
                       f"[{codes.min()}, {codes.max()}]")
    return (codes + self.image_start).astype(np.int32)

  def ids_to_text(self, ids) -> np.ndarray:
    ids = np.asarray(ids)
    if not self.is_text(ids).all():
      raise InputError("ids_to_text: some ids are not text ids")
    return (ids - self.text_start).astype(np.int32)

  def ids_to_image(self, ids) -> np.ndarray:
    ids = np.asarray(ids)
    if not self.is_image(ids).all():
      raise InputError("ids_to_image: some ids are not image ids")
    return (ids - self.image_start).astype(np.int32)

  # --- documents ----------------------------------------------------------------------------
  def document_to_ids(self, document: Document) -> np.ndarray:
    """One document -> its ids, ending with `<eos>` (no leading `<eos>`)."""
    parts: list[np.ndarray] = []
    previous = None
    for i, segment in enumerate(document):
      if isinstance(segment, TextSegment):
        if len(segment.tokens) == 0:
          raise InputError(f"document segment {i}: empty text segment")
        if isinstance(previous, TextSegment):
          # Two adjacent text runs serialise to one run: the parse could not tell them apart.
          raise InputError(f"document segment {i}: two adjacent text segments; join them")
        parts.append(self.text_to_ids(segment.tokens))
      elif isinstance(segment, ImageSegment):
        if len(segment.codes) == 0:
          raise InputError(f"document segment {i}: empty image segment")
        parts.append(np.array([self.break_id], np.int32))
        parts.append(self.image_to_ids(np.ravel(segment.codes)))
        parts.append(np.array([self.break_id], np.int32))
      else:
        raise InputError(f"document segment {i}: expected TextSegment or ImageSegment, "
                         f"got {type(segment).__name__}")
      previous = segment
    parts.append(np.array([self.eos_id], np.int32))
    return np.concatenate(parts).astype(np.int32)

  def documents_to_ids(self, documents: Iterable[Document]) -> np.ndarray:
    """A sequence of documents -> `<eos> doc_0 <eos> doc_1 <eos> ...`."""
    parts = [np.array([self.eos_id], np.int32)]
    parts.extend(self.document_to_ids(doc) for doc in documents)
    return np.concatenate(parts).astype(np.int32)

  def ids_to_documents(self, ids) -> list[list[Segment]]:
    """Parse `<eos> doc <eos> doc <eos> ...` back into documents (inverse of documents_to_ids).

    Raises InputError on anything documents_to_ids cannot produce: a missing leading or
    trailing `<eos>`, an unclosed image, text inside an image, sentinels, `<infill>`, padding.
    """
    ids = np.asarray(ids)
    if ids.ndim != 1 or ids.size == 0 or ids[0] != self.eos_id:
      raise InputError("a serialised sequence must be 1-D and start with <eos>")
    if ids[-1] != self.eos_id:
      raise InputError("a serialised sequence must end with <eos>")
    body = ids[1:]
    documents = []
    ends = np.flatnonzero(body == self.eos_id)
    start = 0
    for end in ends:
      documents.append(self._parse_document(body[start:end], offset=1 + start))
      start = end + 1
    return documents

  def _parse_document(self, ids: np.ndarray, offset: int) -> list[Segment]:
    segments: list[Segment] = []
    breaks = np.flatnonzero(ids == self.break_id)
    if len(breaks) % 2:
      raise InputError(f"position {offset + breaks[-1]}: <break> opens an image never closed")
    position = 0
    pairs = breaks.reshape(-1, 2)
    for open_at, close_at in list(pairs) + [(len(ids), None)]:
      text = ids[position:open_at]
      if text.size:
        if not self.is_text(text).all():
          bad = position + int(np.flatnonzero(~self.is_text(text))[0])
          raise InputError(f"position {offset + bad}: {self.token_name(ids[bad])} inside text")
        segments.append(TextSegment(self.ids_to_text(text)))
      if close_at is None:
        break
      image = ids[open_at + 1:close_at]
      if image.size == 0:
        raise InputError(f"position {offset + open_at}: empty image between two <break>s")
      if not self.is_image(image).all():
        bad = open_at + 1 + int(np.flatnonzero(~self.is_image(image))[0])
        raise InputError(f"position {offset + bad}: {self.token_name(ids[bad])} inside an image")
      segments.append(ImageSegment(self.ids_to_image(image)))
      position = close_at + 1
    return segments

"""The text tokenizer: byte-level BPE trained with the `tokenizers` library.

CM3 used a unigram model with NFKC normalisation, byte-level fallback and single-digit
splitting (REFERENCE.md section 1). We keep the normalisation and the digit rule and get the
fallback from a byte-level alphabet: all 256 bytes are in the vocabulary, so no input is ever
`<unk>` and decode(encode(s)) == normalize(s) exactly (== s when normalization="none").

The tokenizer owns only its local ids [0, vocab_size); `vocab.Vocab` offsets them into the
shared vocabulary and owns every special token.
"""

from __future__ import annotations

import json
import os
from typing import Iterable, Sequence

import numpy as np
import tokenizers
from tokenizers import decoders, models, normalizers, pre_tokenizers, trainers

from cm3leon_jax.errors import InputError

BYTE_ALPHABET_SIZE = 256
NORMALIZATIONS = ("nfkc", "none")


class TextTokenizer:
  """Wraps a `tokenizers.Tokenizer`; ids are local to the text range of the vocabulary."""

  def __init__(self, tokenizer: tokenizers.Tokenizer):
    self._tokenizer = tokenizer

  # --- training -----------------------------------------------------------------------------
  @classmethod
  def train(cls, texts: Iterable[str], vocab_size: int, normalization: str = "nfkc",
            min_frequency: int = 2, show_progress: bool = False) -> "TextTokenizer":
    """Train byte-level BPE on an iterator of strings.

    `vocab_size` is an upper bound: a small corpus may yield fewer merges. It must exceed
    the 256-entry byte alphabet that guarantees every input can be encoded.
    """
    if not isinstance(vocab_size, (int, np.integer)) or vocab_size <= BYTE_ALPHABET_SIZE:
      raise InputError(f"text tokenizer vocab_size={vocab_size!r} is too small: the byte "
                       f"alphabet alone needs {BYTE_ALPHABET_SIZE} ids, plus at least one merge")
    tokenizer = tokenizers.Tokenizer(models.BPE())
    if normalization == "nfkc":
      tokenizer.normalizer = normalizers.NFKC()
    elif normalization != "none":
      raise InputError(f"text_tokenizer.normalization={normalization!r}: expected one of "
                       f"{NORMALIZATIONS}")
    tokenizer.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Digits(individual_digits=True),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True),
    ])
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=int(vocab_size), min_frequency=min_frequency, show_progress=show_progress,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), special_tokens=[])
    tokenizer.train_from_iterator(texts, trainer=trainer)
    return cls(tokenizer)

  # --- persistence ----------------------------------------------------------------------------
  def save(self, path: str) -> None:
    """Write one JSON file, atomically (temp name, then rename)."""
    directory = os.path.dirname(os.path.abspath(path))
    os.makedirs(directory, exist_ok=True)
    tmp = f"{path}.tmp-{os.getpid()}"
    self._tokenizer.save(tmp)
    os.replace(tmp, path)

  @classmethod
  def load(cls, path: str) -> "TextTokenizer":
    if not os.path.isfile(path):
      raise InputError(f"{path}: text tokenizer file not found")
    try:
      with open(path, "rb") as f:
        raw = f.read()
      json.loads(raw.decode("utf-8"))
      tokenizer = tokenizers.Tokenizer.from_str(raw.decode("utf-8"))
    except (OSError, UnicodeDecodeError, ValueError, Exception) as e:  # tokenizers raises Exception
      first_line = str(e).splitlines()[0] if str(e) else type(e).__name__
      raise InputError(f"{path}: not a readable text tokenizer JSON ({first_line})") from None
    if not isinstance(tokenizer.decoder, decoders.ByteLevel):
      raise InputError(f"{path}: not a cm3leon text tokenizer (no byte-level decoder)")
    return cls(tokenizer)

  # --- use ------------------------------------------------------------------------------------
  @property
  def vocab_size(self) -> int:
    return self._tokenizer.get_vocab_size()

  def encode(self, text: str) -> np.ndarray:
    return np.asarray(self._tokenizer.encode(text).ids, dtype=np.int32)

  def encode_batch(self, texts: Sequence[str]) -> list[np.ndarray]:
    encodings = self._tokenizer.encode_batch(list(texts))
    return [np.asarray(e.ids, dtype=np.int32) for e in encodings]

  def decode(self, ids) -> str:
    return self._tokenizer.decode(np.asarray(ids).tolist(), skip_special_tokens=False)

  def decode_batch(self, batch_ids: Sequence) -> list[str]:
    return self._tokenizer.decode_batch([np.asarray(ids).tolist() for ids in batch_ids],
                                        skip_special_tokens=False)

  def id_to_token(self, token_id: int) -> str | None:
    return self._tokenizer.id_to_token(int(token_id))

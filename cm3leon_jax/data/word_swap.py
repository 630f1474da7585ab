"""Captions with one word swapped for another of its group ("red" -> "blue"), "a"/"an" kept
grammatical.

Two users: the attribute-binding probe (eval/binding.py) scores an image under every swapped
caption, and the dual encoder's hard negatives (retrieval/train_encoder.py, NegCLIP's recipe:
Yuksekgonul et al. 2023) train it to tell a caption from the same caption with one attribute
changed, which in-batch negatives of random scenes almost never demand.
"""

from __future__ import annotations

import collections
import functools
import re
from typing import Sequence

import numpy as np

_WORD = re.compile(r"\w+")


def article(word: str) -> str:
  return "an" if word[:1].lower() in tuple("aeiou") else "a"


@functools.lru_cache(maxsize=4096)
def _pattern(word: str) -> re.Pattern:
  return re.compile(rf"\b(?:(an?|An?) )?{re.escape(word)}\b")


def swap_word(caption: str, old: str, new: str) -> str | None:
  """`caption` with its one whole-word `old` replaced by `new` (a preceding "a"/"an" follows
  the new word); None when `old` does not occur exactly once."""
  pattern = _pattern(old)
  if len(pattern.findall(caption)) != 1:
    return None

  def replace(m: re.Match) -> str:
    if m.group(1) is None:
      return new
    art = article(new)
    return (art.capitalize() if m.group(1)[0].isupper() else art) + " " + new

  return pattern.sub(replace, caption)


def parse_groups(groups: Sequence[str]) -> tuple[tuple[str, ...], ...]:
  """Config form ("red orange yellow", "small large") -> word tuples; groups of < 2 words
  (nothing to swap to) are dropped."""
  out = []
  for g in groups:
    words = tuple(dict.fromkeys(str(g).split()))
    if len(words) >= 2:
      out.append(words)
  return tuple(out)


def random_swap(caption: str, groups: Sequence[Sequence[str]],
                rng: np.random.Generator) -> str | None:
  """One uniformly chosen (word, replacement) swap among the words of `groups` that occur
  exactly once in `caption`; None when no word can be swapped."""
  counts = collections.Counter(_WORD.findall(caption))  # one pass; swap_word only for the pick
  choices = [(old, new) for words in groups for old in words if counts[old] == 1
             for new in words if new != old]
  if not choices:
    return None
  old, new = choices[int(rng.integers(len(choices)))]
  return swap_word(caption, old, new)

"""VQA accuracy (the VQAv2 metric, in Python).

An answer is normalised (lower case, punctuation, articles, number words -> digits) and scored
min(1, #matching human answers / 3), averaged over the ten leave-one-out subsets when there are
ten human answers (the official protocol). With fewer references (Shapes has one exact answer)
it is min(1, matches / min(3, #references)): exact match for a single reference.
"""

from __future__ import annotations

import re
from typing import Sequence

from cm3leon_jax.errors import InputError

_NUMBERS = {"none": "0", "zero": "0", "one": "1", "two": "2", "three": "3", "four": "4",
            "five": "5", "six": "6", "seven": "7", "eight": "8", "nine": "9", "ten": "10"}
_ARTICLES = {"a", "an", "the"}
_PUNCTUATION = re.compile(r"[;/\[\]\"{}()=+\\_\-><@`,?!*#%^&$~|:']")


def normalize_answer(answer: str) -> str:
  answer = _PUNCTUATION.sub(" ", answer.lower().replace("\n", " ").replace("\t", " "))
  answer = re.sub(r"(?<!\d)\.(?!\d)", " ", answer)  # periods, but not decimal points
  words = [_NUMBERS.get(w, w) for w in answer.split() if w not in _ARTICLES]
  return " ".join(words)


def vqa_accuracy(prediction: str, references: Sequence[str]) -> float:
  if not references:
    raise InputError("VQA accuracy needs at least one reference answer")
  pred = normalize_answer(prediction)
  refs = [normalize_answer(r) for r in references]
  if len(refs) == 10:
    scores = []
    for i in range(10):
      others = refs[:i] + refs[i + 1:]
      scores.append(min(1.0, sum(r == pred for r in others) / 3.0))
    return sum(scores) / 10.0
  return min(1.0, sum(r == pred for r in refs) / min(3, len(refs)))


def mean_vqa_accuracy(predictions: Sequence[str], references: Sequence[Sequence[str]]) -> float:
  if len(predictions) != len(references):
    raise InputError(f"{len(predictions)} predictions for {len(references)} questions")
  return 100.0 * sum(map(vqa_accuracy, predictions, references)) / max(1, len(predictions))

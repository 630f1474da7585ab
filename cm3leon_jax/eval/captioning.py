"""Captioning metric: CIDEr-D through pycocoevalcap (the COCO caption evaluation code).

pycocoevalcap's PTB tokenizer needs Java; captions here are tokenised in Python instead
(lower-case, punctuation removed, split on whitespace), which matches it on plain English.
Scores are reported x100, as papers do (CM3Leon-7B SFT: COCO CIDEr 61.6).
"""

from __future__ import annotations

import re
from typing import Mapping, Sequence

from pycocoevalcap.cider.cider import Cider

from cm3leon_jax.errors import InputError

_PUNCTUATION = re.compile(r"[^\w\s]")


def tokenize(caption: str) -> str:
  return " ".join(_PUNCTUATION.sub(" ", caption.lower()).split())


def cider_d(references: Mapping[str, Sequence[str]], candidates: Mapping[str, str]) -> float:
  """Corpus CIDEr-D (x100) of one candidate per id against its reference captions.

  CIDEr's idf comes from the references of the evaluated set, so the score of one caption
  depends on the others (as in the COCO evaluation).
  """
  if set(references) != set(candidates):
    missing = sorted(set(references) ^ set(candidates))[:3]
    raise InputError(f"CIDEr: references and candidates cover different ids (e.g. {missing})")
  if not references:
    raise InputError("CIDEr: no captions to score")
  gts = {str(k): [tokenize(r) for r in refs] for k, refs in references.items()}
  res = {str(k): [tokenize(candidates[k])] for k in references}
  score, _ = Cider().compute_score(gts, res)
  return 100.0 * float(score)

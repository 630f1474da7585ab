"""CLIP score with the project's dual encoder: how well images match their texts.

    clip_score(embedder, images_NHW3, texts)   # 100 * mean(max(cos(image_i, text_i), 0))

The definition of Hessel et al.'s CLIPScore without its 2.5 rescaling (the form most toolkits
report, in [0, 100]). The encoder is the project's own (trained on this data), so scores
compare models of one project, not papers: compare a model's images with the real images of
the same texts (`clip_score(embedder, real, texts)`), the score to aim for.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np

from cm3leon_jax.errors import InputError


def clip_scores(embedder, images_NHW3, texts: Sequence[str]) -> np.ndarray:
  """Per pair, 100 * max(cosine, 0): float [N]."""
  if len(images_NHW3) != len(texts):
    raise InputError(f"CLIP score: {len(images_NHW3)} images but {len(texts)} texts")
  if not len(texts):
    raise InputError("CLIP score: no images to score")
  return 100.0 * np.maximum(np.asarray(embedder.score(images_NHW3, list(texts)), np.float64), 0.0)


def clip_score(embedder, images_NHW3, texts: Sequence[str]) -> float:
  return float(clip_scores(embedder, images_NHW3, texts).mean())

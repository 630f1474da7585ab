"""Attribute binding: does the decoder's image likelihood follow the words of its caption?

For each single-object scene, the teacher-forced NLL of its image's VQ codes is computed under
the scene's own caption and under every caption made by swapping one attribute word ("red" ->
each other colour; "a"/"an" kept grammatical). A decoder that reads the word gives the true
caption the lowest NLL; one that ignores it does so at chance (1 / number of values).

Why beside sampled accuracy: an image drawn wrong can be a sampling or re-ranking miss or a
model that never learnt the word; this separates the last case, exactly (no sampling) and
cheaply (one forward pass per caption).
"""

from __future__ import annotations

from typing import Callable, Sequence

import numpy as np

from cm3leon_jax.data import shapes
from cm3leon_jax.data.word_swap import swap_word
from cm3leon_jax.errors import InputError

ATTRIBUTES = {"colour": shapes.COLOUR_NAMES, "shape": shapes.SHAPES, "size": shapes.SIZE_NAMES}


def binding(image_nll: Callable[[Sequence[str], np.ndarray], np.ndarray], captions: Sequence[str],
            scenes: Sequence[shapes.Scene], codes_BN: np.ndarray) -> dict:
  """Per attribute: how often the true caption gives its image the lowest NLL among the
  word-swapped captions, chance, the median margin (nats: lowest swapped NLL - true NLL, > 0
  when the true caption wins) and the scenes scored (those whose caption names the value
  exactly once). `image_nll(captions, codes_BN)` -> nats per row (Generator.image_nll)."""
  if not (len(captions) == len(scenes) == len(codes_BN)):
    raise InputError(f"binding: {len(captions)} captions, {len(scenes)} scenes, "
                     f"{len(codes_BN)} images")
  out = {}
  for name, values in ATTRIBUTES.items():
    rows_caps, rows_codes, groups = [], [], []
    for caption, scene, codes in zip(captions, scenes, codes_BN):
      if len(scene.objects) != 1:
        raise InputError("binding: scores single-object scenes only")
      true = getattr(scene.objects[0], name)
      swapped = [swap_word(caption, true, v) for v in values if v != true]
      if any(s is None for s in swapped):
        continue  # the caption does not name this value exactly once
      groups.append((len(rows_caps), 1 + len(swapped)))
      rows_caps += [caption, *swapped]
      rows_codes += [codes] * (1 + len(swapped))
    wins, margins = [], []
    if rows_caps:
      nll = np.asarray(image_nll(rows_caps, np.stack(rows_codes)), np.float64)
      for start, count in groups:
        true_nll, others = nll[start], nll[start + 1:start + count]
        wins.append(float(true_nll < others.min()))
        margins.append(float(others.min() - true_nll))
    out[name] = {"num_scenes": len(groups), "chance": 1.0 / len(values),
                 "accuracy": float(np.mean(wins)) if wins else None,
                 "median_margin": float(np.median(margins)) if margins else None}
  return out

"""Image-text pairs for the retriever: a random-access source per dataset split.

A pair source is any sequence whose items are dicts with an `image` (uint8 [H, W, 3]) and a
`text` (str or UTF-8 bytes); item i is document i of the split (the same order as the token
documents of `cm3leon encode`, so neighbour ids are token-document ids).
"""

from __future__ import annotations

import numpy as np

from cm3leon_jax.errors import InputError


def open_pairs(config, split: str):
  """The built dataset's `split` as a random-access pair source (cm3leon_jax/data/sources.py);
  a dataset that is not built is an InputError naming the command that builds it."""
  from cm3leon_jax.data import sources

  return sources.image_text_source(config, split)


def _text(example) -> str:
  t = example["text"]
  if isinstance(t, (bytes, np.bytes_)):
    return t.decode("utf-8")
  if isinstance(t, np.ndarray):
    t = t.item()
    return t.decode("utf-8") if isinstance(t, bytes) else str(t)
  return str(t)


def read_chunk(source, start: int, stop: int) -> tuple[np.ndarray, list[str]]:
  """Items [start, stop) as (images uint8 [n, H, W, 3], texts)."""
  images, texts = [], []
  for i in range(start, stop):
    example = source[i]
    try:
      images.append(np.asarray(example["image"], np.uint8))
      texts.append(_text(example))
    except KeyError as e:
      raise InputError(f"pair source item {i}: no {e} field (need 'image' and 'text')") from None
  if not images:
    return np.zeros((0, 0, 0, 3), np.uint8), []
  shapes = {im.shape for im in images}
  if len(shapes) > 1:
    raise InputError(f"pair source items {start}..{stop - 1}: images of different shapes {shapes}")
  return np.stack(images), texts


def take(source, n: int) -> tuple[np.ndarray, list[str]]:
  return read_chunk(source, 0, min(n, len(source)))

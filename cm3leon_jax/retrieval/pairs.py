"""Image-text pairs for the retriever: a random-access source per dataset split.

A pair source is any sequence whose items are dicts with an `image` (uint8 [H, W, 3]) and a
`text` (str or UTF-8 bytes); item i is document i of the split (the same order as the token
documents of `cm3leon encode`, so neighbour ids are token-document ids).
"""

from __future__ import annotations

from typing import Sequence

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


def read_pair(source, i: int) -> tuple[np.ndarray, str]:
  """Item i as (image uint8 [H, W, 3], text); an item without either is an InputError."""
  example = source[i]
  try:
    return np.asarray(example["image"], np.uint8), _text(example)
  except KeyError as e:
    raise InputError(f"pair source item {i}: no {e} field (need 'image' and 'text')") from None


def read_chunk(source, start: int, stop: int) -> tuple[np.ndarray, list[str]]:
  """Items [start, stop) as (images uint8 [n, H, W, 3], texts)."""
  images, texts = [], []
  for i in range(start, stop):
    image, text = read_pair(source, i)
    images.append(image)
    texts.append(text)
  if not images:
    return np.zeros((0, 0, 0, 3), np.uint8), []
  shapes = {im.shape for im in images}
  if len(shapes) > 1:
    raise InputError(f"pair source items {start}..{stop - 1}: images of different shapes {shapes}")
  return np.stack(images), texts


def take(source, n: int) -> tuple[np.ndarray, list[str]]:
  return read_chunk(source, 0, min(n, len(source)))


class HeldPairs:
  """Items `indices` of `source`, each read (and decoded) on first use and then held in memory
  as {'image': uint8 [H, W, 3], 'text': str}: a training run that goes over the same pairs
  every epoch reads each once, and the first epoch's reads still run on the input pipeline's
  threads, beside the train step. An item without an image or a text, or with an image of
  another shape than the first item's, is an InputError naming it."""

  def __init__(self, source, indices: Sequence[int]):
    self.source, self.indices = source, indices
    self._items: list[dict | None] = [None] * len(indices)
    self._shape = None

  @classmethod
  def fitting(cls, source, indices: Sequence[int], limit_mb: float) -> "HeldPairs | None":
    """HeldPairs of `indices`, or None when their images would take more than `limit_mb` MiB
    (judged by the first item's) or limit_mb <= 0."""
    if limit_mb <= 0 or not len(indices):
      return None
    held = cls(source, indices)
    return held if held[0]["image"].nbytes * len(indices) <= limit_mb * 2**20 else None

  def __len__(self) -> int:
    return len(self.indices)

  def __getitem__(self, n: int) -> dict:
    item = self._items[n]
    if item is None:
      i = self.indices[n]
      image, text = read_pair(self.source, i)
      item = {"image": image, "text": text}
      if self._shape is None:
        self._shape = item["image"].shape
      elif item["image"].shape != self._shape:
        raise InputError(f"pair source item {i}: image of shape {item['image'].shape}, not "
                         f"{self._shape} like the items before it")
      self._items[n] = item
    return item

"""Random-access sources of built image-text datasets: what the VQ, encode and retriever jobs read.

    source = image_text_source(config, "train")       # the dataset config.data.dataset names
    len(source); record = source[i]                   # {'image': uint8 [S, S, 3], 'text': str,
                                                      #  'source': str, 'id': int,
                                                      #  + 'scene': shapes.Scene for Shapes}
    grain.MapDataset.source(source).shuffle(seed=0).batch(64)   # feeds Grain directly
    images = image_source(config, "train")            # images[i]: uint8 [S, S, 3] only (VQ)

The dataset must have been built first (`cm3leon data build <name>`); a missing one is an
InputError that says which command builds it. Splits: `train`, `eval` (all datasets) and
`heldout` (Shapes only: unseen colour-shape pairs).
"""

from __future__ import annotations

import json

import numpy as np

from cm3leon_jax.data import shapes
from cm3leon_jax.errors import InputError
from cm3leon_jax.paths import artifacts

DATASETS = ("shapes", "coco_captions", "image_text_folder")


def builder_for(config, name: str | None = None, **kwargs):
  """The TFDS builder of dataset `name` (default config.data.dataset) as `config` sets it up."""
  name = name or config.data.dataset
  data_dir = artifacts(config).data_dir
  size = config.vq.image_size
  if name == "shapes":
    from cm3leon_jax.data.builders.shapes import Shapes, ShapesConfig
    builder_config = ShapesConfig.make(
        image_size=size, num_train=config.data.num_train, num_eval=config.data.num_eval,
        num_heldout=config.data.num_heldout, max_objects=config.data.max_objects,
        seed=config.data.seed)
    return Shapes(data_dir=data_dir, config=builder_config, **kwargs)
  if name in ("coco_captions", "image_text_folder"):
    from cm3leon_jax.data.builders import coco_captions, image_text_folder, local
    cls = (coco_captions.CocoCaptions if name == "coco_captions"
           else image_text_folder.ImageTextFolder)
    return cls(data_dir=data_dir, config=local.LocalConfig.make(size), limits=local.Limits(
        max_image_pixels=config.data.max_image_pixels,
        max_caption_chars=config.data.max_caption_chars,
        max_skipped_fraction=config.data.max_skipped_fraction), **kwargs)
  raise InputError(f"--config.data.dataset={name!r}: expected one of {DATASETS}")


class ImageTextSource:
  """A TFDS ArrayRecord data source with text fields decoded to str (and Shapes scenes parsed).

  Implements len() and __getitem__ (Grain's RandomAccessDataSource protocol); picklable, so
  Grain worker processes can hold it.
  """

  def __init__(self, tfds_source, name: str, split: str):
    self._source = tfds_source
    self.name = name
    self.split = split

  def __len__(self) -> int:
    return len(self._source)

  def __getitem__(self, index: int) -> dict:
    if not -len(self) <= index < len(self):
      raise IndexError(f"{self}: index {index} out of range")
    return _decode(self._source[index % len(self)])

  def __iter__(self):
    return (self[i] for i in range(len(self)))

  def __getitems__(self, indices):
    return [_decode(r) for r in self._source.__getitems__(indices)]

  def __repr__(self):
    return f"ImageTextSource({self.name}, {self.split}, {len(self)} records)"


def _decode(record: dict) -> dict:
  out = {}
  for key, value in record.items():
    if isinstance(value, bytes):
      value = value.decode("utf-8")
    out[key] = value
  if "scene" in out:
    out["scene"] = shapes.Scene.from_dict(json.loads(out["scene"]))
  if "id" in out:
    out["id"] = int(out["id"])
  out["image"] = np.asarray(out["image"], np.uint8)
  return out


def image_text_source(config, split: str = "train", name: str | None = None) -> ImageTextSource:
  """The built dataset `name` (default config.data.dataset), split `split`, as a source."""
  builder = builder_for(config, name)
  name = builder.name
  if not builder.is_prepared():
    raise InputError(
        f"{builder.data_dir}: dataset {name} is not built for this config; run "
        f"`cm3leon data build {name} --config {config.name}` (with the same overrides)")
  if split not in builder.info.splits:
    raise InputError(f"dataset {name}: no split {split!r} (has {sorted(builder.info.splits)})")
  return ImageTextSource(builder.as_data_source(split=split), name, split)


class ImageSource:
  """Only the images of an ImageTextSource (uint8 [S, S, 3]); skips decoding the text fields."""

  def __init__(self, source: ImageTextSource):
    self._source = source._source
    self.name, self.split = source.name, source.split

  def __len__(self) -> int:
    return len(self._source)

  def __getitem__(self, index: int) -> np.ndarray:
    if not -len(self) <= index < len(self):
      raise IndexError(f"{self}: index {index} out of range")
    return np.asarray(self._source[index % len(self)]["image"], np.uint8)

  def __iter__(self):
    return (self[i] for i in range(len(self)))

  def __repr__(self):
    return f"ImageSource({self.name}, {self.split}, {len(self)} images)"


def image_source(config, split: str = "train", name: str | None = None) -> ImageSource:
  """image_text_source's images alone: what the VQ tokenizer trains on."""
  return ImageSource(image_text_source(config, split, name))

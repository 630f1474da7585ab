"""Shared by the builders of local real data (`coco_captions`, `image_text_folder`).

Both read from a TFDS manual_dir (nothing is downloaded), decode images with data/images.py,
clean captions, keep every path inside the dataset root, and skip bad records with a counted
reason (common.gated). Records: `image` uint8 [S, S, 3], `text`, `source` (the image path
relative to the root, or "<file>:<line>" for manifest errors).
"""

from __future__ import annotations

import dataclasses
import os
import re

import tensorflow_datasets as tfds

from cm3leon_jax.data import images
from cm3leon_jax.data.builders import common
from cm3leon_jax.errors import InputError

_SPACE = re.compile(r"\s+")
_CONTROL = re.compile(r"[\x00-\x08\x0b\x0c\x0e-\x1f\x7f]")


@dataclasses.dataclass(frozen=True)
class Limits:
  """Guards from config.data (not part of the dataset's identity)."""
  max_image_pixels: int = 40_000_000
  max_caption_chars: int = 2000
  max_skipped_fraction: float = 0.05


@dataclasses.dataclass(kw_only=True)
class LocalConfig(tfds.core.BuilderConfig):
  image_size: int = 256

  @classmethod
  def make(cls, image_size: int) -> "LocalConfig":
    return cls(name=f"{image_size}px", image_size=image_size)


def clean_caption(raw, max_chars: int) -> str:
  """Whitespace-normalised caption, or Skip(reason): bad_caption (not text), invalid_utf8,
  empty_caption, caption_too_long (skipped, never cut: a cut caption may lie)."""
  if isinstance(raw, bytes):
    try:
      raw = raw.decode("utf-8")
    except UnicodeDecodeError:
      raise common.Skip("invalid_utf8") from None
  if not isinstance(raw, str):
    raise common.Skip("bad_caption", f"{type(raw).__name__}")
  try:
    raw.encode("utf-8")  # JSON "\ud800" escapes decode to lone surrogates
  except UnicodeEncodeError:
    raise common.Skip("invalid_utf8") from None
  text = _SPACE.sub(" ", _CONTROL.sub(" ", raw)).strip()
  if not text:
    raise common.Skip("empty_caption")
  if len(text) > max_chars:
    raise common.Skip("caption_too_long", f"{len(text)} > {max_chars} chars")
  return text


def resolve_inside(root: str, relative) -> str:
  """Absolute path of `relative` under `root`, or Skip('path_escapes_root') for absolute paths,
  '..' and symlinks that lead outside the root (a manifest must not read arbitrary files)."""
  if not isinstance(relative, str) or not relative:
    raise common.Skip("malformed_jsonl", "image path is not a non-empty string")
  if os.path.isabs(relative) or relative.startswith("~"):
    raise common.Skip("path_escapes_root", relative)
  real_root = os.path.realpath(root)
  path = os.path.realpath(os.path.join(real_root, relative))
  if os.path.commonpath([real_root, path]) != real_root:
    raise common.Skip("path_escapes_root", relative)
  return path


def load(path: str, size: int, limits: Limits, count: int = 1):
  """images.load_image, with its failure turned into a Skip of `count` records."""
  try:
    return images.load_image(path, size, limits.max_image_pixels)
  except images.BadImage as e:
    raise common.Skip(e.reason, str(e), count) from None


def manual_dir(dl_manager, builder_name: str, expected: str) -> str:
  try:
    return os.fspath(dl_manager.manual_dir)
  except AssertionError as e:  # TFDS: "Manual directory ... does not exist or is empty"
    raise InputError(f"--manual_dir: {str(e).splitlines()[0]}; {builder_name} reads {expected}"
                     ) from None


class LocalBuilder(tfds.core.GeneratorBasedBuilder, skip_registration=True):
  """Base of the local-data builders: config, limits, features, skip metadata."""

  VERSION = common.VERSION
  DESCRIPTION = ""

  def __init__(self, *, limits: Limits = Limits(), progress=None, **kwargs):
    self._limits = limits
    self._progress = progress
    super().__init__(**kwargs)

  def _info(self) -> tfds.core.DatasetInfo:
    return tfds.core.DatasetInfo(
        builder=self, description=self.DESCRIPTION,
        features=common.image_text_features(self.builder_config.image_size),
        disable_shuffling=True, metadata=common.skipped_metadata())

  def _gate(self, split, items, make):
    return common.gated(split, items, make, self._limits.max_skipped_fraction,
                        self.info.metadata["skipped"], self._progress)

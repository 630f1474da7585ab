"""TFDS builder `image_text_folder`: a folder of images plus JSONL manifests.

    <manual_dir>/train.jsonl     one {"image": "relative/path.jpg", "text": "a caption"} per line
    <manual_dir>/eval.jsonl      (optional) the same for the eval split
    <manual_dir>/...             the images, anywhere under manual_dir

Record i of a split is the i-th usable line of its manifest (order kept). Bad lines are skipped
with a counted reason: malformed_jsonl, invalid_utf8, the caption reasons of local.clean_caption,
path_escapes_root, and the image reasons of images.load_image.
"""

from __future__ import annotations

import json
import os

from cm3leon_jax.data.builders import common, local
from cm3leon_jax.errors import InputError

SPLIT_FILES = {"train": "train.jsonl", "eval": "eval.jsonl"}


def read_manifest(path: str):
  """(line number, raw bytes) of the non-blank lines of a JSONL file."""
  with open(path, "rb") as f:
    for line_no, line in enumerate(f, 1):
      if line.strip():
        yield line_no, line


class ImageTextFolder(local.LocalBuilder, skip_registration=True):
  """Images + JSONL captions from a local folder (given as TFDS manual_dir)."""

  name = "image_text_folder"
  DESCRIPTION = "Local images with JSONL captions."
  MANUAL_DOWNLOAD_INSTRUCTIONS = "A folder with train.jsonl (and eval.jsonl) and the images."

  def _split_generators(self, dl_manager):
    root = local.manual_dir(dl_manager, self.name, "train.jsonl/eval.jsonl and images")
    found = {split: os.path.join(root, f) for split, f in SPLIT_FILES.items()
             if os.path.isfile(os.path.join(root, f))}
    if "train" not in found:
      raise InputError(f"{root}: no train.jsonl (expected lines of "
                       '{"image": "relative/path", "text": "caption"})')
    return {split: self._generate_examples(root, path, split) for split, path in found.items()}

  def _generate_examples(self, root: str, manifest: str, split: str):
    size = self.builder_config.image_size
    name = os.path.basename(manifest)

    def make(item):
      line_no, raw = item
      try:
        record = json.loads(raw.decode("utf-8"))
      except UnicodeDecodeError:
        raise common.Skip("invalid_utf8", f"{name}:{line_no}") from None
      except json.JSONDecodeError as e:
        raise common.Skip("malformed_jsonl", f"{name}:{line_no}: {e.msg}") from None
      if not isinstance(record, dict) or "image" not in record or "text" not in record:
        raise common.Skip("malformed_jsonl", f"{name}:{line_no}: needs 'image' and 'text'")
      text = local.clean_caption(record["text"], self._limits.max_caption_chars)
      path = local.resolve_inside(root, record["image"])
      image = local.load(path, size, self._limits)
      return [(line_no, {"image": image, "text": text, "source": record["image"]})]

    return self._gate(split, read_manifest(manifest), make)

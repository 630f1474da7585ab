"""TFDS builder `coco_captions`: MS-COCO captions from a local copy (nothing is downloaded).

    <manual_dir>/annotations/captions_train2017.json   -> split "train", images in train2017/
    <manual_dir>/annotations/captions_val2017.json     -> split "eval",  images in val2017/

(any year: `captions_<name>.json` looks for images in `<manual_dir>/<name>/`, then directly
under manual_dir). One record per caption (COCO has about five per image); each image is decoded
once. A bad image skips all of its captions; captions are cleaned like every builder's.
"""

from __future__ import annotations

import collections
import glob
import json
import os
import re

from cm3leon_jax.data.builders import common, local
from cm3leon_jax.errors import InputError

_ANNOTATIONS = re.compile(r"captions_(?P<name>[A-Za-z]+\d*)\.json$")


def split_of(name: str) -> str | None:
  if name.startswith("train"):
    return "train"
  if name.startswith("val"):
    return "eval"
  return None


def read_annotations(path: str) -> tuple[dict[int, str], dict[int, list[tuple[int, object]]]]:
  """(image id -> file name, image id -> [(annotation id, caption)]) of a captions JSON.

  A file that is not COCO JSON is an InputError (the whole split is unusable, not a record)."""
  try:
    with open(path, "rb") as f:
      data = json.loads(f.read().decode("utf-8"))
    files = {int(im["id"]): im["file_name"] for im in data["images"]}
    annotations = data["annotations"]
  except (UnicodeDecodeError, json.JSONDecodeError, KeyError, TypeError, ValueError) as e:
    raise InputError(f"{path}: not a COCO captions file ({type(e).__name__}: {e})") from None
  captions = collections.defaultdict(list)
  for i, ann in enumerate(annotations):
    if isinstance(ann, dict):
      captions[ann.get("image_id")].append((ann.get("id", i), ann.get("caption")))
    else:
      captions[None].append((i, None))
  return files, captions


class CocoCaptions(local.LocalBuilder, skip_registration=True):
  """COCO captions (2014/2017 layout) from a local manual_dir."""

  name = "coco_captions"
  DESCRIPTION = "MS-COCO caption-image pairs read from a local copy."
  MANUAL_DOWNLOAD_INSTRUCTIONS = "annotations/captions_<split>.json and <split>/ image folders."

  def _split_generators(self, dl_manager):
    root = local.manual_dir(dl_manager, self.name, "annotations/captions_*.json")
    found = collections.defaultdict(list)
    for path in sorted(glob.glob(os.path.join(root, "annotations", "captions_*.json"))):
      m = _ANNOTATIONS.search(os.path.basename(path))
      if m and split_of(m.group("name")):
        found[split_of(m.group("name"))].append((path, m.group("name")))
    if not found:
      raise InputError(f"{root}/annotations: no captions_train*.json or captions_val*.json")
    return {split: self._generate_examples(root, files, split) for split, files in found.items()}

  def _generate_examples(self, root: str, files, split: str):
    size = self.builder_config.image_size
    items = []
    for path, name in files:
      image_files, captions = read_annotations(path)
      for image_id, caps in captions.items():
        items.append((name, image_id, image_files.get(image_id), caps))

    def make(item):
      name, image_id, file_name, caps = item
      if file_name is None:
        raise common.Skip("unknown_image_id", str(image_id), len(caps))
      texts, lost = [], collections.Counter()
      for ann_id, raw in caps:
        try:
          texts.append((ann_id, local.clean_caption(raw, self._limits.max_caption_chars)))
        except common.Skip as e:
          lost[e.reason] += 1
      if not texts:
        reason, _ = lost.most_common(1)[0]
        raise common.Skip(reason, str(image_id), len(caps))
      candidates = [os.path.join(name, file_name), file_name]
      relative = next((c for c in candidates if os.path.lexists(os.path.join(root, c))),
                      candidates[0])
      image = local.load(local.resolve_inside(root, relative), size, self._limits, len(caps))
      out = [(f"{name}/{ann_id}", {"image": image, "text": text, "source": relative})
             for ann_id, text in texts]
      # Captions skipped while the image was fine still count, under their own reason.
      self._count_partial(split, lost)
      return out

    return self._gate(split, items, make)

  def _count_partial(self, split: str, lost: collections.Counter) -> None:
    counts = self.info.metadata["skipped"].setdefault(split, collections.Counter())
    counts.update(lost)

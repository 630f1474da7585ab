"""What every cm3leon TFDS builder shares: features, skip accounting, the skipped-fraction gate.

Builders write ArrayRecord files with uncompressed `tfds.features.Tensor`/`Text` features, so
neither building nor reading needs TensorFlow. A builder skips a bad record with a reason
(`Skip`), counts it, and fails the whole split with an InputError once the skipped fraction
passes `max_skipped_fraction`; TFDS writes into an `incomplete.*` directory and deletes it on
failure, so a failed build leaves no dataset behind. The counts of a finished build are kept
in the dataset's metadata (`builder.info.metadata["skipped"]`).
"""

from __future__ import annotations

import collections
from typing import Iterable, Iterator

import numpy as np
import tensorflow_datasets as tfds

from cm3leon_jax.errors import InputError

VERSION = tfds.core.Version("1.0.0")


class Skip(Exception):
  """A record that cannot be used; `reason` is a short snake_case counter name."""

  def __init__(self, reason: str, detail: str = "", count: int = 1):
    super().__init__(f"{reason}: {detail}" if detail else reason)
    self.reason = reason
    self.detail = detail
    self.count = count  # records lost (one COCO image carries several captions)


def image_text_features(image_size: int, extra: dict | None = None) -> tfds.features.FeaturesDict:
  """`image` uint8 [S, S, 3], `text` str, `source` str (where the record came from), + extra."""
  return tfds.features.FeaturesDict({
      # Raw bytes: the default encoding writes uint8 pixels as an int64 list (8x larger and
      # the bulk of the build time).
      "image": tfds.features.Tensor(shape=(image_size, image_size, 3), dtype=np.uint8,
                                    encoding=tfds.features.Encoding.BYTES),
      "text": tfds.features.Text(),
      "source": tfds.features.Text(),
      **(extra or {}),
  })


def gated(split: str, items: Iterable, make, max_skipped_fraction: float, skipped: dict,
          progress=None) -> Iterator:
  """Yield make(item)'s (key, example) pairs; count Skip reasons in skipped[split].

  `make(item)` returns a list of (key, example) (one item may give several records, e.g. one
  COCO image with five captions) or raises Skip. Raises InputError at the end of the split
  when the skipped fraction of records passes the threshold.
  """
  counts = skipped.setdefault(split, collections.Counter())
  written = 0
  for item in items:
    try:
      records = make(item)
    except Skip as e:
      counts[e.reason] += e.count
      records = []
    for key, example in records:
      written += 1
      yield key, example
    if progress is not None:
      progress.update(1)
  total = written + sum(counts.values())
  if total == 0:
    raise InputError(f"split {split!r}: no records found")
  fraction = (total - written) / total
  if fraction > max_skipped_fraction:
    reasons = ", ".join(f"{k}={v}" for k, v in counts.most_common())
    raise InputError(
        f"split {split!r}: skipped {total - written} of {total} records ({fraction:.1%} > "
        f"--config.data.max_skipped_fraction={max_skipped_fraction}): {reasons}")


def skipped_metadata() -> tfds.core.MetadataDict:
  """DatasetInfo metadata whose 'skipped' dict `gated` fills (split -> reason -> count)."""
  return tfds.core.MetadataDict(skipped={})


def read_skips(builder) -> dict[str, dict[str, int]]:
  """split -> reason -> skipped records, of a built (or just built) dataset."""
  metadata = builder.info.metadata or {}
  return {split: dict(counts) for split, counts in metadata.get("skipped", {}).items()}

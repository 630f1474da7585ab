"""TFDS builder `shapes`: rendered Shapes scenes with captions and full ground truth.

    builder = Shapes(data_dir=..., config=ShapesConfig.make(image_size=32, num_train=20000))
    builder.download_and_prepare(file_format="array_record")

Splits `train`, `eval` (same distribution) and `heldout` (every scene holds a (colour, shape)
pair never seen in train or eval; see shapes.HELDOUT_PAIRS). Record i of a split is scene
`shapes.scene_at(seed, i, split)`, so the order is fixed (shuffling disabled) and the index is
the scene id. Features: `image` uint8 [S, S, 3], `text` (a caption), `source` ("shapes/<split>/
<i>"), `id` int64, `scene` (JSON of shapes.Scene.to_dict: the ground truth).
"""

from __future__ import annotations

import dataclasses
import json

import numpy as np
import tensorflow_datasets as tfds

from cm3leon_jax.data import shapes
from cm3leon_jax.data.builders import common


@dataclasses.dataclass(kw_only=True)
class ShapesConfig(tfds.core.BuilderConfig):
  image_size: int = 32
  num_train: int = 1000
  num_eval: int = 100
  num_heldout: int = 100
  max_objects: int = 3
  seed: int = 0

  @classmethod
  def make(cls, **kwargs) -> "ShapesConfig":
    """A config named after everything that changes the data (its directory name)."""
    c = cls(name="x", **kwargs)
    name = (f"{c.image_size}px_n{c.num_train}_e{c.num_eval}_h{c.num_heldout}"
            f"_o{c.max_objects}_s{c.seed}")
    return dataclasses.replace(c, name=name)


class Shapes(tfds.core.GeneratorBasedBuilder, skip_registration=True):
  """Procedurally rendered Shapes scenes (see cm3leon_jax/data/shapes.py)."""

  VERSION = common.VERSION
  name = "shapes"

  def __init__(self, *, progress=None, **kwargs):
    self._progress = progress  # optional tqdm-like object with update(n)
    super().__init__(**kwargs)

  def _info(self) -> tfds.core.DatasetInfo:
    return tfds.core.DatasetInfo(
        builder=self,
        description="Shapes: 1..3 objects on a 3x3 grid, captions and ground truth.",
        features=common.image_text_features(self.builder_config.image_size, {
            "id": tfds.features.Scalar(dtype=np.int64),
            "scene": tfds.features.Text(),
        }),
        disable_shuffling=True,
        metadata=common.skipped_metadata(),
    )

  def _split_generators(self, dl_manager):
    del dl_manager
    c = self.builder_config
    counts = {"train": c.num_train, "eval": c.num_eval, "heldout": c.num_heldout}
    return {split: self._generate_examples(split, n) for split, n in counts.items() if n > 0}

  def _generate_examples(self, split: str, count: int):
    c = self.builder_config

    def make(i):
      scene = shapes.scene_at(c.seed, i, split, c.max_objects)
      # Caption phrasing has its own stream so it never perturbs the scene sequence.
      text = shapes.caption(scene, np.random.default_rng([c.seed, 7, shapes.SPLITS.index(split),
                                                          i]))
      return [(i, {"image": shapes.render(scene, c.image_size), "text": text,
                   "source": f"shapes/{split}/{i}", "id": i,
                   "scene": json.dumps(scene.to_dict())})]

    # Rendered scenes cannot be bad: the threshold only guards the real-data builders.
    yield from common.gated(split, range(count), make, 0.0, self.info.metadata["skipped"],
                            self._progress)

"""Shapes attribute metrics: what the analyzer reads in generated images, what captions say.

    image_accuracy(images_NHW3, scenes)      # {'colour', 'shape', 'size', 'position', 'count',
                                             #  'all'}: fraction of images right, per attribute
    caption_recall(captions, scenes)         # same keys: fraction of ground-truth attributes a
                                             #  caption states correctly ('all': every one, and
                                             #  no extra object)
    chance(num_objects=1)                    # a uniform random guess, from shapes.py's
                                             #  cardinalities
    wilson_interval(successes, n)            # 95% interval of an accuracy over n prompts

Image accuracy is the analyzer's `score_scene` (every attribute and the exact cell of every
object; 'all' = exact match). Caption recall reads a caption with the analyzer's prompt parser
(`parse_prompt`) and matches its object mentions to the scene's objects by the assignment with
the most correct attributes; a position is right when the mention names the object's cell or
states its relation to the object the previous mention was matched to ("below it").
"""

from __future__ import annotations

import itertools
import math
from typing import Sequence

import numpy as np

from cm3leon_jax.data import analyzer, shapes
from cm3leon_jax.errors import InputError

ATTRIBUTES = ("colour", "shape", "size", "position")
# Number of values each attribute takes (shapes.py); position = one of the 3x3 cells.
CARDINALITY = {"colour": len(shapes.COLOUR_NAMES), "shape": len(shapes.SHAPES),
               "size": len(shapes.SIZE_NAMES), "position": 9}


def chance(num_objects: float = 1) -> dict[str, float]:
  """Accuracy of a uniform random guess of every attribute of `num_objects` objects (their
  number given): 1/cardinality per attribute; 'all' = the product, per object."""
  per = {k: 1.0 / v for k, v in CARDINALITY.items()}
  per["all"] = math.prod(per.values()) ** num_objects
  return per


def chance_for_scenes(scenes: Sequence[shapes.Scene]) -> dict[str, float]:
  """chance() averaged over scenes of varying object counts ('all' depends on the count)."""
  if not scenes:
    raise InputError("chance_for_scenes: no scenes")
  out = chance(1)
  out["all"] = float(np.mean([chance(len(s.objects))["all"] for s in scenes]))
  return out


def wilson_interval(successes: int, n: int, z: float = 1.96) -> tuple[float, float]:
  """Wilson score interval (95% at z = 1.96) of a success rate seen as `successes` of `n`.

  Why: the text-to-image scores are fractions of 32-64 prompts, where one prompt is 1.6-3.1
  points and runs of one recipe differ by 10-30 points; the interval says how much of a gap
  sampling alone explains. Wilson's, not the normal approximation: it stays inside [0, 1] and
  is not empty at 0 or n successes.
  """
  if n <= 0:
    raise InputError(f"wilson_interval: n = {n}, must be positive")
  if not 0 <= successes <= n:
    raise InputError(f"wilson_interval: {successes} successes out of {n}")
  p, z2 = successes / n, z * z
  centre = (p + z2 / (2 * n)) / (1 + z2 / n)
  half = z * math.sqrt(p * (1 - p) / n + z2 / (4 * n * n)) / (1 + z2 / n)
  return max(0.0, centre - half), min(1.0, centre + half)


def image_accuracy(images_NHW3, scenes: Sequence[shapes.Scene]) -> dict[str, float]:
  """Mean analyzer score of each image against the scene it should show."""
  return analyzer.score_batch(images_NHW3, scenes)


def _position_hit(mention: analyzer.Mention, obj: shapes.Obj, previous: shapes.Obj | None) -> bool:
  if mention.cell is not None:
    return mention.cell == obj.cell
  if mention.relation is not None and previous is not None:
    return shapes.relation(obj, previous) == mention.relation
  return False


def _hits(mention: analyzer.Mention, obj: shapes.Obj, previous: shapes.Obj | None
          ) -> dict[str, bool]:
  """Which of the object's attributes the mention states correctly (unstated = missed)."""
  return {"colour": mention.colour == obj.colour, "shape": mention.shape == obj.shape,
          "size": mention.size == obj.size, "position": _position_hit(mention, obj, previous)}


def recall_one(caption: str, scene: shapes.Scene) -> dict[str, float]:
  """Per attribute, the fraction of the scene's objects whose value the caption states
  correctly; 'count' = as many mentions as objects; 'all' = everything right, nothing extra."""
  if not scene.objects:
    raise InputError("caption recall: the scene has no objects")
  mentions = analyzer.parse_prompt(caption)
  objects = scene.objects
  best, best_total = [{k: False for k in ATTRIBUTES} for _ in objects], -1
  # Object j is matched to mention chosen[j] or to none (-1); a mention to one object at most.
  # Enumerating objects (<= 9, usually <= 3) keeps this small however long the caption is.
  for chosen in itertools.product(range(-1, len(mentions)), repeat=len(objects)):
    used = [m for m in chosen if m >= 0]
    if len(used) != len(set(used)):
      continue
    by_mention = {m: objects[j] for j, m in enumerate(chosen) if m >= 0}
    hits = [_hits(mentions[m], obj, by_mention.get(m - 1)) if m >= 0
            else {k: False for k in ATTRIBUTES} for obj, m in zip(objects, chosen)]
    total = sum(sum(h.values()) for h in hits)
    if total > best_total:
      best, best_total = hits, total
  out = {k: float(np.mean([h[k] for h in best])) for k in ATTRIBUTES}
  out["count"] = float(len(mentions) == len(objects))
  out["all"] = float(out["count"] == 1.0 and all(all(h.values()) for h in best))
  return out


def caption_recall(captions: Sequence[str], scenes: Sequence[shapes.Scene]) -> dict[str, float]:
  """Mean recall_one over (caption, scene) pairs."""
  if len(captions) != len(scenes):
    raise InputError(f"caption recall: {len(captions)} captions but {len(scenes)} scenes")
  return analyzer.mean_scores([recall_one(c, s) for c, s in zip(captions, scenes)])

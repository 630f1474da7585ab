"""Read a Shapes image back into objects, and score images against a scene or a prompt.

The judge of every Shapes experiment (VQ reconstructions, generated images, edits):

    detections = parse(image_HW3)                 # [Detection(obj, box, fit)], reading order
    scene = parse_scene(image_HW3)                # shapes.Scene (background = nearest named)
    score_scene(image_HW3, scene)                 # {'colour', 'shape', 'size', 'position',
                                                  #  'count', 'all'} in [0, 1]
    score_prompt(image_HW3, "a large red circle at the top left and a ...")   # same keys
    score_batch(images_NHW3, scenes)              # mean of score_scene over a batch

How it works (and why it survives blur, colour noise and JPEG-like artefacts): objects sit in
fixed cells of a 3x3 grid, so each cell is judged on its own window. The background colour is
the median of the border pixels; a cell holds an object when enough pixels are far from it. The
object's colour is the palette colour whose background->colour mixing line best fits its most
distant ("core") pixels.
Every pixel is then written as a mix of background and that colour (alpha = projection onto
the background->colour line), and the alpha window is compared with the rendered coverage of
all shape x size templates at that cell, sharp and blurred (so blur changes which template is
closest by a little, not which shape). Square images only; any size from 16 px.
"""

from __future__ import annotations

import dataclasses
import functools
import itertools
import re
from typing import Sequence

import numpy as np
from scipy import ndimage

from cm3leon_jax.data import shapes
from cm3leon_jax.errors import InputError

# A cell holds an object when a pixel is this far (RGB L2) from the background: the closest
# object colour to any background is ~150 away, antialiasing and noise stay well below.
_PRESENCE_DISTANCE = 60.0
# Template blur levels, in units of size/64 px: VQ reconstructions blur by about one pixel at
# 32..64 px and proportionally more at larger sizes.
_BLUR_LEVELS = (0.0, 0.6, 1.2, 2.0)
_PURITY_WEIGHT = 0.25
_PALETTE = np.array([shapes.COLOURS[c] for c in shapes.COLOUR_NAMES], np.float32)
_BACKGROUNDS = np.array([shapes.BACKGROUNDS[b] for b in shapes.BACKGROUND_NAMES], np.float32)
_COMBOS = tuple(itertools.product(shapes.SHAPES, shapes.SIZE_NAMES))
METRICS = ("colour", "shape", "size", "position", "count", "all")


@dataclasses.dataclass(frozen=True)
class Detection:
  obj: shapes.Obj
  box: tuple[int, int, int, int]  # (x0, y0, x1, y1) pixels, x1/y1 exclusive
  fit: float  # mean squared alpha error of the best template (0 = exact)


@dataclasses.dataclass(frozen=True)
class _Grid:
  """Per canvas size: cell windows (padded to one width) and their templates."""
  ys_KW: np.ndarray  # row index of each window row, [9, W]
  xs_KW: np.ndarray
  mask_KWW: np.ndarray  # 1 inside the cell, 0 in padding
  templates_KTWW: np.ndarray  # [9, len(_COMBOS) * len(_BLUR_LEVELS), W, W]
  border_idx: tuple[np.ndarray, np.ndarray]
  min_pixels: int  # far-from-background pixels that make a cell occupied


@functools.lru_cache(maxsize=8)
def _grid(size: int) -> _Grid:
  bounds = [int(round(i * size / 3)) for i in range(4)]
  width = max(b - a for a, b in zip(bounds, bounds[1:]))
  ys, xs, masks = [], [], []
  for cell in range(9):
    r, c = divmod(cell, 3)
    y = np.arange(bounds[r], bounds[r] + width)
    x = np.arange(bounds[c], bounds[c] + width)
    masks.append(np.outer(y < bounds[r + 1], x < bounds[c + 1]).astype(np.float32))
    ys.append(np.minimum(y, size - 1))
    xs.append(np.minimum(x, size - 1))
  ys_KW, xs_KW, mask_KWW = np.stack(ys), np.stack(xs), np.stack(masks)
  templates = np.zeros((9, len(_COMBOS) * len(_BLUR_LEVELS), width, width), np.float32)
  for cell in range(9):
    r, c = divmod(cell, 3)
    for j, (shape, obj_size) in enumerate(_COMBOS):
      full = shapes.coverage(shapes.Obj(shape, "red", obj_size, r, c), size)
      for b, level in enumerate(_BLUR_LEVELS):
        blurred = ndimage.gaussian_filter(full, level * size / 64) if level else full
        templates[cell, j * len(_BLUR_LEVELS) + b] = (
            blurred[np.ix_(ys_KW[cell], xs_KW[cell])] * mask_KWW[cell])
  ring = np.zeros((size, size), bool)
  ring[0, :] = ring[-1, :] = ring[:, 0] = ring[:, -1] = True
  # A quarter of the smallest object's area: isolated noise pixels never add up to it.
  smallest = min(shapes.coverage(shapes.Obj(s, "red", "small", 1, 1), size).sum()
                 for s in shapes.SHAPES)
  return _Grid(ys_KW, xs_KW, mask_KWW, templates, np.nonzero(ring), max(2, int(smallest / 4)))


def _check_image(image) -> np.ndarray:
  image = np.asarray(image)
  if image.ndim != 3 or image.shape[-1] != 3 or image.shape[0] != image.shape[1]:
    raise InputError(f"analyzer: expected a square HxWx3 image, got shape {image.shape}")
  if image.shape[0] < shapes.MIN_SIZE:
    raise InputError(f"analyzer: image of {image.shape[0]} px is below {shapes.MIN_SIZE} px")
  if image.dtype != np.uint8:
    raise InputError(f"analyzer: expected uint8 pixels, got {image.dtype}")
  return image


def _background(image: np.ndarray, grid: _Grid) -> np.ndarray:
  return np.median(image[grid.border_idx].astype(np.float32), axis=0)


def _colour(core_N3: np.ndarray, bg_3: np.ndarray) -> int:
  """Palette index whose background->colour segment best explains the core pixels.

  Blur and antialiasing mix an object's colour with the background; fitting each pixel on the
  mixing segment (instead of comparing the mean with the palette) keeps a pale blurred orange
  from reading as yellow."""
  axes_P3 = _PALETTE - bg_3
  t_NP = np.clip(core_N3 @ axes_P3.T / np.maximum((axes_P3 ** 2).sum(-1), 1.0), 0.0, 1.0)
  residual_P = ((core_N3[:, None, :] - t_NP[..., None] * axes_P3) ** 2).sum((0, 2))
  # Core pixels are mostly pure colour: a weak pull towards t = 1 stops a shifted pink (JPEG
  # chroma) from fitting red's mixing line at t < 1.
  residual_P += _PURITY_WEIGHT * (((1.0 - t_NP) ** 2) * (axes_P3 ** 2).sum(-1)).sum(0)
  return int(residual_P.argmin())


def parse(image) -> list[Detection]:
  """The objects in a uint8 [S, S, 3] image, in reading order (cell 0..8)."""
  image = _check_image(image)
  size = image.shape[0]
  grid = _grid(size)
  bg_3 = _background(image, grid)
  win_KWW3 = image[grid.ys_KW[:, :, None], grid.xs_KW[:, None, :]].astype(np.float32)
  delta_KWW3 = (win_KWW3 - bg_3) * grid.mask_KWW[..., None]
  dist_KWW = np.sqrt((delta_KWW3 ** 2).sum(-1))
  peak_K = dist_KWW.reshape(9, -1).max(-1)
  far_K = (dist_KWW > _PRESENCE_DISTANCE).reshape(9, -1).sum(-1)
  detections = []
  for cell in np.nonzero(far_K >= grid.min_pixels)[0]:
    core_N3 = delta_KWW3[cell][dist_KWW[cell] >= 0.7 * peak_K[cell]]
    colour = _colour(core_N3, bg_3)
    axis_3 = _PALETTE[colour] - bg_3
    alpha_WW = np.clip(delta_KWW3[cell] @ axis_3 / max(float(axis_3 @ axis_3), 1.0), 0, 1)
    err_T = ((grid.templates_KTWW[cell] - alpha_WW) ** 2).sum((-1, -2))
    best = int(err_T.argmin())
    shape, obj_size = _COMBOS[best // len(_BLUR_LEVELS)]
    r, c = divmod(int(cell), 3)
    ys, xs = np.nonzero(alpha_WW >= 0.5)
    if len(ys):
      box = (int(grid.xs_KW[cell][xs.min()]), int(grid.ys_KW[cell][ys.min()]),
             int(grid.xs_KW[cell][xs.max()]) + 1, int(grid.ys_KW[cell][ys.max()]) + 1)
    else:
      box = (0, 0, 0, 0)
    obj = shapes.Obj(shape, shapes.COLOUR_NAMES[colour], obj_size, r, c)
    detections.append(Detection(obj, box, float(err_T[best]) / float(grid.mask_KWW[cell].sum())))
  return detections


def parse_scene(image) -> shapes.Scene:
  """parse(), as a Scene whose background is the nearest named background."""
  image = _check_image(image)
  bg_3 = _background(image, _grid(image.shape[0]))
  background = shapes.BACKGROUND_NAMES[int(((_BACKGROUNDS - bg_3) ** 2).sum(-1).argmin())]
  return shapes.Scene(tuple(d.obj for d in parse(image)), background)


# --- scoring --------------------------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class Mention:
  """What a prompt says about one object; None = not said."""
  colour: str | None = None
  shape: str | None = None
  size: str | None = None
  cell: int | None = None
  relation: str | None = None  # to the previous mention: shapes.relation(this, previous)


def _alternatives(words: Sequence[str]) -> str:
  return "|".join(sorted(words, key=len, reverse=True))


_POSITIONS = {shapes.position_name(r, c): 3 * r + c for r in range(3) for c in range(3)}
_POSITIONS["middle"] = 4
_POSITIONS["center"] = 4
_MENTION = re.compile(
    rf"\ban?\s+(?:(?P<size1>{_alternatives(shapes.SIZE_NAMES)})\s+)?"
    rf"(?P<colour>{_alternatives(shapes.COLOUR_NAMES)})\s+(?P<shape>{_alternatives(shapes.SHAPES)})"
    rf"(?:\s*,\s*(?P<size2>{_alternatives(shapes.SIZE_NAMES)})\s*,?)?"
    rf"(?:\s+(?:(?:at|in|on)\s+the\s+(?P<pos>{_alternatives(_POSITIONS)})(?:\s+corner)?"
    rf"|(?P<rel>(?:above|below)(?:\s+and\s+to\s+the\s+(?:left|right)\s+of)?"
    rf"|to\s+the\s+(?:left|right)\s+of)\s+it))?", re.IGNORECASE)


def parse_prompt(text: str) -> list[Mention]:
  """The object mentions of a Shapes caption (any template of shapes.caption, and similar)."""
  mentions = []
  for m in _MENTION.finditer(text):
    pos = m.group("pos")
    rel = m.group("rel")
    mentions.append(Mention(
        colour=m.group("colour").lower(), shape=m.group("shape").lower(),
        size=(m.group("size1") or m.group("size2") or "").lower() or None,
        cell=_POSITIONS[pos.lower()] if pos else None,
        relation=" ".join(rel.lower().split()) if rel and mentions else None))
  return mentions


def _mention_hits(m: Mention, obj: shapes.Obj | None, previous: shapes.Obj | None) -> dict:
  hits = {}
  for key in ("colour", "shape", "size"):
    if getattr(m, key) is not None:
      hits[key] = obj is not None and getattr(obj, key) == getattr(m, key)
  if m.cell is not None:
    hits["position"] = obj is not None and obj.cell == m.cell
  elif m.relation is not None:
    hits["position"] = (obj is not None and previous is not None
                        and shapes.relation(obj, previous) == m.relation)
  return hits


def _score(mentions: Sequence[Mention], found: Sequence[shapes.Obj]) -> dict[str, float]:
  """Best assignment of found objects to mentions (max attribute hits); per-metric accuracy."""
  if not mentions:
    raise InputError("score: the prompt/scene names no object")
  best_hits, best_total = None, -1
  candidates = list(found) + [None] * len(mentions)
  for chosen in itertools.permutations(range(len(candidates)), len(mentions)):
    objs = [candidates[i] for i in chosen]
    hits = [_mention_hits(m, o, objs[i - 1] if i else None)
            for i, (m, o) in enumerate(zip(mentions, objs))]
    total = sum(sum(h.values()) for h in hits)
    if total > best_total:
      best_hits, best_total = hits, total
      if all(all(h.values()) for h in hits):
        break
  out = {}
  for key in METRICS[:4]:
    values = [h[key] for h in best_hits if key in h]
    out[key] = float(np.mean(values)) if values else 1.0
  out["count"] = float(len(found) == len(mentions))
  out["all"] = float(out["count"] == 1.0 and all(all(h.values()) for h in best_hits))
  return out


def score_scene(image, scene: shapes.Scene) -> dict[str, float]:
  """Per-attribute accuracy of `image` against the scene it should show (every attribute and
  the exact cell of every object are checked); 'all' is 1 only for an exact match."""
  found = [d.obj for d in parse(image)]
  if tuple(found) == scene.objects:
    return {k: 1.0 for k in METRICS}
  return _score([Mention(o.colour, o.shape, o.size, o.cell) for o in scene.objects], found)


def score_prompt(image, prompt: str) -> dict[str, float]:
  """Per-attribute accuracy of `image` against what `prompt` says (absolute cells or relations
  to the previous object); attributes a prompt leaves out are not scored."""
  mentions = parse_prompt(prompt)
  if not mentions:
    raise InputError(f"score_prompt: no Shapes object named in {prompt[:80]!r}")
  return _score(mentions, [d.obj for d in parse(image)])


def mean_scores(scores: Sequence[dict[str, float]]) -> dict[str, float]:
  """Average of score dicts, per metric."""
  if not scores:
    raise InputError("mean_scores: no scores to average")
  return {k: float(np.mean([s[k] for s in scores])) for k in METRICS}


def score_batch(images_NHW3, scenes: Sequence[shapes.Scene]) -> dict[str, float]:
  """Mean score_scene over a batch (e.g. VQ reconstructions against their source scenes)."""
  if len(images_NHW3) != len(scenes):
    raise InputError(f"score_batch: {len(images_NHW3)} images but {len(scenes)} scenes")
  return mean_scores([score_scene(image, scene) for image, scene in zip(images_NHW3, scenes)])

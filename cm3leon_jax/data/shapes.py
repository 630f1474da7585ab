"""Shapes: procedurally rendered scenes with complete ground truth (DESIGN.md, "Shapes").

A scene is 1..3 objects on a plain light background. Each object has a shape (SHAPES), a named
colour (COLOURS), a size (SIZES) and a cell of a 3x3 grid (row 0..2 top to bottom, col 0..2 left
to right). An object is centred in its cell and fits inside it, so objects never overlap and
every attribute is recoverable from pixels (see `analyzer.py`).

Public API (stable; the VQ, retrieval and task code builds on it):

    scene = sample_scene(rng_or_seed, max_objects=3, split="train")   # or scene_at(seed, i)
    image_HW3 = render(scene, size)            # uint8, size in 16..1024 px
    text = caption(scene, rng_or_seed)         # varied templates, relations ("below it")
    boxes(scene, size)                         # [(x0, y0, x1, y1)] pixels, one per object
    segmentation(scene, size)                  # int32 HxW labels: 0 background, 1 + shape index
    seg_image(labels_HW)                       # uint8 HxWx3 colour-coded segmentation map
    edge_map(scene, size)                      # uint8 HxWx3 white outlines on black
    glyph(text, size)                          # uint8 HxWx3: text drawn with a bitmap font

Held-out compositions: the (colour, shape) pairs in HELDOUT_PAIRS never occur in the "train"
(or "eval") split; every "heldout" scene contains at least one of them.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Sequence

import numpy as np

from cm3leon_jax.data.word_swap import article
from cm3leon_jax.errors import InputError

SHAPES = ("circle", "square", "triangle", "diamond", "cross")
# Saturated, well separated colours (RGB); none is close to a background.
COLOURS = {
    "red": (220, 40, 40),
    "orange": (245, 140, 20),
    "yellow": (240, 210, 30),
    "green": (40, 170, 60),
    "cyan": (30, 190, 210),
    "blue": (40, 70, 220),
    "purple": (140, 50, 190),
    "pink": (245, 120, 190),
}
COLOUR_NAMES = tuple(COLOURS)
# Half-extent of an object as a fraction of the cell side: large objects leave an 8% margin.
SIZES = {"small": 0.30, "large": 0.42}
SIZE_NAMES = tuple(SIZES)
ROWS = ("top", "middle", "bottom")
COLS = ("left", "centre", "right")
# Light, low-saturation backgrounds (RGB), far from every object colour.
BACKGROUNDS = {
    "white": (255, 255, 255),
    "grey": (222, 222, 222),
    "cream": (250, 243, 222),
    "sky": (222, 234, 248),
    "mint": (226, 244, 230),
    "lavender": (238, 230, 246),
}
BACKGROUND_NAMES = tuple(BACKGROUNDS)
HELDOUT_PAIRS = frozenset({("red", "triangle"), ("blue", "circle"), ("green", "diamond"),
                           ("yellow", "cross"), ("purple", "square")})
SPLITS = ("train", "eval", "heldout")
# Segmentation-map colours per shape class (index 0 = background); distinct from COLOURS so a
# seg map is never mistaken for a scene.
SEG_PALETTE = np.array([(0, 0, 0), (255, 255, 255), (128, 128, 0), (0, 128, 128),
                        (128, 0, 128), (96, 96, 96)], np.uint8)
MIN_SIZE, MAX_SIZE = 16, 1024


@dataclasses.dataclass(frozen=True)
class Obj:
  shape: str
  colour: str
  size: str
  row: int  # 0..2, top to bottom
  col: int  # 0..2, left to right

  @property
  def cell(self) -> int:
    return 3 * self.row + self.col

  @property
  def position(self) -> str:
    return position_name(self.row, self.col)

  def describe(self) -> str:
    return f"{self.size} {self.colour} {self.shape}"


_OBJ_FIELDS = tuple(f.name for f in dataclasses.fields(Obj))


@dataclasses.dataclass(frozen=True)
class Scene:
  objects: tuple[Obj, ...]
  background: str = "white"

  def to_dict(self) -> dict:
    return {"background": self.background,
            "objects": [{f: getattr(o, f) for f in _OBJ_FIELDS} for o in self.objects]}

  @classmethod
  def from_dict(cls, d: dict) -> "Scene":
    return cls(tuple(Obj(**o) for o in d["objects"]), d["background"])


def position_name(row: int, col: int) -> str:
  """'top left', 'top', 'centre', 'bottom right', ... ('middle centre' is 'centre')."""
  if row == 1 and col == 1:
    return "centre"
  if row == 1:
    return COLS[col]
  if col == 1:
    return ROWS[row]
  return f"{ROWS[row]} {COLS[col]}"


def as_rng(rng_or_seed) -> np.random.Generator:
  if isinstance(rng_or_seed, np.random.Generator):
    return rng_or_seed
  return np.random.default_rng(rng_or_seed)


def sample_scene(rng_or_seed, max_objects: int = 3, split: str = "train") -> Scene:
  """A random scene; deterministic given the seed. See HELDOUT_PAIRS for `split`."""
  if split not in SPLITS:
    raise InputError(f"split={split!r}: expected one of {SPLITS}")
  if not 1 <= max_objects <= 9:
    raise InputError(f"max_objects={max_objects}: expected 1..9 (a 3x3 grid)")
  rng = as_rng(rng_or_seed)
  n = int(rng.integers(1, max_objects + 1))
  cells = rng.choice(9, size=n, replace=False)
  forced = int(rng.integers(n)) if split == "heldout" else -1
  heldout = sorted(HELDOUT_PAIRS)
  objects = []
  for i, cell in enumerate(cells):
    if i == forced:
      colour, shape = heldout[int(rng.integers(len(heldout)))]
    else:
      while True:  # rejection keeps the other pairs uniform
        colour = COLOUR_NAMES[int(rng.integers(len(COLOUR_NAMES)))]
        shape = SHAPES[int(rng.integers(len(SHAPES)))]
        if split == "heldout" or (colour, shape) not in HELDOUT_PAIRS:
          break
    size = SIZE_NAMES[int(rng.integers(len(SIZE_NAMES)))]
    objects.append(Obj(shape, colour, size, int(cell) // 3, int(cell) % 3))
  objects.sort(key=lambda o: o.cell)  # reading order: captions and analyzers agree on it
  background = BACKGROUND_NAMES[int(rng.integers(len(BACKGROUND_NAMES)))]
  return Scene(tuple(objects), background)


def scene_at(seed: int, index: int, split: str = "train", max_objects: int = 3) -> Scene:
  """Scene number `index` of a split: random access, so builders can shard freely."""
  return sample_scene(np.random.default_rng([seed, SPLITS.index(split), index]), max_objects,
                      split)


# --- geometry -------------------------------------------------------------------------------

def _check_size(size: int) -> int:
  if not isinstance(size, (int, np.integer)) or not MIN_SIZE <= size <= MAX_SIZE:
    raise InputError(f"image size {size!r}: expected an int in {MIN_SIZE}..{MAX_SIZE}")
  return int(size)


def object_frame(obj: Obj, size: int) -> tuple[float, float, float]:
  """(centre x, centre y, half-extent) in pixels; pixel i covers [i, i+1)."""
  cell = size / 3
  return (obj.col + 0.5) * cell, (obj.row + 0.5) * cell, SIZES[obj.size] * cell


def _sdf(shape: str, x: np.ndarray, y: np.ndarray, h: float) -> np.ndarray:
  """Signed distance (pixels, negative inside) of a shape of half-extent h centred at 0."""
  ax, ay = np.abs(x), np.abs(y)
  if shape == "circle":
    return np.sqrt(x * x + y * y) - h
  if shape == "square":
    return np.maximum(ax, ay) - h
  if shape == "diamond":
    return (ax + ay - h) / np.sqrt(2.0)
  if shape == "triangle":  # apex up, base on y = +h
    return np.maximum(y - h, (2.0 * ax - y - h) / np.sqrt(5.0))
  if shape == "cross":  # plus sign, arms one third of the extent wide
    return np.minimum(np.maximum(ax - h, ay - h / 3), np.maximum(ax - h / 3, ay - h))
  raise InputError(f"shape {shape!r}: expected one of {SHAPES}")


@functools.lru_cache(maxsize=64)
def _pixel_centres(size: int) -> tuple[np.ndarray, np.ndarray]:
  c = np.arange(size, dtype=np.float32) + 0.5
  return c[None, :], c[:, None]


def object_sdf(obj: Obj, size: int) -> np.ndarray:
  """float32 HxW signed distance to the object's outline, in pixels."""
  cx, cy, h = object_frame(obj, size)
  xs, ys = _pixel_centres(size)
  return _sdf(obj.shape, xs - cx, ys - cy, h).astype(np.float32)


def _window_sdf(obj: Obj, size: int) -> tuple[slice, slice, np.ndarray]:
  """The object's signed distance on its cell's pixels plus one pixel of margin (outside that
  the coverage and edge ramps are exactly 0): 1/9 of the canvas' work."""
  cell = size / 3
  y0, x0 = max(0, int(obj.row * cell) - 1), max(0, int(obj.col * cell) - 1)
  y1, x1 = min(size, int(np.ceil((obj.row + 1) * cell)) + 1), min(size, int(np.ceil(
      (obj.col + 1) * cell)) + 1)
  cx, cy, h = object_frame(obj, size)
  xs = np.arange(x0, x1, dtype=np.float32)[None, :] + 0.5 - cx
  ys = np.arange(y0, y1, dtype=np.float32)[:, None] + 0.5 - cy
  return slice(y0, y1), slice(x0, x1), _sdf(obj.shape, xs, ys, h).astype(np.float32)


def coverage(obj: Obj, size: int) -> np.ndarray:
  """float32 HxW in [0, 1]: antialiased coverage (a one-pixel ramp across the outline)."""
  return np.clip(0.5 - object_sdf(obj, size), 0.0, 1.0)


def render(scene: Scene, size: int) -> np.ndarray:
  """uint8 [size, size, 3] image of the scene."""
  size = _check_size(size)
  image = np.empty((size, size, 3), np.float32)
  image[:] = BACKGROUNDS[scene.background]
  for obj in scene.objects:
    ys, xs, sdf = _window_sdf(obj, size)
    alpha = np.clip(0.5 - sdf, 0.0, 1.0)[..., None]
    window = image[ys, xs]
    window += alpha * (np.asarray(COLOURS[obj.colour], np.float32) - window)
  return np.rint(image).astype(np.uint8)


def boxes(scene: Scene, size: int) -> list[tuple[int, int, int, int]]:
  """Per object, its bounding box (x0, y0, x1, y1) in pixels of a `size` frame, rounded."""
  out = []
  for obj in scene.objects:
    cx, cy, h = object_frame(obj, size)
    out.append(tuple(int(round(v)) for v in (cx - h, cy - h, cx + h, cy + h)))
  return out


def segmentation(scene: Scene, size: int) -> np.ndarray:
  """int32 [size, size] labels: 0 background, 1 + SHAPES.index(shape) where covered >= 1/2."""
  size = _check_size(size)
  labels = np.zeros((size, size), np.int32)
  for obj in scene.objects:
    ys, xs, sdf = _window_sdf(obj, size)
    labels[ys, xs][sdf <= 0.0] = 1 + SHAPES.index(obj.shape)  # coverage >= 1/2
  return labels


def seg_image(labels_HW: np.ndarray) -> np.ndarray:
  """uint8 HxWx3 colour-coded segmentation map (SEG_PALETTE) of `segmentation()` labels."""
  return SEG_PALETTE[np.asarray(labels_HW)]


def edge_map(scene: Scene, size: int) -> np.ndarray:
  """uint8 [size, size, 3]: white object outlines (about 1 px wide) on black, Canny-like."""
  size = _check_size(size)
  edges = np.zeros((size, size), np.float32)
  for obj in scene.objects:
    ys, xs, sdf = _window_sdf(obj, size)
    edges[ys, xs] = np.maximum(edges[ys, xs], np.clip(1.0 - np.abs(sdf), 0.0, 1.0))
  return np.repeat(np.rint(edges * 255).astype(np.uint8)[..., None], 3, axis=-1)


@functools.lru_cache(maxsize=1)
def _font():
  from PIL import ImageFont  # the classic built-in bitmap font: fixed, no file, deterministic
  return ImageFont.load_default_imagefont()


def glyph(text: str, size: int, background: str = "white") -> np.ndarray:
  """uint8 [size, size, 3]: `text` in black bitmap letters, scaled up by an integer factor and
  centred. Raises InputError when the text is empty or cannot fit `size`."""
  size = _check_size(size)
  if not text or not text.strip():
    raise InputError("glyph text: empty")
  mask = _font().getmask(text)
  w, h = mask.size
  bitmap = np.asarray(mask, np.uint8).reshape(h, w)
  ys, xs = np.nonzero(bitmap)
  if len(ys):  # centre the ink, not the advance box (which carries trailing space)
    bitmap = bitmap[ys.min():ys.max() + 1, xs.min():xs.max() + 1]
    h, w = bitmap.shape
  # 7/8 of the canvas at most: a margin keeps letters clear of the border after VQ blur.
  scale = min(size * 7 // 8 // max(w, 1), size * 7 // 8 // max(h, 1))
  if scale < 1:
    raise InputError(f"glyph text {text!r}: {w}x{h} px does not fit a {size} px image")
  bitmap = np.kron(bitmap, np.ones((scale, scale), np.uint8))
  image = np.empty((size, size, 3), np.uint8)
  image[:] = BACKGROUNDS[background]
  y0, x0 = (size - bitmap.shape[0]) // 2, (size - bitmap.shape[1]) // 2
  ink = bitmap[..., None].astype(np.float32) / 255.0
  region = image[y0:y0 + bitmap.shape[0], x0:x0 + bitmap.shape[1]].astype(np.float32)
  image[y0:y0 + bitmap.shape[0], x0:x0 + bitmap.shape[1]] = np.rint(region * (1 - ink))
  return image


def glyph_capacity(size: int) -> int:
  """Most characters `glyph` fits on one line of a `size` px image (the font is 6 px wide)."""
  return max(1, _check_size(size) * 7 // 8 // 6)


# --- captions -------------------------------------------------------------------------------

_AT = ("at the {p}", "in the {p}", "on the {p}")
_CENTRE_AT = ("in the centre", "in the middle", "at the centre")
_COUNT = {1: "one", 2: "two", 3: "three", 4: "four", 5: "five", 6: "six", 7: "seven",
          8: "eight", 9: "nine"}


def _where(obj: Obj, rng: np.random.Generator) -> str:
  if obj.row == 1 and obj.col == 1:
    return _CENTRE_AT[int(rng.integers(len(_CENTRE_AT)))]
  return _AT[int(rng.integers(len(_AT)))].format(p=obj.position)


def relation(a: Obj, b: Obj) -> str:
  """Where a lies relative to b: 'above', 'below', 'to the left of', 'to the right of', or two
  joined ('above and to the left of')."""
  vertical = "above" if a.row < b.row else "below" if a.row > b.row else ""
  horizontal = ("to the left of" if a.col < b.col else
                "to the right of" if a.col > b.col else "")
  return " and ".join(p for p in (vertical, horizontal) if p)


def _phrase(obj: Obj, rng: np.random.Generator) -> str:
  if rng.random() < 0.5:
    return f"a {obj.size} {obj.colour} {obj.shape}"
  return f"{article(obj.colour)} {obj.colour} {obj.shape}, {obj.size},"


def caption(scene: Scene, rng_or_seed) -> str:
  """A caption naming every object's size, colour and shape and its absolute cell or its
  relation to the previous object ('... and a small blue square below it')."""
  rng = as_rng(rng_or_seed)
  parts = []
  for i, obj in enumerate(scene.objects):
    noun = _phrase(obj, rng)
    if i > 0 and rng.random() < 0.5:
      where = f"{relation(obj, scene.objects[i - 1])} it"
    else:
      where = _where(obj, rng)
    parts.append(f"{noun} {where}")
  body = parts[0] if len(parts) == 1 else ", ".join(parts[:-1]) + " and " + parts[-1]
  style = int(rng.integers(4))
  n = len(scene.objects)
  if style == 0:
    text = body
  elif style == 1:
    text = f"there {'is' if n == 1 else 'are'} {body}"
  elif style == 2:
    text = f"{_COUNT[n]} shape{'s' if n > 1 else ''} on a {scene.background} background: {body}"
  else:
    text = f"{body}, on a {scene.background} background"
  return text.replace(",,", ",").replace(", and", " and").replace(",:", ":")


def describe_objects(objects: Sequence[Obj]) -> str:
  """Deterministic list used inside instructions and answers: 'a large red circle at the top
  left and a small blue square in the centre'."""
  items = [f"a {o.describe()} {'in the centre' if o.cell == 4 else 'at the ' + o.position}"
           for o in objects]
  return items[0] if len(items) == 1 else ", ".join(items[:-1]) + " and " + items[-1]

"""PNG grids of images with their text above them (samples.png, infill.png, `cm3leon generate`).

    grid = captioned_grid(images_NHW3, texts, columns=8)   # uint8 [H, W, 3]
    save_png(grid, "samples.png")                         # atomic (temp name, then rename)

Small images (32 px Shapes) are upscaled by an integer factor, nearest neighbour, so every
generated pixel stays visible; the text is the classic PIL bitmap font (6 x 11 px per
character, no font file), wrapped to the tile width.
"""

from __future__ import annotations

import functools
import os
import textwrap
from typing import Sequence

import numpy as np
from PIL import Image, ImageDraw, ImageFont

from cm3leon_jax.errors import InputError

CHAR_WIDTH, LINE_HEIGHT = 6, 11  # the bitmap font's advance and line pitch, px
MARGIN = 2  # px around text inside a strip
PAD = 4  # px between tiles
BACKGROUND = 255


@functools.lru_cache(maxsize=1)
def _font():
  return ImageFont.load_default_imagefont()


def scale_for(size: int, target: int = 128) -> int:
  """Integer upscaling factor that brings a `size` px image to about `target` px (>= 1)."""
  return max(1, target // max(int(size), 1))


def upscale(images_NHW3, factor: int) -> np.ndarray:
  """Nearest-neighbour upscaling of uint8 [N, H, W, 3] by an integer factor."""
  x = np.asarray(images_NHW3)
  if x.ndim != 4 or x.shape[-1] != 3:
    raise InputError(f"grid: expected images of shape [N, H, W, 3], got {x.shape}")
  return x.repeat(factor, axis=1).repeat(factor, axis=2)


def wrap(text: str, width_px: int, max_lines: int) -> list[str]:
  """The text in lines that fit `width_px`, at most `max_lines` (the last one cut with '...')."""
  chars = max(1, (width_px - 2 * MARGIN) // CHAR_WIDTH)
  # The bitmap font has Latin-1 glyphs only; generated text can hold any character.
  text = "".join(c if c.isprintable() and ord(c) < 256 else "?" for c in " ".join(str(text).split()))
  lines = textwrap.wrap(text, chars, break_long_words=True) or [""]
  if len(lines) > max_lines:
    lines = lines[:max_lines]
    lines[-1] = lines[-1][:max(0, chars - 3)] + "..."
  return lines


def text_strip(lines: Sequence[str], width: int, num_lines: int) -> np.ndarray:
  """uint8 [num_lines * LINE_HEIGHT + 2 * MARGIN, width, 3]: black text on white."""
  height = num_lines * LINE_HEIGHT + 2 * MARGIN
  image = Image.new("RGB", (width, height), (BACKGROUND,) * 3)
  draw = ImageDraw.Draw(image)
  for i, line in enumerate(lines[:num_lines]):
    draw.text((MARGIN, MARGIN + i * LINE_HEIGHT), line, fill=(0, 0, 0), font=_font())
  return np.asarray(image, np.uint8)


def tile_grid(tiles: Sequence[np.ndarray], columns: int) -> np.ndarray:
  """Equal-sized uint8 [h, w, 3] tiles in rows of `columns`, PAD px apart, on white."""
  if not len(tiles):
    raise InputError("grid: no images")
  if columns < 1:
    raise InputError(f"grid: columns={columns} must be >= 1")
  h, w, _ = tiles[0].shape
  if any(t.shape != tiles[0].shape for t in tiles):
    raise InputError("grid: tiles of different sizes")
  columns = min(columns, len(tiles))
  rows = -(-len(tiles) // columns)
  out = np.full((PAD + rows * (h + PAD), PAD + columns * (w + PAD), 3), BACKGROUND, np.uint8)
  for i, tile in enumerate(tiles):
    r, c = divmod(i, columns)
    y, x = PAD + r * (h + PAD), PAD + c * (w + PAD)
    out[y:y + h, x:x + w] = tile
  return out


def captioned_tiles(images_NHW3, texts: Sequence[str], target: int = 128,
                    max_lines: int = 4) -> list[np.ndarray]:
  """Each image upscaled with its text in a strip above it; one strip height for all."""
  images = np.asarray(images_NHW3)
  if len(images) != len(texts):
    raise InputError(f"grid: {len(images)} images but {len(texts)} texts")
  big = upscale(images, scale_for(images.shape[2], target)) if len(images) else images
  width = big.shape[2] if len(images) else target
  wrapped = [wrap(t, width, max_lines) for t in texts]
  num_lines = max((len(w) for w in wrapped), default=1)
  return [np.concatenate([text_strip(w, width, num_lines), image]) for w, image in zip(wrapped, big)]


def captioned_grid(images_NHW3, texts: Sequence[str], columns: int = 8, target: int = 128,
                   max_lines: int = 4) -> np.ndarray:
  """A grid of images, each with its text (prompt, caption) drawn above it."""
  return tile_grid(captioned_tiles(images_NHW3, texts, target, max_lines), columns)


def infill_grid(original_NHW3, masked_NHW3, infilled_NHW3, count: int | None = None,
                per_row: int = 2) -> np.ndarray:
  """Triptychs original | masked | infilled, `per_row` of them per row, each tile labelled."""
  tiles, labels = [], []
  for o, m, i in list(zip(original_NHW3, masked_NHW3, infilled_NHW3))[:count]:
    tiles += [o, m, i]
    labels += ["original", "masked", "infilled"]
  return captioned_grid(np.stack(tiles), labels, columns=3 * per_row, max_lines=1)


def save_png(image_HW3: np.ndarray, path: str) -> None:
  """Write a uint8 image as PNG atomically."""
  os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
  tmp = f"{path}.tmp-{os.getpid()}"
  Image.fromarray(np.asarray(image_HW3, np.uint8)).save(tmp, format="PNG")
  os.replace(tmp, path)

"""Safe image decoding for real data: any file in, a uint8 [S, S, 3] RGB square out, or BadImage.

    image_SS3 = load_image(path, size=256, max_pixels=40_000_000)

The recipe (Chameleon's): decode, convert to RGB (transparent pixels blended onto white; 16-bit
scaled to 8; grayscale, palette and CMYK converted), apply the EXIF orientation, resize the
shorter side to `size` and centre-crop. The header is read before any pixel is decoded, so a
file that claims 20000x20000 pixels is refused without allocating them (decompression bombs).
Every failure is a BadImage whose `reason` is a short counter name for the build summary.
"""

from __future__ import annotations

import os
import warnings

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from cm3leon_jax.errors import InputError

_WHITE = (255, 255, 255)
_SIXTEEN_BIT = ("I;16", "I;16B", "I;16L", "I;16N", "I")


class BadImage(InputError):
  """An unusable image file; `reason` is one of: missing_file, empty_file, not_an_image,
  too_many_pixels, truncated_image, unsupported_mode."""

  def __init__(self, reason: str, path: str, detail: str = ""):
    super().__init__(f"{path}: {reason}" + (f" ({detail})" if detail else ""))
    self.reason = reason


def to_rgb(im: Image.Image) -> Image.Image:
  """Any PIL mode -> RGB. Transparency is composited onto white (not dropped, which would
  turn transparent areas black or into garbage colours)."""
  if im.mode == "RGB":
    return im
  if im.mode in _SIXTEEN_BIT:
    # 16-bit grayscale (PNG 'I;16' or 'I'): scale 0..65535 to 0..255 instead of clipping.
    values = np.asarray(im, np.float64)
    return Image.fromarray(np.clip(np.rint(values / 257.0), 0, 255).astype(np.uint8)).convert("RGB")
  if im.mode == "F":
    return Image.fromarray(np.clip(np.rint(np.asarray(im)), 0, 255).astype(np.uint8)).convert("RGB")
  has_alpha = im.mode in ("RGBA", "LA", "PA", "La", "RGBa") or "transparency" in im.info
  if has_alpha:
    rgba = im.convert("RGBA")
    background = Image.new("RGBA", rgba.size, _WHITE + (255,))
    return Image.alpha_composite(background, rgba).convert("RGB")
  try:
    return im.convert("RGB")  # L, 1, P, CMYK, YCbCr, LAB, HSV
  except (ValueError, OSError) as e:
    raise BadImage("unsupported_mode", getattr(im, "filename", "?"), f"{im.mode}: {e}") from None


def resize_centre_crop(im: Image.Image, size: int) -> Image.Image:
  """Resize the shorter side to `size` and keep the centre square (one resampling pass)."""
  w, h = im.size
  side = min(w, h)
  box = ((w - side) / 2, (h - side) / 2, (w + side) / 2, (h + side) / 2)
  return im.resize((size, size), Image.Resampling.BICUBIC, box=box, reducing_gap=3.0)


def load_image(path: str, size: int, max_pixels: int = 40_000_000) -> np.ndarray:
  """uint8 [size, size, 3] from an image file, or BadImage(reason)."""
  if not os.path.isfile(path):
    raise BadImage("missing_file", path)
  if os.path.getsize(path) == 0:
    raise BadImage("empty_file", path)
  try:
    with warnings.catch_warnings():
      # We enforce our own (lower) pixel limit below; PIL's warning would only be noise.
      warnings.simplefilter("ignore", Image.DecompressionBombWarning)
      with Image.open(path) as im:  # reads the header only
        w, h = im.size
        if w * h > max_pixels:
          raise BadImage("too_many_pixels", path, f"{w}x{h} > {max_pixels}")
        if w < 1 or h < 1:
          raise BadImage("not_an_image", path, f"{w}x{h}")
        im.draft("RGB", (size, size))  # JPEG: decode at a reduced scale when that suffices
        im.load()
        im = ImageOps.exif_transpose(im)
        out = resize_centre_crop(to_rgb(im), size)
  except BadImage:
    raise
  except Image.DecompressionBombError as e:
    raise BadImage("too_many_pixels", path, str(e)[:80]) from None
  except UnidentifiedImageError:
    raise BadImage("not_an_image", path) from None
  except (OSError, SyntaxError, ValueError, EOFError) as e:
    # PIL reports cut-off files as OSError('image file is truncated ...') or broken data
    # streams; either way the pixels are not all there.
    raise BadImage("truncated_image", path, str(e)[:80]) from None
  return np.asarray(out, np.uint8)

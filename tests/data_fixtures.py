"""Files that real datasets contain, good and bad, written by tests (for test_images/builders)."""

import io
import struct
import zlib

import numpy as np
from PIL import Image


def png_bytes(array, mode=None) -> bytes:
  buf = io.BytesIO()
  Image.fromarray(array, mode).save(buf, "PNG") if mode else Image.fromarray(array).save(buf, "PNG")
  return buf.getvalue()


def huge_png_header(width=20000, height=20000) -> bytes:
  """A PNG that claims width x height RGB pixels but carries no pixel data."""
  def chunk(kind, data):
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
  ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
  return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IEND", b"")


def write(path, data: bytes):
  path.parent.mkdir(parents=True, exist_ok=True)
  path.write_bytes(data)
  return path


def rgb(size=32, seed=0):
  return np.random.default_rng(seed).integers(0, 256, (size, size, 3), dtype=np.uint8)


def save(image: Image.Image, path, fmt="PNG", **kw):
  path.parent.mkdir(parents=True, exist_ok=True)
  image.save(path, fmt, **kw)
  return path


def mode_images(size=32):
  """name -> (PIL image, expected uint8 [size, size, 3] after load_image at `size`)."""
  out = {}
  gray = np.arange(size * size, dtype=np.uint8).reshape(size, size)
  out["grayscale"] = (Image.fromarray(gray, "L"), np.repeat(gray[..., None], 3, -1))
  rgba = np.zeros((size, size, 4), np.uint8)
  rgba[..., 0] = 255  # red ...
  rgba[:, : size // 2, 3] = 0  # ... transparent on the left half -> white
  rgba[:, size // 2:, 3] = 255
  expected = np.full((size, size, 3), 255, np.uint8)
  expected[:, size // 2:] = (255, 0, 0)
  out["rgba"] = (Image.fromarray(rgba, "RGBA"), expected)
  out["cmyk"] = (Image.new("CMYK", (size, size), (0, 255, 255, 0)),
                 np.tile(np.array([255, 0, 0], np.uint8), (size, size, 1)))
  sixteen = np.full((size, size), 65535, np.uint16)
  sixteen[: size // 2] = 257 * 100
  expected16 = np.full((size, size, 3), 255, np.uint8)
  expected16[: size // 2] = 100
  out["16bit"] = (Image.fromarray(sixteen), expected16)
  pal = Image.new("P", (size, size), 1)
  pal.putpalette([0, 0, 0, 10, 200, 30] + [0] * (254 * 3))
  out["palette"] = (pal, np.tile(np.array([10, 200, 30], np.uint8), (size, size, 1)))
  return out

"""Safe decoding: every kind of image file becomes an RGB square or a BadImage with a reason."""

import resource

import numpy as np
import pytest
from PIL import Image

from cm3leon_jax.data import images
from tests import data_fixtures as fx


def reason(path, size=32, **kw):
  with pytest.raises(images.BadImage) as e:
    images.load_image(str(path), size, **kw)
  return e.value.reason


def test_rgb_png_at_target_size_is_unchanged(tmp_path):
  array = fx.rgb(32)
  path = fx.write(tmp_path / "a.png", fx.png_bytes(array))
  assert np.array_equal(images.load_image(str(path), 32), array)


def test_resize_keeps_the_centre_square(tmp_path):
  wide = np.zeros((20, 60, 3), np.uint8)
  wide[:, :20] = (255, 0, 0)
  wide[:, 20:40] = (0, 0, 255)  # the centre square
  wide[:, 40:] = (255, 0, 0)
  path = fx.write(tmp_path / "wide.png", fx.png_bytes(wide))
  assert np.array_equal(images.load_image(str(path), 20), np.tile([0, 0, 255], (20, 20, 1)))
  small = images.load_image(str(path), 10)  # the bicubic kernel may touch the red border
  assert small.shape == (10, 10, 3) and np.array_equal(small[:, 1:-1], np.tile([0, 0, 255],
                                                                               (10, 8, 1)))


@pytest.mark.parametrize("name", ["grayscale", "rgba", "cmyk", "16bit", "palette"])
def test_modes_convert_to_rgb(tmp_path, name):
  image, expected = fx.mode_images(32)[name]
  fmt = "JPEG" if name == "cmyk" else "PNG"
  path = fx.save(image, tmp_path / f"{name}.{fmt.lower()}", fmt, **({"quality": 100}
                                                                    if fmt == "JPEG" else {}))
  got = images.load_image(str(path), 32)
  tolerance = 3 if fmt == "JPEG" else 0
  assert got.dtype == np.uint8 and got.shape == (32, 32, 3)
  assert np.abs(got.astype(int) - expected).max() <= tolerance


def test_palette_transparency_is_blended_onto_white(tmp_path):
  pal = Image.new("P", (8, 8), 0)
  pal.putpalette([0, 0, 0, 10, 200, 30] + [0] * (254 * 3))
  pal.info["transparency"] = 0
  path = fx.save(pal, tmp_path / "t.png")
  assert np.array_equal(images.load_image(str(path), 8), np.full((8, 8, 3), 255, np.uint8))


def test_zero_byte_file(tmp_path):
  assert reason(fx.write(tmp_path / "empty.png", b"")) == "empty_file"


def test_missing_file(tmp_path):
  assert reason(tmp_path / "nope.png") == "missing_file"


def test_text_file_named_png(tmp_path):
  assert reason(fx.write(tmp_path / "text.png", b"this is not an image\n" * 10)) == "not_an_image"


@pytest.mark.parametrize("fmt", ["PNG", "JPEG"])
def test_truncated_files(tmp_path, fmt):
  path = fx.save(Image.fromarray(fx.rgb(64)), tmp_path / f"full.{fmt.lower()}", fmt)
  data = path.read_bytes()
  assert reason(fx.write(tmp_path / f"cut.{fmt.lower()}", data[: len(data) // 2]),
                64) == "truncated_image"


def test_huge_header_is_refused_without_decoding(tmp_path):
  path = fx.write(tmp_path / "bomb.png", fx.huge_png_header(20000, 20000))
  before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux
  assert reason(path) == "too_many_pixels"
  # PIL's own bomb guard (2 x 89M pixels) is the second line of defence.
  assert reason(path, max_pixels=10**12) == "too_many_pixels"
  grown_mib = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before) / 1024
  assert grown_mib < 100  # 20000^2 RGB would be 1.2 GB


def test_pixel_limit_is_configurable(tmp_path):
  path = fx.write(tmp_path / "a.png", fx.png_bytes(fx.rgb(32)))
  assert reason(path, max_pixels=32 * 32 - 1) == "too_many_pixels"
  images.load_image(str(path), 32, max_pixels=32 * 32)

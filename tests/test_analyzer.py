"""The analyzer reads Shapes images back exactly, survives degradation, and scores prompts."""

import io

import numpy as np
import pytest
from PIL import Image
from scipy import ndimage

from cm3leon_jax.data import analyzer, shapes
from cm3leon_jax.data.shapes import Obj, Scene
from cm3leon_jax.errors import InputError


def degrade(image, rng, blur_px, noise_std=8.0, levels=32):
  """The stated degradation: Gaussian blur (sigma blur_px), i.i.d. Gaussian colour noise
  (noise_std per channel, 0..255 scale), then quantisation to `levels` values per channel."""
  x = ndimage.gaussian_filter(image.astype(np.float32), (blur_px, blur_px, 0))
  x = np.clip(x + rng.normal(0.0, noise_std, x.shape), 0, 255)
  step = 256 / levels
  return np.clip((np.floor(x / step) + 0.5) * step, 0, 255).astype(np.uint8)


def jpeg(image, quality):
  buf = io.BytesIO()
  Image.fromarray(image).save(buf, "JPEG", quality=quality)
  return np.asarray(Image.open(buf).convert("RGB"))


def accuracy(size, count, transform=lambda image, rng: image, seed=11):
  rng = np.random.default_rng(seed)
  hits = 0
  for i in range(count):
    scene = shapes.scene_at(seed, i)
    hits += analyzer.parse_scene(transform(shapes.render(scene, size), rng)) == scene
  return hits / count


@pytest.mark.parametrize("size", [32, 64, 128, 256])
def test_clean_renders_are_read_back_exactly(size):
  assert accuracy(size, {32: 500, 64: 300, 128: 100, 256: 40}[size]) == 1.0


def test_degraded_renders_at_32px_blur_half_pixel_noise_8_quantised_32_levels():
  acc = accuracy(32, 500, lambda im, rng: degrade(im, rng, blur_px=0.5))
  assert acc >= 0.99


def test_degraded_renders_at_64px_blur_one_pixel_and_jpeg_75():
  acc = accuracy(64, 300, lambda im, rng: jpeg(degrade(im, rng, blur_px=1.0), 75))
  assert acc >= 0.98


@pytest.mark.slow
def test_must_show_10000_clean_and_10000_degraded_renders():
  """Issue 3 "Must show": 100% of 10,000 clean 32 px renders; >= 99% of 10,000 degraded by
  blur sigma 0.5 px + colour noise sigma 8 + quantisation to 32 levels per channel."""
  assert accuracy(32, 10_000) == 1.0
  assert accuracy(32, 10_000, lambda im, rng: degrade(im, rng, blur_px=0.5), seed=12) >= 0.99


def test_parse_returns_boxes_close_to_ground_truth():
  scene = Scene((Obj("square", "green", "large", 0, 2), Obj("circle", "pink", "small", 2, 1)))
  detections = analyzer.parse(shapes.render(scene, 96))
  assert [d.obj for d in detections] == list(scene.objects)
  for det, box in zip(detections, shapes.boxes(scene, 96)):
    assert max(abs(a - b) for a, b in zip(det.box, box)) <= 1


def test_empty_canvas_has_no_objects_and_its_background_is_named():
  image = np.empty((32, 32, 3), np.uint8)
  image[:] = shapes.BACKGROUNDS["mint"]
  assert analyzer.parse_scene(image) == Scene((), "mint")


def test_score_scene_counts_each_wrong_attribute():
  truth = Scene((Obj("circle", "red", "large", 0, 0), Obj("square", "blue", "small", 1, 1)))
  wrong = Scene((Obj("circle", "red", "large", 0, 0), Obj("square", "green", "small", 1, 1)))
  s = analyzer.score_scene(shapes.render(wrong, 64), truth)
  assert s == {"colour": 0.5, "shape": 1.0, "size": 1.0, "position": 1.0, "count": 1.0,
               "all": 0.0}
  assert analyzer.score_scene(shapes.render(truth, 64), truth)["all"] == 1.0


def test_score_scene_matches_a_moved_object_by_attributes():
  truth = Scene((Obj("circle", "red", "large", 0, 0),))
  moved = Scene((Obj("circle", "red", "large", 2, 2),))
  s = analyzer.score_scene(shapes.render(moved, 64), truth)
  assert (s["colour"], s["shape"], s["size"], s["position"], s["all"]) == (1, 1, 1, 0, 0)


def test_parse_prompt_reads_every_caption_template():
  for i in range(200):
    scene = shapes.scene_at(4, i)
    mentions = analyzer.parse_prompt(shapes.caption(scene, i))
    assert [(m.colour, m.shape, m.size) for m in mentions] == [
        (o.colour, o.shape, o.size) for o in scene.objects]


def test_score_prompt_checks_relations():
  image = shapes.render(Scene((Obj("circle", "red", "large", 0, 0),
                               Obj("square", "blue", "small", 2, 0))), 64)
  good = "a large red circle at the top left and a small blue square below it"
  bad = "a large red circle at the top left and a small blue square above it"
  assert analyzer.score_prompt(image, good)["all"] == 1.0
  s = analyzer.score_prompt(image, bad)
  assert s["position"] == 0.5 and s["colour"] == 1.0 and s["all"] == 0.0


def test_captions_of_rendered_scenes_score_perfectly():
  for i in range(100):
    scene = shapes.scene_at(5, i)
    assert analyzer.score_prompt(shapes.render(scene, 32), shapes.caption(scene, i))["all"] == 1


@pytest.mark.parametrize("image", [np.zeros((32, 32), np.uint8), np.zeros((32, 48, 3), np.uint8),
                                   np.zeros((32, 32, 3), np.float32),
                                   np.zeros((8, 8, 3), np.uint8)])
def test_bad_images_are_input_errors(image):
  with pytest.raises(InputError, match="analyzer"):
    analyzer.parse(image)


def test_prompt_without_objects_is_an_input_error():
  with pytest.raises(InputError, match="no Shapes object"):
    analyzer.score_prompt(np.zeros((32, 32, 3), np.uint8), "a photo of a dog")


def test_score_batch_averages_and_checks_lengths():
  scenes = [shapes.scene_at(0, i) for i in range(4)]
  images = np.stack([shapes.render(s, 32) for s in scenes])
  images[3] = shapes.BACKGROUNDS["white"]  # an empty canvas: every attribute of scene 3 wrong
  result = analyzer.score_batch(images, scenes)
  assert result["all"] == 0.75 and result["colour"] == 0.75 and result["count"] == 0.75
  with pytest.raises(InputError, match="4 images but 3 scenes"):
    analyzer.score_batch(images, scenes[:3])

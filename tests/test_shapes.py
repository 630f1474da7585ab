"""Shapes scenes: deterministic sampling, held-out pairs, rendering, ground-truth maps, captions."""

import numpy as np
import pytest

from cm3leon_jax.data import shapes
from cm3leon_jax.data.shapes import Obj, Scene
from cm3leon_jax.errors import InputError


def test_scene_at_is_deterministic_and_depends_on_index():
  assert shapes.scene_at(0, 5) == shapes.scene_at(0, 5)
  assert shapes.scene_at(0, 5) != shapes.scene_at(0, 6)
  assert shapes.scene_at(0, 5) != shapes.scene_at(1, 5)


def test_scenes_have_1_to_max_objects_in_distinct_cells_in_reading_order():
  counts = set()
  for i in range(300):
    scene = shapes.scene_at(0, i, max_objects=3)
    cells = [o.cell for o in scene.objects]
    assert 1 <= len(cells) <= 3 and cells == sorted(set(cells))
    counts.add(len(cells))
  assert counts == {1, 2, 3}


def test_the_vocabulary_is_at_least_what_the_issue_asks():
  assert len(shapes.SHAPES) >= 5 and len(shapes.COLOURS) == 8 and len(shapes.SIZES) == 2
  assert len(shapes.BACKGROUNDS) >= 2


def test_train_and_eval_never_contain_heldout_pairs_and_heldout_always_does():
  for i in range(500):
    for split in ("train", "eval"):
      pairs = {(o.colour, o.shape) for o in shapes.scene_at(0, i, split).objects}
      assert not pairs & shapes.HELDOUT_PAIRS
    pairs = {(o.colour, o.shape) for o in shapes.scene_at(0, i, "heldout").objects}
    assert pairs & shapes.HELDOUT_PAIRS


def test_render_paints_background_and_object_colour_exactly():
  scene = Scene((Obj("square", "red", "large", 1, 1),), "grey")
  image = shapes.render(scene, 63)  # 21 px cells: the square spans x, y in 22.68..40.32 px
  assert image.shape == (63, 63, 3) and image.dtype == np.uint8
  assert tuple(image[0, 0]) == shapes.BACKGROUNDS["grey"]
  assert tuple(image[31, 31]) == shapes.COLOURS["red"]
  assert tuple(image[30, 23]) == shapes.COLOURS["red"] and tuple(image[30, 21]) == (222,) * 3
  assert tuple(image[30, 22]) not in (shapes.COLOURS["red"], (222,) * 3)  # antialiased edge


def test_objects_stay_inside_their_cell():
  for shape in shapes.SHAPES:
    for row in range(3):
      for col in range(3):
        cov = shapes.coverage(Obj(shape, "red", "large", row, col), 96)
        outside = cov.copy()
        outside[32 * row:32 * row + 32, 32 * col:32 * col + 32] = 0
        assert outside.max() == 0.0, (shape, row, col)


def test_segmentation_labels_shape_classes_and_edges_outline_objects():
  scene = Scene((Obj("circle", "blue", "large", 0, 0), Obj("cross", "red", "small", 2, 2)))
  labels = shapes.segmentation(scene, 48)
  assert labels[8, 8] == 1 + shapes.SHAPES.index("circle")
  assert labels[40, 40] == 1 + shapes.SHAPES.index("cross")
  assert labels[24, 24] == 0
  assert set(np.unique(labels)) == {0, 1, 1 + shapes.SHAPES.index("cross")}
  seg = shapes.seg_image(labels)
  assert seg.shape == (48, 48, 3) and tuple(seg[24, 24]) == (0, 0, 0)
  edges = shapes.edge_map(scene, 48)
  assert edges[8, 8].max() == 0  # inside the circle: no edge
  # The circle's outline crosses its horizontal diameter at x = 8 +- 6.72 (radius 0.42 * 16).
  assert edges[8, 1].max() > 128 or edges[8, 2].max() > 128


def test_boxes_are_centred_in_the_cell_in_the_requested_frame():
  scene = Scene((Obj("circle", "blue", "large", 0, 0), Obj("square", "red", "small", 1, 2)))
  assert shapes.boxes(scene, 300) == [(8, 8, 92, 92), (220, 120, 280, 180)]


def test_captions_name_every_object_and_vary():
  scene = Scene((Obj("circle", "blue", "large", 0, 0), Obj("square", "red", "small", 2, 0)))
  texts = {shapes.caption(scene, seed) for seed in range(40)}
  assert len(texts) >= 8
  for text in texts:
    assert "blue circle" in text and "red square" in text
  assert any("below it" in t for t in texts)
  assert any("top left" in t for t in texts)


def test_relation_names_vertical_then_horizontal():
  a, b = Obj("circle", "red", "small", 2, 2), Obj("circle", "red", "small", 0, 0)
  assert shapes.relation(a, b) == "below and to the right of"
  assert shapes.relation(b, a) == "above and to the left of"


def test_glyph_draws_dark_text_centred_with_a_margin():
  image = shapes.glyph("HI", 64)
  dark = image.min(-1) < 128
  ys, xs = np.nonzero(dark)
  assert dark.any() and xs.min() > 0 and xs.max() < 63 and ys.min() > 0 and ys.max() < 63
  assert abs((xs.min() + xs.max()) / 2 - 31.5) <= 2
  assert not np.array_equal(image, shapes.glyph("HO", 64))


@pytest.mark.parametrize("size", [8, 2048, 32.0])
def test_bad_sizes_are_input_errors(size):
  with pytest.raises(InputError, match="image size"):
    shapes.render(shapes.scene_at(0, 0), size)


def test_glyph_rejects_empty_and_too_long_text():
  with pytest.raises(InputError, match="empty"):
    shapes.glyph("  ", 32)
  with pytest.raises(InputError, match="does not fit"):
    shapes.glyph("X" * (shapes.glyph_capacity(32) + 1), 32)
  shapes.glyph("X" * shapes.glyph_capacity(32), 32)


def test_scene_round_trips_through_dict():
  scene = shapes.scene_at(3, 3)
  assert Scene.from_dict(scene.to_dict()) == scene

"""Shapes attribute metrics: image accuracy, caption attribute recall, the chance baseline."""

import numpy as np
import pytest

from cm3leon_jax.data import shapes
from cm3leon_jax.data.shapes import Obj, Scene
from cm3leon_jax.errors import InputError
from cm3leon_jax.eval import attributes

RED_CIRCLE = Obj("circle", "red", "large", 0, 0)      # top left
BLUE_SQUARE = Obj("square", "blue", "small", 1, 0)    # left (middle row), below the circle
TWO = Scene((RED_CIRCLE, BLUE_SQUARE), "white")


def test_chance_is_one_over_each_cardinality_of_shapes_py():
  c = attributes.chance(1)
  assert c["colour"] == pytest.approx(1 / 8) and len(shapes.COLOUR_NAMES) == 8
  assert c["shape"] == pytest.approx(1 / 5) and len(shapes.SHAPES) == 5
  assert c["size"] == pytest.approx(1 / 2)
  assert c["position"] == pytest.approx(1 / 9)
  assert c["all"] == pytest.approx(1 / 720)  # 8 * 5 * 2 * 9


def test_chance_of_every_attribute_of_two_objects_is_squared():
  assert attributes.chance(2)["all"] == pytest.approx(1 / 720 ** 2)
  one = Scene((RED_CIRCLE,))
  assert attributes.chance_for_scenes([one, TWO])["all"] == pytest.approx(
      (1 / 720 + 1 / 720 ** 2) / 2)


def test_image_accuracy_of_clean_renders_is_perfect():
  scenes = [shapes.scene_at(0, i) for i in range(4)]
  images = np.stack([shapes.render(s, 32) for s in scenes])
  assert attributes.image_accuracy(images, scenes)["all"] == 1.0


def test_image_accuracy_sees_a_wrong_colour():
  wrong = Scene((Obj("circle", "green", "large", 0, 0),), "white")
  acc = attributes.image_accuracy(shapes.render(wrong, 32)[None], [Scene((RED_CIRCLE,), "white")])
  assert acc["colour"] == 0.0 and acc["shape"] == 1.0 and acc["position"] == 1.0
  assert acc["all"] == 0.0


def test_an_exact_caption_recalls_everything():
  r = attributes.recall_one("a large red circle at the top left and a small blue square below it",
                            TWO)
  assert r == {"colour": 1.0, "shape": 1.0, "size": 1.0, "position": 1.0, "count": 1.0,
               "all": 1.0}


def test_one_wrong_colour_of_two_objects_halves_colour_recall():
  r = attributes.recall_one("a large red circle at the top left and a small green square on the "
                            "left", TWO)
  assert r["colour"] == 0.5 and r["shape"] == 1.0 and r["position"] == 1.0
  assert r["all"] == 0.0


def test_a_wrong_relation_misses_the_position():
  # The square is straight below the circle, not below and to the right of it.
  r = attributes.recall_one("a large red circle at the top left and a small blue square below "
                            "and to the right of it", TWO)
  assert r["position"] == 0.5 and r["colour"] == 1.0


def test_unstated_attributes_are_missed():
  # Size and position left out: recall counts them as not recalled.
  r = attributes.recall_one("a red circle", Scene((RED_CIRCLE,)))
  assert (r["colour"], r["shape"], r["size"], r["position"]) == (1.0, 1.0, 0.0, 0.0)


def test_a_missing_object_and_an_extra_object():
  missing = attributes.recall_one("a large red circle at the top left", TWO)
  assert missing["colour"] == 0.5 and missing["count"] == 0.0 and missing["all"] == 0.0
  extra = attributes.recall_one("a large red circle at the top left and a small blue square on "
                                "the left and a small pink cross in the centre", TWO)
  assert extra["colour"] == 1.0 and extra["position"] == 1.0
  assert extra["count"] == 0.0 and extra["all"] == 0.0


def test_mentions_in_any_order_match_their_objects():
  r = attributes.recall_one("a small blue square on the left and a large red circle at the top "
                            "left", TWO)
  assert r["all"] == 1.0


def test_a_caption_naming_no_object_recalls_nothing():
  r = attributes.recall_one("erererer", TWO)
  assert all(v == 0.0 for v in r.values())


def test_the_datasets_own_captions_have_full_recall():
  scenes = [shapes.scene_at(3, i) for i in range(60)]
  captions = [shapes.caption(s, i) for i, s in enumerate(scenes)]
  assert attributes.caption_recall(captions, scenes)["all"] == 1.0


def test_caption_recall_length_mismatch_is_an_error():
  with pytest.raises(InputError, match="2 captions but 1 scenes"):
    attributes.caption_recall(["a", "b"], [TWO])


def test_wilson_interval_of_half_of_32_is_symmetric_about_one_half():
  # p = 0.5, z^2 / n = 3.8416 / 32: centre 0.5, half-width 1.96 * sqrt(0.25 / 32 + 3.8416 /
  # 4096) / 1.12005 = 0.16369.
  lo, hi = attributes.wilson_interval(16, 32)
  assert lo == pytest.approx(0.33631, abs=1e-5)
  assert hi == pytest.approx(0.66369, abs=1e-5)


def test_wilson_interval_at_zero_successes_starts_at_zero_and_is_not_empty():
  # k = 0: the interval is [0, (z^2 / n) / (1 + z^2 / n)] = [0, 0.38416 / 1.38416].
  lo, hi = attributes.wilson_interval(0, 10)
  assert lo == 0.0
  assert hi == pytest.approx(0.27754, abs=1e-5)
  assert attributes.wilson_interval(10, 10)[1] == 1.0


def test_wilson_interval_rejects_no_trials_and_impossible_counts():
  with pytest.raises(InputError, match="n = 0"):
    attributes.wilson_interval(0, 0)
  with pytest.raises(InputError, match="5 successes out of 4"):
    attributes.wilson_interval(5, 4)

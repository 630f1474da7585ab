"""Task records: every SFT task of REFERENCE.md section 6, the paper's templates, exact targets."""

import numpy as np
import pytest

from cm3leon_jax.data import analyzer, shapes, tasks
from cm3leon_jax.data.shapes import Obj, Scene
from cm3leon_jax.errors import InputError

TEMPLATES = {
    "caption_image": r"^[^<]+ <break> <image>$",
    "image_caption": r"^<image> <break> Describe the given picture\. .+$",
    "edit": r"^Edit first image following the instruction <break> <image> <break> "
            r"(make|turn|move|add|remove) .+ <break> <image>$",
    "grounded": r"^Generate high quality image of .+ with segmentations .+ at \(\d+, \d+\) -> "
                r"\(\d+, \d+\).* <break> <image>$",
    "seg_to_image": r"^Make high quality image from segmentation map features <break> <image> "
                    r"<break> [^<]+ <break> <image>$",
    "edge_to_image": r"^Make high quality image from canny edge features <break> <image> "
                     r"<break> [^<]+ <break> <image>$",
    "segmentation": r"^<image> <break> Make segmentation map of the given picture <break> <image>$",
    "vqa": r"^<image> <break> Question: .+\? Answer: .+\.$",
    "how_to_write": r'^draw "[a-z]+" <break> <image>$',
}


@pytest.mark.parametrize("task", tasks.TASKS)
def test_every_task_follows_its_template(task):
  for i in range(12):
    record = tasks.make_task(task, 0, i, "train", 32)
    assert record.task == task
    assert __import__("re").match(TEMPLATES[task], record.text()), record.text()
    for seg in record.segments:
      assert isinstance(seg, str) or (seg.shape == (32, 32, 3) and seg.dtype == np.uint8)


def test_records_are_deterministic():
  a = tasks.make_task("edit", 1, 5, "train", 32)
  b = tasks.make_task("edit", 1, 5, "train", 32)
  assert a.text() == b.text() and np.array_equal(a.segments[3], b.segments[3])


def test_targets_are_what_the_final_image_shows():
  for task in ("caption_image", "edit", "grounded", "seg_to_image", "edge_to_image"):
    for i in range(20):
      record = tasks.make_task(task, 2, i, "train", 32)
      assert analyzer.parse_scene(record.segments[-1]) == record.target, (task, i)


def test_every_edit_kind_changes_exactly_what_the_instruction_says():
  scene = Scene((Obj("circle", "red", "large", 0, 0), Obj("square", "blue", "small", 1, 1)))
  rng = np.random.default_rng(0)
  seen = {}
  for kind in tasks.EDITS:
    text, after = tasks.make_edit(scene, rng, "train", kind)
    seen[kind] = (text, after)
  text, after = seen["recolour"]
  assert text.startswith("make the ") and len(after.objects) == 2
  assert sum(a != b for a, b in zip(scene.objects, after.objects)) == 1
  text, after = seen["remove"]
  assert text.startswith("remove the ") and len(after.objects) == 1
  text, after = seen["add"]
  assert text.startswith("add a ") and len(after.objects) == 3
  text, after = seen["move"]
  assert text.startswith("move the ") and {o.cell for o in after.objects} != {0, 4}
  assert sorted((o.shape, o.colour) for o in after.objects) == [("circle", "red"),
                                                                ("square", "blue")]
  text, after = seen["reshape"]
  assert text.startswith("turn the ") and " into a " in text


def test_remove_needs_two_objects():
  one = Scene((Obj("circle", "red", "large", 0, 0),))
  with pytest.raises(InputError, match="does not apply"):
    tasks.make_edit(one, np.random.default_rng(0), "train", "remove")


def test_grounded_boxes_are_in_a_256_pixel_frame():
  assert tasks.box_text(Obj("circle", "red", "large", 0, 0)) == "(7, 7) -> (79, 79)"
  assert tasks.box_text(Obj("circle", "red", "small", 2, 2)) == "(188, 188) -> (239, 239)"


def test_vqa_answers_are_right():
  scene = Scene((Obj("circle", "red", "large", 0, 0), Obj("square", "red", "small", 2, 1)))
  answers = {}
  for seed in range(60):
    q, a = tasks.make_vqa(scene, np.random.default_rng(seed))
    answers[q] = a
  assert answers["How many objects are there?"] == "2"
  assert answers.get("How many red objects are there?", "2") == "2"
  assert answers["What colour is the object at the top left?"] == "red"
  assert answers["What shape is the object at the bottom?"] == "square"
  assert answers["Where is the red circle?"] == "top left"
  kinds = {q.split()[1] for q in answers}
  assert {"many", "colour", "shape", "is"} <= kinds


def test_how_to_write_draws_the_quoted_word():
  record = tasks.make_task("how_to_write", 0, 3, "train", 64)
  word = record.answer
  assert record.segments[0] == f'draw "{word}"'
  background = shapes.BACKGROUNDS[shapes.scene_at(0, 3).background]
  assert np.array_equal(record.segments[1], shapes.glyph(word, 64, shapes.scene_at(0, 3).background))
  assert (record.segments[1] != background).any()


def test_train_records_never_show_a_heldout_pair_and_heldout_records_do():
  def pairs(scene):
    return {(o.colour, o.shape) for o in scene.objects}
  for record in tasks.task_records("train", 450, 16, tasks=("caption_image", "edit")):
    assert not pairs(record.target) & shapes.HELDOUT_PAIRS
    assert not any(f"{c} {s}" in record.text() for c, s in shapes.HELDOUT_PAIRS)
  for i in range(50):
    assert pairs(shapes.scene_at(0, i, "heldout")) & shapes.HELDOUT_PAIRS
    record = tasks.make_task("caption_image", 0, i, "heldout", 16)
    assert pairs(record.target) & shapes.HELDOUT_PAIRS


def test_task_records_cycle_through_tasks():
  names = [r.task for r in tasks.task_records("eval", 18, 16)]
  assert names == list(tasks.TASKS) * 2


def test_unknown_task_is_an_input_error():
  with pytest.raises(InputError, match="task 'paint'"):
    tasks.make_task("paint", 0, 0)
  with pytest.raises(InputError, match="task 'paint'"):
    list(tasks.task_records(tasks=("vqa", "paint")))

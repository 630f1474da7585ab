"""Instruction-tuning task records from Shapes scenes: every SFT task of REFERENCE.md section 6.

    record = make_task("edit", seed=0, index=12, split="train", size=32)
    record.segments   # ("Edit first image following the instruction", image_HW3,
                      #  "make the large red circle blue", image_HW3)
    record.target     # the Scene the last image shows (what analyzer.score_scene checks)
    for record in task_records("train", count=1000, size=32): ...

A record is a sequence of segments, str (text) or uint8 [S, S, 3] (an image); serialising it is
`Vocab.document_to_ids` after tokenising each segment (each image becomes `<break> I <break>`,
which is where the paper's templates put `<break>`). Templates, in TASKS order:

  caption_image    {caption} <break> {image}                                      (paper)
  image_caption    <break> {image} <break> Describe the given picture. {caption}  (paper's
                   words; image first so a causal model can caption it, DECIDED)
  edit             Edit first image following the instruction <break> {before} <break>
                   {instruction} <break> {after}       (recolour | reshape | move | add | remove)
  grounded         Generate high quality image of {caption} with segmentations {obj} at
                   (x0, y0) -> (x1, y1), ... <break> {image}     (boxes in a 256-pixel frame)
  seg_to_image     Make high quality image from segmentation map features <break> {seg} <break>
                   {caption} <break> {image}
  edge_to_image    Make high quality image from canny edge features <break> {edges} <break>
                   {caption} <break> {image}
  segmentation     <break> {image} <break> Make segmentation map of the given picture
                   <break> {seg}                                                  (DECIDED)
  vqa              <break> {image} <break> Question: {q} Answer: {a}.   (colour, shape, count,
                   position; image first, as for captioning)
  how_to_write     draw "{text}" <break> {glyph image}                            (paper)

Held-out compositions: records of split "heldout" are built from scenes that contain a
(colour, shape) pair of shapes.HELDOUT_PAIRS; "train"/"eval" records never show one, in any
image (edit targets included) or text.
"""

from __future__ import annotations

import dataclasses
from typing import Iterator, Sequence, Union

import numpy as np

from cm3leon_jax.data import shapes
from cm3leon_jax.data.shapes import Obj, Scene
from cm3leon_jax.errors import InputError

TASKS = ("caption_image", "image_caption", "edit", "grounded", "seg_to_image", "edge_to_image",
         "segmentation", "vqa", "how_to_write")
EDITS = ("recolour", "reshape", "move", "add", "remove")
VQA_KINDS = ("colour", "shape", "count", "position")
BOX_FRAME = 256  # grounded prompts write boxes in a 256-pixel frame (paper)
_WORDS = ("cat", "dog", "sun", "map", "key", "box", "red", "tree", "moon", "fish", "bird", "cup",
          "ship", "star", "leaf", "rain", "jam", "owl", "fox", "hat")

Segment = Union[str, np.ndarray]


@dataclasses.dataclass(frozen=True)
class TaskRecord:
  task: str
  segments: tuple[Segment, ...]
  target: Scene | None = None  # scene of the final image (None: how_to_write / text answers)
  answer: str | None = None  # vqa: the answer; image_caption: the caption

  def text(self) -> str:
    """The record with images shown as <image>, for reading and tests."""
    return " <break> ".join(s if isinstance(s, str) else "<image>" for s in self.segments)


def box_text(obj: Obj, frame: int = BOX_FRAME) -> str:
  x0, y0, x1, y1 = shapes.boxes(Scene((obj,)), frame)[0]
  return f"({x0}, {y0}) -> ({x1}, {y1})"


def _allowed(obj: Obj, split: str) -> bool:
  return split == "heldout" or (obj.colour, obj.shape) not in shapes.HELDOUT_PAIRS


def _choice(rng: np.random.Generator, options: Sequence):
  return options[int(rng.integers(len(options)))]


def _where(obj: Obj) -> str:
  return "in the centre" if obj.cell == 4 else f"at the {obj.position}"


def make_edit(scene: Scene, rng: np.random.Generator, split: str,
              kind: str | None = None) -> tuple[str, Scene]:
  """(instruction, edited scene). Train/eval edits never create a held-out pair."""
  objs = list(scene.objects)
  free = [c for c in range(9) if c not in {o.cell for o in objs}]
  kinds = [k for k in EDITS if not (k == "remove" and len(objs) < 2)
           and not (k in ("add", "move") and not free)]
  kind = kind or _choice(rng, kinds)
  if kind not in kinds:
    raise InputError(f"edit {kind!r} does not apply to a scene of {len(objs)} objects")
  i = int(rng.integers(len(objs)))
  o = objs[i]
  name = f"the {o.describe()}"
  if [x.describe() for x in objs].count(o.describe()) > 1:
    name += f" {_where(o)}"  # two identical objects: say which
  for _ in range(100):  # resample until the result respects the split
    if kind == "recolour":
      colour = _choice(rng, [c for c in shapes.COLOUR_NAMES if c != o.colour])
      new, text = dataclasses.replace(o, colour=colour), f"make {name} {colour}"
    elif kind == "reshape":
      shape = _choice(rng, [s for s in shapes.SHAPES if s != o.shape])
      new, text = dataclasses.replace(o, shape=shape), f"turn {name} into a {shape}"
    elif kind == "move":
      cell = _choice(rng, free)
      new = dataclasses.replace(o, row=cell // 3, col=cell % 3)
      text = f"move {name} to the {new.position}"
    elif kind == "add":
      cell = _choice(rng, free)
      new = Obj(_choice(rng, shapes.SHAPES), _choice(rng, shapes.COLOUR_NAMES),
                _choice(rng, shapes.SIZE_NAMES), cell // 3, cell % 3)
      text = f"add a {new.describe()} {_where(new)}"
    else:
      after = Scene(tuple(objs[:i] + objs[i + 1:]), scene.background)
      return f"remove {name}", after
    if _allowed(new, split):
      break
  else:
    raise AssertionError(f"no {kind} edit of {scene} avoids the held-out pairs")
  rest = objs if kind == "add" else objs[:i] + objs[i + 1:]
  after = Scene(tuple(sorted(rest + [new], key=lambda x: x.cell)), scene.background)
  return text, after


def _unique(objs: Sequence[Obj], key) -> list[Obj]:
  values = [key(o) for o in objs]
  return [o for o, v in zip(objs, values) if values.count(v) == 1]


def make_vqa(scene: Scene, rng: np.random.Generator, kind: str | None = None) -> tuple[str, str]:
  """(question, answer) about the scene; every question has exactly one right answer."""
  objs = scene.objects
  kind = kind or _choice(rng, VQA_KINDS)
  if kind == "count":
    if rng.random() < 0.5:
      return "How many objects are there?", str(len(objs))
    colour = _choice(rng, shapes.COLOUR_NAMES)
    return (f"How many {colour} objects are there?",
            str(sum(o.colour == colour for o in objs)))
  if kind == "colour":
    o = _choice(rng, objs)
    return f"What colour is the object {_where(o)}?", o.colour
  if kind == "shape":
    o = _choice(rng, objs)
    return f"What shape is the object {_where(o)}?", o.shape
  if kind == "position":
    o = _choice(rng, _unique(objs, lambda x: (x.colour, x.shape)) or objs[:1])
    return f"Where is the {o.colour} {o.shape}?", o.position
  raise InputError(f"vqa kind {kind!r}: expected one of {VQA_KINDS}")


def vqa_text(question: str, answer: str | None = None) -> str:
  """The VQA record's text; without an answer, the prompt a model completes (decode/api.py)."""
  prompt = f"Question: {question} Answer:"
  return prompt if answer is None else f"{prompt} {answer}."


def make_task(task: str, seed: int, index: int, split: str = "train", size: int = 32,
              max_objects: int = 3) -> TaskRecord:
  """Task record `index` of `task` in `split`: a pure function of its arguments."""
  if task not in TASKS:
    raise InputError(f"task {task!r}: expected one of {TASKS}")
  scene = shapes.scene_at(seed, index, split, max_objects)
  rng = np.random.default_rng([seed, 11, TASKS.index(task), shapes.SPLITS.index(split), index])
  image = shapes.render(scene, size)
  caption = shapes.caption(scene, rng)
  if task == "caption_image":
    return TaskRecord(task, (caption, image), scene)
  if task == "image_caption":
    return TaskRecord(task, (image, f"Describe the given picture. {caption}"), None, caption)
  if task == "edit":
    instruction, after = make_edit(scene, rng, split)
    return TaskRecord(task, ("Edit first image following the instruction", image, instruction,
                             shapes.render(after, size)), after)
  if task == "grounded":
    regions = ", ".join(f"{o.describe()} at {box_text(o)}" for o in scene.objects)
    return TaskRecord(task, (f"Generate high quality image of {caption} with segmentations "
                             f"{regions}", image), scene)
  if task in ("seg_to_image", "edge_to_image"):
    condition = (shapes.seg_image(shapes.segmentation(scene, size)) if task == "seg_to_image"
                 else shapes.edge_map(scene, size))
    kind = "segmentation map" if task == "seg_to_image" else "canny edge"
    return TaskRecord(task, (f"Make high quality image from {kind} features", condition, caption,
                             image), scene)
  if task == "segmentation":
    return TaskRecord(task, (image, "Make segmentation map of the given picture",
                             shapes.seg_image(shapes.segmentation(scene, size))), None)
  if task == "vqa":
    question, answer = make_vqa(scene, rng)
    return TaskRecord(task, (image, vqa_text(question, answer)), None, answer)
  # how_to_write: a word (or two) that fits the canvas
  capacity = shapes.glyph_capacity(size)
  words = [w for w in _WORDS if len(w) <= capacity] or [_WORDS[0][:capacity]]
  text = _choice(rng, words)
  return TaskRecord(task, (f'draw "{text}"', shapes.glyph(text, size, scene.background)), None,
                    text)


def task_records(split: str = "train", count: int = 1000, size: int = 32, seed: int = 0,
                 tasks: Sequence[str] = TASKS, max_objects: int = 3) -> Iterator[TaskRecord]:
  """`count` records cycling through `tasks` (record i is task tasks[i % len(tasks)])."""
  for task in tasks:
    if task not in TASKS:
      raise InputError(f"task {task!r}: expected one of {TASKS}")
  for i in range(count):
    yield make_task(tasks[i % len(tasks)], seed, i, split, size, max_objects)

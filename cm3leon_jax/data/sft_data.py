"""Instruction-tuning token documents: the Shapes task records of tasks.py through the text and
VQ tokenizers, one ArrayRecord directory per task and split, which the Grain pipeline mixes
for `cm3leon sft` (train/sft.py).

    directory = sft_data.build(config, "vqa", "train", 20000, text_tokenizer, image_tokenizer)
    <workdir>/sft_tokens/vqa          records of train scenes (what SFT trains on)
    <workdir>/sft_tokens/vqa-eval     records of eval scenes (the held-out loss)

Record i of a task is `tasks.make_task(task, data.seed, i, split, vq.image_size,
data.max_objects)` serialised by `Vocab.document_to_ids` (each image becomes `<break> I
<break>`), the same record format as `cm3leon encode`'s documents, so the pipeline's CM3
transform treats both alike. Train records come from train scenes only, which never show a
held-out colour-shape pair (tasks.py), and eval records from the eval scenes the evaluation
suites ask about.

Built once: a directory whose meta.json holds the same job (task, split, count, seed, size,
the tokenizers' identities) is reused; otherwise it is rebuilt, atomically
(records.write_records: a killed build leaves no half-written directory).
"""

from __future__ import annotations

import os
import sys
from typing import Sequence

import numpy as np
from tqdm import tqdm

from cm3leon_jax.data import records, tasks
from cm3leon_jax.errors import InputError
from cm3leon_jax.paths import artifacts
from cm3leon_jax.tokenizers.vocab import ImageSegment, TextSegment, Vocab

# Records rendered per step; images are VQ-encoded in chunks of IMAGE_CHUNK (the last chunk
# padded) so the jitted encoder compiles once, whatever the task's images per record.
BATCH = 256
IMAGE_CHUNK = 256


def parse_tasks(text: str) -> tuple[str, ...]:
  """`sft.tasks` ("vqa,edit") -> task names, each checked against tasks.TASKS."""
  names = tuple(t.strip() for t in str(text).split(",") if t.strip())
  if not names:
    raise InputError("--config.sft.tasks is empty: name at least one of "
                     f"{', '.join(tasks.TASKS)}")
  unknown = [t for t in names if t not in tasks.TASKS]
  if unknown:
    raise InputError(f"--config.sft.tasks: unknown {unknown} (choose from "
                     f"{', '.join(tasks.TASKS)})")
  if len(set(names)) != len(names):
    raise InputError(f"--config.sft.tasks={text!r} names a task twice")
  return names


def task_dir(config, task: str, split: str = "train") -> str:
  base = os.path.join(artifacts(config).sft_tokens, task)
  return base if split == "train" else f"{base}-{split}"


def encode_images(images: Sequence[np.ndarray], image_tokenizer) -> np.ndarray:
  """uint8 [S, S, 3] images -> int32 [n, N] codes, in fixed-size chunks (one compile)."""
  out = []
  for start in range(0, len(images), IMAGE_CHUNK):
    chunk = np.stack(images[start:start + IMAGE_CHUNK])
    n = len(chunk)
    if n < IMAGE_CHUNK:
      chunk = np.concatenate([chunk, np.repeat(chunk[-1:], IMAGE_CHUNK - n, axis=0)])
    out.append(image_tokenizer.encode(chunk)[:n])
  return np.concatenate(out) if out else np.zeros((0, image_tokenizer.num_codes), np.int32)


def document_ids(batch: Sequence[tasks.TaskRecord], text_tokenizer, image_tokenizer,
                 vocab: Vocab) -> list[np.ndarray]:
  """Each record's segments tokenised (text by the text tokenizer, images by the VQ) and
  serialised into one document's ids (ending with `<eos>`)."""
  texts = [s for r in batch for s in r.segments if isinstance(s, str)]
  images = [s for r in batch for s in r.segments if not isinstance(s, str)]
  text_ids = iter(text_tokenizer.encode_batch(texts))
  codes = iter(encode_images(images, image_tokenizer))
  out = []
  for r in batch:
    doc = [TextSegment(next(text_ids)) if isinstance(s, str) else ImageSegment(next(codes))
           for s in r.segments]
    out.append(vocab.document_to_ids(doc))
  return out


def job(config, task: str, split: str, count: int, text_tokenizer_id: str, vq_id: str) -> dict:
  """What a task directory depends on; equal jobs give byte-identical directories."""
  return {"task": task, "split": split, "count": int(count), "seed": int(config.data.seed),
          "image_size": int(config.vq.image_size), "max_objects": int(config.data.max_objects),
          "text_tokenizer": text_tokenizer_id, "vq": vq_id}


def is_built(directory: str, wanted: dict) -> bool:
  if not os.path.isfile(os.path.join(directory, records.META)):
    return False
  try:
    return records.read_meta(directory).get("job") == wanted
  except InputError:  # an unreadable meta.json: rebuild
    return False


def build(config, task: str, split: str, count: int, text_tokenizer, image_tokenizer, *,
          text_tokenizer_id: str, vq_id: str, progress: bool = False, write: bool = True) -> str:
  """The token documents of `count` records of `task` in `split`; returns the directory.
  `write=False` encodes without writing (the other processes of a multi-process job, whose
  jitted VQ encode is a collective)."""
  if int(count) < 1:
    raise InputError(f"sft data for {task!r} ({split}): {count} records; "
                     "--config.sft.records_per_task and eval_records_per_task must be >= 1")
  vocab = Vocab.from_config(config)
  directory = task_dir(config, task, split)
  wanted = job(config, task, split, count, text_tokenizer_id, vq_id)
  if is_built(directory, wanted):
    return directory
  size, seed = int(config.vq.image_size), int(config.data.seed)
  max_objects = int(config.data.max_objects)
  bar = tqdm(total=int(count), desc=f"sft data {os.path.basename(directory)}", unit="doc",
             disable=not progress, file=sys.stderr)

  def encoded():
    for start in range(0, int(count), BATCH):
      batch = [tasks.make_task(task, seed, i, split, size, max_objects)
               for i in range(start, min(int(count), start + BATCH))]
      for offset, ids in enumerate(document_ids(batch, text_tokenizer, image_tokenizer, vocab)):
        yield records.encode_tokens(start + offset, ids)
      bar.update(len(batch))

  meta = {"kind": "tokens", "vocab_size": vocab.size, "image_tokens": image_tokenizer.num_codes,
          "job": wanted}
  if write:
    records.write_records(directory, encoded(), meta)
  else:
    for _ in encoded():
      pass
  bar.close()
  return directory

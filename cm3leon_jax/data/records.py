"""On-disk record formats shared by the offline jobs and the input pipeline.

Two record kinds, each stored as ArrayRecord shards in one directory with a `meta.json`:

- token documents (`cm3leon encode`): one document per record, its global vocabulary ids
  (`Vocab.document_to_ids`: segments, then `<eos>`), prefixed by its document id.
- neighbours (`cm3leon retrieve`): per query document, the ids of its retrieved memory-bank
  documents, best first.

A document id is the record's index in its directory (shards in name order), so a memory-bank
document is fetched by `source[doc_id]` with no lookup table. Records are little-endian:
`int64 doc_id` then the payload (`int32` token ids or `int64` neighbour ids).
"""

from __future__ import annotations

import contextlib
import glob
import json
import os
import shutil
import struct

import numpy as np
from array_record.python import array_record_module

from cm3leon_jax.errors import InputError

META = "meta.json"
_HEADER = struct.Struct("<q")


def encode_tokens(doc_id: int, ids_L: np.ndarray) -> bytes:
  return _HEADER.pack(int(doc_id)) + np.asarray(ids_L, dtype="<i4").tobytes()


def decode_tokens(record: bytes) -> tuple[int, np.ndarray]:
  (doc_id,) = _HEADER.unpack_from(record)
  return doc_id, np.frombuffer(record, dtype="<i4", offset=_HEADER.size).astype(np.int32)


def encode_neighbours(doc_id: int, neighbour_ids_K: np.ndarray) -> bytes:
  return _HEADER.pack(int(doc_id)) + np.asarray(neighbour_ids_K, dtype="<i8").tobytes()


def decode_neighbours(record: bytes) -> tuple[int, np.ndarray]:
  (doc_id,) = _HEADER.unpack_from(record)
  return doc_id, np.frombuffer(record, dtype="<i8", offset=_HEADER.size).astype(np.int64)


def shard_paths(directory: str) -> list[str]:
  """The ArrayRecord shards of a record directory, in document-id order."""
  if not os.path.isfile(os.path.join(directory, META)):
    raise InputError(f"{directory}: not a record directory (no {META}); was the job finished?")
  paths = sorted(glob.glob(os.path.join(directory, "*.array_record")))
  if not paths:
    raise InputError(f"{directory}: no .array_record shards")
  return paths


def read_meta(directory: str) -> dict:
  path = os.path.join(directory, META)
  try:
    with open(path) as f:
      return json.load(f)
  except FileNotFoundError:
    raise InputError(f"{path}: missing; was the job that writes {directory} finished?") from None
  except json.JSONDecodeError as e:
    raise InputError(f"{path}: corrupt ({e.msg})") from None


@contextlib.contextmanager
def atomic_directory(directory: str):
  """Yield a temp directory beside `directory`; on success it replaces `directory` (rename), on
  any error it is removed, so readers never see a half-written directory."""
  tmp = f"{directory.rstrip('/')}.tmp-{os.getpid()}"
  shutil.rmtree(tmp, ignore_errors=True)
  os.makedirs(tmp)
  try:
    yield tmp
  except BaseException:
    shutil.rmtree(tmp, ignore_errors=True)
    raise
  if os.path.exists(directory):
    shutil.rmtree(directory)
  os.replace(tmp, directory)


def write_records(directory: str, records, meta: dict, records_per_shard: int = 100_000) -> int:
  """Write an iterable of encoded records + meta.json atomically (temp dir, then rename).

  Returns the number of records. An existing `directory` is replaced only on success.
  """
  count, shard, writer = 0, 0, None
  with atomic_directory(directory) as tmp:
    for record in records:
      if writer is None:
        writer = array_record_module.ArrayRecordWriter(
            os.path.join(tmp, f"records-{shard:05d}.array_record"), "group_size:1")
      writer.write(record)
      count += 1
      if count % records_per_shard == 0:
        writer.close()
        writer, shard = None, shard + 1
    if writer is not None:
      writer.close()
    with open(os.path.join(tmp, META), "w") as f:
      json.dump({**meta, "num_records": count}, f, indent=1)
  return count


# --- resumable writing, one shard at a time (`cm3leon encode`) ---------------------------------
# A job writes shard i as `records-{i:05d}.array_record` inside a work directory, each shard
# atomically (temp name, then rename), so after a kill every shard present is complete; a rerun
# skips them. `finish_shards` adds meta.json and renames the work directory into place.
def shard_name(index: int) -> str:
  return f"records-{index:05d}.array_record"


def write_shard(path: str, records) -> int:
  """Write one shard of encoded records atomically; returns the number of records."""
  tmp = f"{path}.tmp-{os.getpid()}"  # not *.array_record, so shard_paths never lists it
  count = 0
  try:
    writer = array_record_module.ArrayRecordWriter(tmp, "group_size:1")
    for record in records:
      writer.write(record)
      count += 1
    writer.close()
  except BaseException:
    if os.path.exists(tmp):
      os.remove(tmp)
    raise
  os.replace(tmp, path)
  return count


def finish_shards(work_dir: str, directory: str, meta: dict, num_records: int) -> None:
  """Write meta.json into a work directory of complete shards, then move it to `directory`."""
  tmp = os.path.join(work_dir, META + ".tmp")
  with open(tmp, "w") as f:
    json.dump({**meta, "num_records": num_records}, f, indent=1)
  os.replace(tmp, os.path.join(work_dir, META))
  if os.path.exists(directory):
    shutil.rmtree(directory)
  os.replace(work_dir, directory)

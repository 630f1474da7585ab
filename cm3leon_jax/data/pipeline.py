"""The Grain input pipeline: token documents + static neighbours -> CM3-masked, packed batches.

    it = pipeline.make_iterator(config)              # a checkpointable grain DatasetIterator
    batch = next(it)                                 # local numpy batch (this process's rows)
    arrays = mesh.global_batch(batch, the_mesh)      # cm3leon_jax.train.mesh: global jax.Arrays

THE BATCH CONTRACT: a dict of numpy arrays, each [B, L] with B = train.batch_size /
jax.process_count() (this process's share) and L = model.seq_len:
  inputs       int32    token ids; `<pad>` (0) on padding
  targets      int32    next-token ids: the inputs shifted left within each packed segment (a
                        segment's last target is its closing `<eos>`, never the next segment)
  weights      float32  loss weights: 0 on padding and on sentinel (`<mask:i>`) targets, 1 else
  image_index  int32    each image code's raster index in its image, also where CM3 moved it
                        (cm3.py `masked_image_index`); -1 on other tokens and padding
  segment_ids  int32    1, 2, 3, ... per packed sequence in the row; 0 on padding
  positions    int32    0-based position within its segment; 0 on padding
With `data.packing = False` every row holds one sequence (segment id 1) and padding.

Stages (DESIGN.md: only cheap host work here):
  ArrayRecord token documents (records.py; doc id == record index)
  -> this process's shard ([process_index::process_count], equal sizes on every host)
  -> shuffle (data.shuffle_seed, reshuffled every epoch) -> repeat
  -> join with the static neighbours: `retrieval.num_train_docs` picked at random (seeded per
     example) and read from the memory bank; a `retrieval.no_retrieval_rate` fraction of the
     examples gets none (the query document alone) -> assembly + CM3 masking (assembly.py, cm3.py)
  -> task mixture (weights; SFT adds tasks) -> pack or pad to L (packing.py) -> batch
  -> multiprocess prefetch (`data.num_workers` processes, `data.prefetch` batches each).
Every random choice comes from Grain's per-element generators, so a run is a pure function of
(config, data, num_workers): the iterator's `get_state()` / `set_state()` (or
`grain.checkpoint.CheckpointSave/Restore` inside an Orbax CheckpointManager) resume it exactly.

Bad input is counted, warned about and skipped (empty or malformed documents, query documents
whose first image alone exceeds the window, neighbour ids outside the memory bank); past
`data.max_skipped_fraction` the pipeline stops with an InputError naming the directory.
Query documents longer than the window are cut at a segment boundary (never inside an image),
with a counted warning.
"""

from __future__ import annotations

import collections
import dataclasses
import logging
import os
from typing import Sequence

import grain
from absl import flags
import numpy as np

from cm3leon_jax.data import packing, records
from cm3leon_jax.data.assembly import Assembler
from cm3leon_jax.errors import InputError
from cm3leon_jax.paths import artifacts
from cm3leon_jax.tokenizers.vocab import Vocab

log = logging.getLogger(__name__)

# Bad-input fractions are judged only after this many documents, so one early bad record
# does not stop a run.
MIN_DOCS_BEFORE_FAILING = 100


@dataclasses.dataclass(frozen=True)
class Task:
  """One source of training sequences. `neighbours_dir=None` trains without retrieval;
  neighbour ids index `memory_dir` (default: `tokens_dir`, the training set is the bank)."""
  name: str
  tokens_dir: str
  neighbours_dir: str | None = None
  memory_dir: str | None = None
  weight: float = 1.0


def default_tasks(config, split: str = "train") -> list[Task]:
  """Pretraining: a split's token documents and, with retrieval on, their neighbours in the
  training memory bank (`cm3leon encode` / `cm3leon retrieve` name other splits `<dir>-<split>`)."""
  paths = artifacts(config)
  suffix = "" if split == "train" else f"-{split}"
  neighbours = paths.neighbours + suffix if config.retrieval.enabled else None
  return [Task(split, paths.tokens + suffix, neighbours, memory_dir=paths.tokens)]


def _num_records(directory: str) -> int:
  meta = records.read_meta(directory)
  records.shard_paths(directory)
  if not isinstance(meta.get("num_records"), int):
    raise InputError(f"{directory}/{records.META}: no integer 'num_records'")
  return meta["num_records"]


class Join:
  """Grain random_map: a query record -> one training example (or None when skipped).

  Reads neighbours and retrieved documents by record index; counts every bad input. Sources
  are opened lazily so the transform pickles into Grain's worker processes.
  """

  def __init__(self, task: Task, assembler: Assembler, num_train_docs: int,
               max_skipped_fraction: float, no_retrieval_rate: float = 0.0):
    if not 0.0 <= no_retrieval_rate <= 1.0:
      raise InputError(f"retrieval.no_retrieval_rate={no_retrieval_rate}: must lie in [0, 1]")
    self.task = task
    self.no_retrieval_rate = float(no_retrieval_rate)
    self.assembler = assembler
    self.vocab = assembler.vocab
    self.num_train_docs = int(num_train_docs)
    self.max_skipped_fraction = float(max_skipped_fraction)
    self.memory_dir = task.memory_dir or task.tokens_dir
    self.num_docs = _num_records(task.tokens_dir)
    self.memory_size = _num_records(self.memory_dir) if task.neighbours_dir else 0
    if task.neighbours_dir and _num_records(task.neighbours_dir) != self.num_docs:
      raise InputError(
          f"{task.neighbours_dir}: {_num_records(task.neighbours_dir)} neighbour records for "
          f"{self.num_docs} documents in {task.tokens_dir}; rerun `cm3leon retrieve`")
    self.counts: collections.Counter = collections.Counter()
    self._sources = None

  def __getstate__(self):
    state = dict(self.__dict__)
    state["_sources"] = None
    return state

  def _open(self):
    if self._sources is None and self.task.neighbours_dir:
      source = grain.sources.ArrayRecordDataSource
      self._sources = (source(records.shard_paths(self.task.neighbours_dir)),
                       source(records.shard_paths(self.memory_dir)))
    return self._sources

  # --- counting -------------------------------------------------------------------------------
  def _note(self, kind: str, message: str, amount: int = 1) -> None:
    before = self.counts[kind]
    self.counts[kind] += amount
    if before < 5 or (self.counts[kind] & (self.counts[kind] - 1)) == 0:  # first 5, then 2^k
      log.warning("%s: %s (%d so far, of %d documents read)", self.task.name, message,
                  self.counts[kind], self.counts["documents"])

  def _check_fractions(self) -> None:
    docs = self.counts["documents"]
    if docs < MIN_DOCS_BEFORE_FAILING:
      return
    skipped = self.counts["skipped"]
    if skipped > self.max_skipped_fraction * docs:
      raise InputError(
          f"{self.task.tokens_dir}: {skipped} of {docs} documents skipped (empty, malformed or "
          f"too long to cut), above data.max_skipped_fraction={self.max_skipped_fraction}")
    bad, total = self.counts["bad_neighbours"], self.counts["neighbours"]
    if total and bad > self.max_skipped_fraction * total:
      raise InputError(
          f"{self.task.neighbours_dir}: {bad} of {total} neighbour ids name no document of "
          f"{self.memory_dir} ({self.memory_size} documents), above "
          f"data.max_skipped_fraction={self.max_skipped_fraction}; was it retrieved against "
          f"another memory bank?")

  def _problem(self, ids: np.ndarray) -> str | None:
    """Why a document record cannot be used, or None. O(len) numpy."""
    if len(ids) <= 1:
      return "empty document"
    if ids[-1] != self.vocab.eos_id:
      return "document does not end with <eos>"
    body = ids[:-1]
    if ((body < 0) | (body >= self.vocab.size)).any():
      return "token id outside the vocabulary"
    breaks = body == self.vocab.break_id
    if (self.vocab.is_special(body) & ~breaks).any():
      return "special token inside a document"
    if breaks.sum() % 2:
      return "unclosed image (odd number of <break>)"
    return None

  # --- the transform ----------------------------------------------------------------------------
  def __call__(self, record: bytes, rng: np.random.Generator):
    doc_id, query = records.decode_tokens(record)
    self.counts["documents"] += 1
    problem = self._problem(query)
    if problem:
      self.counts["skipped"] += 1
      self._note(problem, f"document {doc_id} of {self.task.tokens_dir}: {problem}; skipped")
      self._check_fractions()
      return None
    retrieved = self._retrieve(doc_id, rng) if self._with_neighbours(rng) else []
    example, counts = self.assembler(query, retrieved, rng)
    if counts["uncuttable"]:
      self.counts["skipped"] += 1
      self._note("uncuttable", f"document {doc_id} of {self.task.tokens_dir}: its first image "
                 f"alone exceeds seq_len {self.assembler.seq_len}; skipped")
    elif counts["cut"]:
      self._note("cut", f"document {doc_id} of {self.task.tokens_dir}: {len(query)} tokens, "
                 f"longer than seq_len {self.assembler.seq_len}; cut at a segment boundary")
    self.counts["retrieved_dropped"] += counts["retrieved_dropped"]
    self._check_fractions()
    return example

  def _with_neighbours(self, rng: np.random.Generator) -> bool:
    """Whether this example gets retrieved documents: never without a neighbours directory,
    else with probability 1 - no_retrieval_rate (no draw at rate 0: the stream of the recipe
    without the option is unchanged)."""
    if not self.task.neighbours_dir:
      return False
    return self.no_retrieval_rate == 0.0 or rng.random() >= self.no_retrieval_rate

  def _retrieve(self, doc_id: int, rng: np.random.Generator) -> list[np.ndarray]:
    neighbours, memory = self._open()
    if not 0 <= doc_id < self.num_docs:
      raise InputError(f"{self.task.tokens_dir}: record header names document {doc_id}, "
                       f"outside [0, {self.num_docs})")
    owner, ids_K = records.decode_neighbours(neighbours[doc_id])
    if owner != doc_id:
      raise InputError(f"{self.task.neighbours_dir}: record {doc_id} holds the neighbours of "
                       f"document {owner}; the directory does not match {self.task.tokens_dir}")
    valid = (ids_K >= 0) & (ids_K < self.memory_size)
    if os.path.realpath(self.memory_dir) == os.path.realpath(self.task.tokens_dir):
      valid &= ids_K != doc_id  # a document is never its own neighbour
    self.counts["neighbours"] += len(ids_K)
    if not valid.all():
      bad = ids_K[~valid]
      self._note("bad_neighbours", f"document {doc_id}: neighbour ids {bad[:4].tolist()} name no "
                 f"document of {self.memory_dir}; dropped", amount=len(bad))
    ids_K = ids_K[valid]
    chosen = rng.choice(ids_K, size=min(self.num_train_docs, len(ids_K)), replace=False)
    docs = []
    for neighbour in chosen.tolist():
      _, ids = records.decode_tokens(memory[neighbour])
      problem = self._problem(ids)
      if problem:
        self._note("bad_retrieved", f"memory document {neighbour} of {self.memory_dir}: "
                   f"{problem}; not used")
      else:
        docs.append(ids)
    return docs


def task_dataset(task: Task, config, *, seed: int, process_index: int, process_count: int,
                 num_epochs: int | None) -> grain.MapDataset:
  """One task's examples (unpadded dicts, None where skipped) for this process's shard."""
  join = Join(task, Assembler.from_config(config), config.retrieval.num_train_docs,
              config.data.max_skipped_fraction,
              float(config.retrieval.get("no_retrieval_rate", 0.0)))
  usable = join.num_docs - join.num_docs % process_count  # same count on every host
  if usable < process_count:
    raise InputError(f"{task.tokens_dir}: {join.num_docs} documents cannot be shared by "
                     f"{process_count} processes")
  ds = grain.MapDataset.source(
      grain.sources.ArrayRecordDataSource(records.shard_paths(task.tokens_dir)))
  ds = ds[:usable][process_index::process_count]
  return ds.shuffle(seed=seed).repeat(num_epochs).random_map(join, seed=seed + 1)


def make_dataset(config, tasks: Sequence[Task] | None = None, *, batch_size: int | None = None,
                 process_index: int | None = None, process_count: int | None = None,
                 num_epochs: int | None = None, num_workers: int | None = None,
                 read_threads: int = 0) -> grain.IterDataset:
  """The batched pipeline for this process (see the module docstring); infinite by default.

  `batch_size` is this process's batch (default train.batch_size / process_count);
  `num_workers` overrides data.num_workers. `read_threads` > 0 reads examples on that many
  threads inside each process (useful when retrieval reads dominate; 0: in order).
  """
  if process_index is None or process_count is None:
    import jax  # here, not at the top: Grain's worker processes need no JAX
    process_index = jax.process_index() if process_index is None else process_index
    process_count = jax.process_count() if process_count is None else process_count
  process_index, process_count = int(process_index), int(process_count)
  if batch_size is None:
    if config.train.batch_size % process_count:
      raise InputError(f"--config.train.batch_size={config.train.batch_size} is not divisible "
                       f"by {process_count} processes")
    batch_size = config.train.batch_size // process_count
  tasks = list(default_tasks(config) if tasks is None else tasks)
  if not tasks:
    raise InputError("the task mixture is empty")
  if any(t.weight <= 0 for t in tasks):
    raise InputError(f"task weights must be > 0: {[(t.name, t.weight) for t in tasks]}")
  seed = int(config.data.shuffle_seed)
  datasets = [task_dataset(t, config, seed=seed + 7919 * i, process_index=process_index,
                           process_count=process_count, num_epochs=num_epochs)
              for i, t in enumerate(tasks)]
  ds = datasets[0] if len(datasets) == 1 else grain.MapDataset.mix(
      datasets, [t.weight for t in tasks])
  ds = ds.to_iter_dataset(grain.ReadOptions(num_threads=read_threads,
                                            prefetch_buffer_size=max(1, 4 * read_threads)))
  seq_len, pad_id = int(config.model.seq_len), Vocab.pad_id
  if config.data.packing:
    bins = int(config.data.packing_bins) or batch_size
    ds = packing.pack(ds, seq_len, num_bins=bins, pad_id=pad_id, seed=seed)
  else:
    ds = packing.pad(ds, seq_len, pad_id)
  ds = ds.batch(batch_size, drop_remainder=True)
  workers = int(config.data.num_workers if num_workers is None else num_workers)
  if workers > 0:
    # Grain 0.2.x reads an absl flag in its worker start-up and fails when the program never
    # parsed flags (google/grain#1355, fixed upstream in #1362): use the flags' defaults.
    if not flags.FLAGS.is_parsed():
      flags.FLAGS.mark_as_parsed()
    ds = ds.mp_prefetch(grain.MultiprocessingOptions(
        num_workers=workers, per_worker_buffer_size=max(1, int(config.data.prefetch))))
  return ds


def make_iterator(config, tasks: Sequence[Task] | None = None, **kwargs) -> grain.DatasetIterator:
  """`iter(make_dataset(...))`: a DatasetIterator with get_state/set_state."""
  return iter(make_dataset(config, tasks, **kwargs))

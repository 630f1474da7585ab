"""The memory-bank index: maximum inner product search with ScaNN, sharded, plus an exact fallback.

    index = Index.build(embeddings_ND, settings_from_config(config.retrieval))
    ids_QK, scores_QK = index.search(queries_QD, k)      # global doc ids, best first
    index.save(path); Index.load(path)

Builder settings follow the bank size (ScaNN's own guidance): below `brute_force_below`
vectors, exact brute force; above, a spherical k-means tree with ~sqrt(N) leaves and SOAR
spilling (each vector also stored in a second, orthogonality-amplified leaf), anisotropic
(asymmetric) hashing with 2 dims per 4-bit block, and exact reordering of the best `reorder`
candidates. Spherical partitions + SOAR, at recall@10 >= 0.95 on the 1M bank of dual-encoder
embeddings of experiments/bench/retrieval.py (2-core CPU, 2026-11-27): 83-89k queries/s, the
plain tree 70-79k; on its clustered synthetic 1M bank spilling costs (81k vs 111k; FAISS's
best: 23k). With spilling the hashing stage keeps `soar_overretrieve` x the reorder count of
candidates: just above 1 (1.01) instead of ScaNN's default 2 measured 108k vs 96k queries/s on
the 1M encoder bank (FAISS HNSW: 99-108k) at the same recall. Exactly 1 searches as fast, but
ScaNN 1.4.2 then saves no SOAR hashed data and cannot load the index it saved, so the value
must lie in (1, 2] and `save` loads every shard back before the index is renamed into place.
A bank that does
not fit one host is split into S contiguous shards, each its own searcher; a query goes to
every shard (scatter) and the per-shard top-k are merged (gather), with shard-local ids offset
to global doc ids. `exact_search` is the numpy ground truth.

The `cm3leon index` command (`add_arguments`, `run`) lives in `build_index.py`.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os

import numpy as np

from cm3leon_jax.data.records import atomic_directory
from cm3leon_jax.errors import InputError

META = "index.json"
EMBEDDINGS = "embeddings.npy"
# Largest query batch of one `search_batched_parallel` task (`parallel_batch_size`).
PARALLEL_BATCH_CAP = 4096


def parallel_batch_size(num_queries: int, threads: int | None = None,
                        cap: int = PARALLEL_BATCH_CAP) -> int:
  """Queries per task of ScaNN's `search_batched_parallel`: equal batches, as few as give every
  core the same number of them, at most `cap` queries each.

  ScaNN's default (256) splits 5,000 queries into 20 tasks; each task scores its queries
  against every partition centre as one matrix product, and small products run slowly. On
  the 1M encoder bank (2-core Xeon, 2026-12-04, 2,000 leaves, 3 searched, reorder 50, same
  recall 0.958): batch 32 47.9k queries/s, 128 50.4k, 1024 53.6k (5 tasks on 2 cores: one
  waits), one 2,500-query task per core 71.1k."""
  if not threads:  # the cores this process may run on (all of them where that is unknown)
    affinity = getattr(os, "sched_getaffinity", None)
    threads = len(affinity(0)) if affinity else os.cpu_count() or 1
  per_thread = -(-max(num_queries, 1) // threads)
  rounds = -(-per_thread // cap)
  return -(-per_thread // rounds)


@dataclasses.dataclass(frozen=True)
class Settings:
  """How one ScaNN searcher is built. `brute_force` ignores the tree/AH fields."""
  brute_force: bool
  num_leaves: int = 0
  leaves_to_search: int = 0
  reorder: int = 100
  training_sample_size: int = 0
  spherical: bool = False   # spherical k-means partitions (unit-norm embeddings)
  soar_lambda: float = 0.0  # SOAR spilling's orthogonality amplification; 0 = no spilling
  # With spilling, the hashing stage keeps this many times the reorder count of candidates
  # (a vector can be found twice). 2.0 is ScaNN's default (and what indexes saved before
  # this field were built with).
  soar_overretrieve: float = 2.0


def choose_settings(num_vectors: int, brute_force_below: int = 20000, num_leaves: int = 0,
                    leaves_to_search: int = 0, reorder: int = 100, spherical: bool = True,
                    soar_lambda: float = 1.0, soar_overretrieve: float = 1.01) -> Settings:
  """Builder settings for a bank of `num_vectors` (0 for a field: derived from the size)."""
  if soar_lambda < 0:
    raise InputError(f"retrieval.soar_lambda={soar_lambda}: must be >= 0 (0 = no spilling)")
  if not 1 < soar_overretrieve <= 2:
    raise InputError(f"retrieval.soar_overretrieve={soar_overretrieve}: must lie in (1, 2] "
                     "(ScaNN's range is [1, 2], but at exactly 1 it saves an index it cannot "
                     "load; 1.01 searches as fast)")
  if num_vectors < brute_force_below:
    return Settings(brute_force=True, reorder=reorder)
  leaves = num_leaves or max(2, int(round(math.sqrt(num_vectors))))
  # ~5% of the leaves: recall@10 >= 0.95 on clustered data at 100k..1M in the benchmark
  # (experiments/bench/retrieval.py); cheaper than exact by the ratio of leaves searched.
  to_search = leaves_to_search or max(1, int(math.ceil(leaves * 0.05)))
  # The whole bank up to 1M trains the partitions (1M: 34 s, and 80k -> 84k queries/s over a
  # 250k sample, experiments/bench/retrieval.py's encoder bank).
  return Settings(brute_force=False, num_leaves=leaves, leaves_to_search=min(to_search, leaves),
                  reorder=reorder, training_sample_size=min(num_vectors, 1_000_000),
                  spherical=spherical, soar_lambda=soar_lambda,
                  soar_overretrieve=soar_overretrieve)


def settings_from_config(retrieval_config, num_vectors: int) -> Settings:
  r = retrieval_config
  return choose_settings(num_vectors, r.brute_force_below, r.num_leaves, r.leaves_to_search,
                         r.reorder, r.spherical_tree, r.soar_lambda, r.soar_overretrieve)


# --- validation: every bad input is an InputError naming what is wrong ------------------------
def check_bank(embeddings_ND, what: str = "memory bank") -> np.ndarray:
  x = np.asarray(embeddings_ND)
  if x.ndim != 2:
    raise InputError(f"{what}: expected a 2-D array [num_docs, dim], got shape {x.shape}")
  if x.shape[0] == 0:
    raise InputError(f"{what}: is empty (0 documents); nothing to index")
  if x.shape[1] == 0:
    raise InputError(f"{what}: embeddings have dimension 0")
  _check_finite(x, what)
  return np.ascontiguousarray(x, dtype=np.float32)


def check_queries(queries_QD, dim: int, k: int, bank_size: int) -> np.ndarray:
  q = np.asarray(queries_QD)
  if q.ndim == 1:
    q = q[None]
  if q.ndim != 2:
    raise InputError(f"queries: expected [num_queries, dim], got shape {q.shape}")
  if q.shape[1] != dim:
    raise InputError(f"queries: dimension mismatch: queries have dim {q.shape[1]}, "
                     f"the index has dim {dim}")
  _check_finite(q, "queries")
  if not isinstance(k, (int, np.integer)) or k < 1:
    raise InputError(f"k={k!r}: must be a positive integer")
  if k > bank_size:
    raise InputError(f"k={k} is larger than the memory bank ({bank_size} documents)")
  return np.ascontiguousarray(q, dtype=np.float32)


def _check_finite(x: np.ndarray, what: str) -> None:
  bad = ~np.isfinite(x).all(axis=1)
  if bad.any():
    rows = np.flatnonzero(bad)
    raise InputError(f"{what}: {len(rows)} embedding(s) contain NaN or inf (first rows: "
                     f"{rows[:5].tolist()}); was the encoder checkpoint diverged?")


# --- exact search: the ground truth ---------------------------------------------------------
def exact_search(bank_ND, queries_QD, k: int, block: int = 1024) -> tuple[np.ndarray, np.ndarray]:
  """Exact top-k by inner product with a float32 matmul. Returns (ids_QK int64, scores_QK)."""
  bank = check_bank(bank_ND)
  queries = check_queries(queries_QD, bank.shape[1], k, bank.shape[0])
  ids = np.empty((len(queries), k), np.int64)
  scores = np.empty((len(queries), k), np.float32)
  for start in range(0, len(queries), block):
    s_QN = queries[start:start + block] @ bank.T
    top = np.argpartition(-s_QN, k - 1, axis=1)[:, :k]
    top_s = np.take_along_axis(s_QN, top, axis=1)
    order = np.lexsort((top, -top_s), axis=1)  # by score, ties by id: deterministic
    ids[start:start + block] = np.take_along_axis(top, order, axis=1)
    scores[start:start + block] = np.take_along_axis(top_s, order, axis=1)
  return ids, scores


def merge_topk(ids_list, scores_list, k: int) -> tuple[np.ndarray, np.ndarray]:
  """Gather step: merge per-shard (ids_QKs, scores_QKs) (global ids) into the global top-k."""
  ids = np.concatenate(ids_list, axis=1)
  scores = np.concatenate(scores_list, axis=1)
  order = np.lexsort((ids, -scores), axis=1)[:, :k]
  return np.take_along_axis(ids, order, axis=1), np.take_along_axis(scores, order, axis=1)


# --- the ScaNN index ------------------------------------------------------------------------
def _build_searcher(x_ND: np.ndarray, settings: Settings, k: int):
  from scann import scann_ops_pybind  # imported lazily: the CLI's --help stays fast

  builder = scann_ops_pybind.builder(x_ND, k, "dot_product")
  if settings.brute_force:
    return builder.score_brute_force().build()
  spill = (dict(soar_lambda=settings.soar_lambda, overretrieve_factor=settings.soar_overretrieve)
           if settings.soar_lambda > 0 else {})
  return (builder.tree(num_leaves=settings.num_leaves,
                       num_leaves_to_search=settings.leaves_to_search,
                       training_sample_size=settings.training_sample_size,
                       spherical=settings.spherical, **spill)
          .score_ah(2, anisotropic_quantization_threshold=0.2)
          .reorder(settings.reorder).build())


class Index:
  """S ScaNN searchers over contiguous slices of one bank; search returns global doc ids."""

  def __init__(self, searchers, offsets, sizes, dim: int, settings: list[Settings]):
    self._searchers = list(searchers)
    self.offsets = [int(o) for o in offsets]
    self.sizes = [int(n) for n in sizes]
    self.dim = int(dim)
    self.settings = list(settings)

  @property
  def num_vectors(self) -> int:
    return sum(self.sizes)

  @property
  def num_shards(self) -> int:
    return len(self._searchers)

  @classmethod
  def build(cls, embeddings_ND, settings: Settings | None = None, num_shards: int = 1,
            retrieval_config=None, default_k: int = 10) -> "Index":
    """Build from [N, D] embeddings. Settings per shard come from `retrieval_config` (sized
    to the shard) unless `settings` is given."""
    x = check_bank(embeddings_ND)
    if not isinstance(num_shards, (int, np.integer)) or num_shards < 1:
      raise InputError(f"--config.retrieval.num_shards={num_shards!r}: must be >= 1")
    if num_shards > len(x):
      raise InputError(f"--config.retrieval.num_shards={num_shards}: more shards than the "
                       f"{len(x)} documents of the memory bank")
    bounds = np.linspace(0, len(x), num_shards + 1).round().astype(int)
    searchers, all_settings = [], []
    for lo, hi in zip(bounds[:-1], bounds[1:]):
      n = int(hi - lo)
      s = settings or (settings_from_config(retrieval_config, n) if retrieval_config is not None
                       else choose_settings(n))
      searchers.append(_build_searcher(x[lo:hi], s, min(default_k, n)))
      all_settings.append(s)
    return cls(searchers, bounds[:-1], np.diff(bounds), x.shape[1], all_settings)

  def search(self, queries_QD, k: int, leaves_to_search: int | None = None,
             reorder: int | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Top-k doc ids and inner-product scores, best first. Returns (ids_QK int64, scores_QK)."""
    q = check_queries(queries_QD, self.dim, k, self.num_vectors)
    ids_list, scores_list = [], []
    for searcher, offset, n, s in zip(self._searchers, self.offsets, self.sizes, self.settings):
      k_shard = min(k, n)
      kwargs = {}
      if not s.brute_force:
        kwargs = dict(leaves_to_search=leaves_to_search or s.leaves_to_search,
                      pre_reorder_num_neighbors=max(reorder or s.reorder, k_shard))
      if len(q) >= 64:
        ids, scores = searcher.search_batched_parallel(
            q, k_shard, batch_size=parallel_batch_size(len(q)), **kwargs)
      else:
        ids, scores = searcher.search_batched(q, k_shard, **kwargs)
      ids = np.asarray(ids, np.int64)
      scores = np.asarray(scores, np.float32)
      # Tree search can return fewer than k hits (unfilled slots are padded); never leak them.
      scores = np.where(ids < n, scores, -np.inf)
      ids_list.append(np.where(ids < n, ids + offset, -1))
      scores_list.append(scores)
    if len(ids_list) == 1:
      return ids_list[0], scores_list[0]
    return merge_topk(ids_list, scores_list, k)

  # --- persistence ------------------------------------------------------------------------
  def save(self, directory: str, embeddings_ND=None) -> None:
    """Write the index (and optionally the bank embeddings) atomically: temp dir, rename."""
    with atomic_directory(directory) as tmp:
      for i, searcher in enumerate(self._searchers):
        shard_dir = os.path.join(tmp, f"shard-{i:05d}")
        os.makedirs(shard_dir)
        searcher.serialize(shard_dir, relative_path=True)  # relative: survives the rename
        _check_loads(shard_dir, self.settings[i])
      if embeddings_ND is not None:
        np.save(os.path.join(tmp, EMBEDDINGS), check_bank(embeddings_ND))
      meta = dict(dim=self.dim, offsets=self.offsets, sizes=self.sizes,
                  settings=[dataclasses.asdict(s) for s in self.settings])
      with open(os.path.join(tmp, META), "w") as f:
        json.dump(meta, f, indent=1)

  @classmethod
  def load(cls, directory: str) -> "Index":
    from scann import scann_ops_pybind

    meta_path = os.path.join(directory, META)
    if not os.path.isfile(meta_path):
      raise InputError(f"{directory}: not an index directory (no {META}); run `cm3leon index`")
    try:
      with open(meta_path) as f:
        meta = json.load(f)
      settings = [Settings(**s) for s in meta["settings"]]
      offsets, sizes, dim = meta["offsets"], meta["sizes"], meta["dim"]
    except (json.JSONDecodeError, KeyError, TypeError) as e:
      raise InputError(f"{meta_path}: corrupt index metadata ({e})") from None
    searchers = []
    for i in range(len(sizes)):
      shard_dir = os.path.join(directory, f"shard-{i:05d}")
      if not os.path.isdir(shard_dir):
        raise InputError(f"{shard_dir}: missing shard of the index")
      searchers.append(scann_ops_pybind.load_searcher(shard_dir))
    return cls(searchers, offsets, sizes, dim, settings)


def _check_loads(shard_dir: str, settings: Settings) -> None:
  """Load a just-serialized searcher back: ScaNN has written indexes it cannot load (SOAR at
  overretrieve exactly 1), and a broken index must fail here, not in the next job."""
  from scann import scann_ops_pybind

  try:
    scann_ops_pybind.load_searcher(shard_dir)
  except RuntimeError as e:
    raise RuntimeError(f"ScaNN cannot load the index it just saved ({e}); settings "
                       f"{settings}. Nothing was written.") from None


def load_embeddings(directory: str, mmap: bool = True) -> np.ndarray:
  """The bank embeddings saved beside an index ([N, D] float32)."""
  path = os.path.join(directory, EMBEDDINGS)
  if not os.path.isfile(path):
    raise InputError(f"{path}: missing; rebuild the index with `cm3leon index`")
  return np.load(path, mmap_mode="r" if mmap else None)

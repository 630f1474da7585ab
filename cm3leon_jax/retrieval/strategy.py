"""CM3Leon's retrieval strategy (REFERENCE.md section 3): which memory-bank documents precede a
training document, and which a prompt at inference.

The rules, each one function here:
- relevance: candidates are ranked by the dual encoder's inner product with the query;
- modality: the query document is searched twice, by its text and by its image, and
  `k_per_modality` documents are kept from each;
- diversity: a candidate is skipped if it is the query itself, if it was already retrieved (by
  the other modality), or if it is a near-duplicate of the query: cosine similarity between the
  two *document* embeddings > `max_score` (0.9). The document embedding is used rather than the
  per-modality search score because only it reaches ~1 for a duplicate (a text query scores its
  own document at (1 + cos(text, image)) / 2, far below 0.9);
- query dropout: `query_dropout` (20%) of the query's text tokens and of its image patches are
  removed before it is embedded, so neighbours are not just the nearest paraphrase;
- at training time a seeded random subset of `num_train_docs` of the stored neighbours is used
  (`choose_for_training`); at inference `Retriever.retrieve_for_prompt` embeds the prompt.

Neighbours are stored interleaved (text pick 1, image pick 1, text pick 2, ...) so any prefix is
balanced across modalities; within a modality they are best first.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np

from cm3leon_jax.errors import InputError


def query_dropout(mask_BL: np.ndarray, rate: float, rng: np.random.Generator) -> np.ndarray:
  """Remove round(rate * n) of each row's n valid positions (never the last one).

  mask_BL: bool, True where a token/patch is present. Returns a new mask.
  """
  if not 0.0 <= rate < 1.0:
    raise InputError(f"--config.retrieval.query_dropout={rate}: must be in [0, 1)")
  mask = np.asarray(mask_BL, bool).copy()
  if rate == 0.0:
    return mask
  for row in mask:
    valid = np.flatnonzero(row)
    drop = min(int(round(rate * len(valid))), len(valid) - 1)
    if drop > 0:
      row[rng.choice(valid, size=drop, replace=False)] = False
  return mask


def unit_rows(x_ND: np.ndarray) -> np.ndarray:
  x = np.asarray(x_ND, np.float32)
  return x / np.maximum(np.linalg.norm(x, axis=-1, keepdims=True), 1e-12)


def select_neighbours(query_id: int, candidates: Sequence[tuple[np.ndarray, np.ndarray]],
                      doc_unit_ND: np.ndarray, query_unit_D: np.ndarray | None,
                      k_per_modality: int, max_score: float) -> tuple[list[int], list[int]]:
  """Apply the diversity rules to each modality's ranked candidates.

  candidates: per modality, (ids_K, scores_K) best first (-1 ids are empty slots).
  doc_unit_ND: L2-normalised document embeddings of the bank (for the near-duplicate test).
  query_unit_D: the query's own normalised document embedding (None: no near-duplicate test).
  Returns (neighbour ids interleaved across modalities, count kept per modality).
  """
  taken: set[int] = set()
  picks: list[list[int]] = []
  for ids_K, _ in candidates:
    kept = []
    for doc in np.asarray(ids_K).tolist():
      if len(kept) == k_per_modality:
        break
      if doc < 0 or doc == query_id or doc in taken:
        continue
      if query_unit_D is not None and float(doc_unit_ND[doc] @ query_unit_D) > max_score:
        continue  # a near-duplicate teaches the model to copy, not to use context
      kept.append(doc)
      taken.add(doc)
    picks.append(kept)
  order = [p[i] for i in range(k_per_modality) for p in picks if i < len(p)]
  return order, [len(p) for p in picks]


def neighbours_for_batch(index, doc_unit_ND: np.ndarray, query_ids_B: np.ndarray,
                         queries_by_modality: Sequence[np.ndarray], k_per_modality: int,
                         max_score: float, query_units_BD: np.ndarray | None = None
                         ) -> list[np.ndarray]:
  """Search by every modality and apply the rules for a batch of queries.

  query_ids_B: the queries' bank doc ids (-1 for a query from outside the bank).
  queries_by_modality: per modality, [B, D] query embeddings (after query dropout).
  query_units_BD: the queries' normalised document embeddings for the near-duplicate rule
  (default: their rows of `doc_unit_ND`, for queries from the bank).
  Candidates are over-fetched; a query whose candidates run out (many duplicates) is searched
  again with 4x more, up to the whole bank. Returns per query an int64 array of ids.
  """
  n = index.num_vectors
  out: list[np.ndarray | None] = [None] * len(query_ids_B)
  todo = np.arange(len(query_ids_B))
  fetch = min(n, 4 * k_per_modality + 8)
  while len(todo):
    results = [index.search(q[todo], fetch) for q in queries_by_modality]
    retry = []
    for j, b in enumerate(todo):
      qid = int(query_ids_B[b])
      query_unit = doc_unit_ND[qid] if query_units_BD is None else query_units_BD[b]
      order, counts = select_neighbours(qid, [(ids[j], s[j]) for ids, s in results],
                                        doc_unit_ND, query_unit, k_per_modality, max_score)
      if min(counts) < k_per_modality and fetch < n:
        retry.append(b)
      else:
        out[b] = np.asarray(order, np.int64)
    todo = np.asarray(retry, int)
    fetch = min(n, fetch * 4)
  return out


def choose_for_training(neighbour_ids_K: np.ndarray, num: int, seed: int, doc_id: int,
                        epoch: int = 0) -> np.ndarray:
  """The paper's random choice of the retrieved set at training time: `num` of the stored
  neighbours, in stored order, drawn from a generator seeded by (seed, doc_id, epoch) so a
  resumed input pipeline makes the same choice."""
  ids = np.asarray(neighbour_ids_K, np.int64)
  if num >= len(ids):
    return ids
  rng = np.random.default_rng([int(seed), int(doc_id), int(epoch)])
  return ids[np.sort(rng.choice(len(ids), size=num, replace=False))]


class Retriever:
  """Inference-time retrieval: embed a prompt with the dual encoder, search the bank.

      retriever = Retriever.load(config)
      doc_ids = retriever.retrieve_for_prompt("a red circle", image=None, k=2)
  """

  def __init__(self, embedder, index, doc_unit_ND: np.ndarray, max_score: float = 0.9):
    self.embedder = embedder
    self.index = index
    self.doc_unit_ND = doc_unit_ND
    self.max_score = max_score

  @classmethod
  def load(cls, config) -> "Retriever":
    from cm3leon_jax.paths import artifacts
    from cm3leon_jax.retrieval.encoder import Embedder
    from cm3leon_jax.retrieval.index import Index, load_embeddings

    paths = artifacts(config)
    embedder = Embedder.load(config)
    index = Index.load(paths.index)
    if index.dim != embedder.embed_dim:
      raise InputError(f"{paths.index}: index dim {index.dim} != encoder embed_dim "
                       f"{embedder.embed_dim}; rebuild it with `cm3leon index`")
    return cls(embedder, index, unit_rows(load_embeddings(paths.index)),
               config.retrieval.max_score)

  def retrieve_for_prompt(self, text: str | None, image: np.ndarray | None = None, k: int = 2,
                          skip_near_duplicates: bool = False) -> np.ndarray:
    """Up to k bank doc ids for a prompt, split between its text and image queries.

    image: uint8 [H, W, 3] or None. The prompt is not in the bank, so near-duplicates are kept
    unless `skip_near_duplicates` (then the training-time 0.9 rule applies).
    """
    if k < 1:
      raise InputError(f"k={k}: must be >= 1")
    if k > self.index.num_vectors:
      raise InputError(f"k={k} is larger than the memory bank ({self.index.num_vectors} documents)")
    queries = []
    if text:
      queries.append(self.embedder.embed_texts([text]))
    if image is not None:
      queries.append(self.embedder.embed_images(np.asarray(image)[None]))
    if not queries:
      raise InputError("retrieve_for_prompt: the prompt has neither text nor an image")
    query_doc = unit_rows(np.mean([q[0] for q in queries], axis=0))
    per = -(-k // len(queries))
    fetch = min(self.index.num_vectors, 4 * per + 8)
    results = [self.index.search(q, fetch) for q in queries]
    order, _ = select_neighbours(-1, [(ids[0], s[0]) for ids, s in results], self.doc_unit_ND,
                                 query_doc if skip_near_duplicates else None, per,
                                 self.max_score)
    return np.asarray(order[:k], np.int64)

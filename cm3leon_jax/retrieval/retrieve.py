"""`cm3leon retrieve`: static neighbours for every document of a split (REFERENCE.md section 3).

    cm3leon retrieve --config quickstart [--split train]

For each document: its text and its image are embedded with query dropout, each searches the
memory-bank index, and strategy.py's rules pick `k_per_modality` neighbours per modality
(never the document itself, no near-duplicates, no repeats). Neighbours are written in
`cm3leon_jax/data/records.py`'s neighbour format, keyed by document id, to
`artifacts(config).neighbours` (train) or `<neighbours>-<split>`. Work is done in chunks saved
under `<output>.partial/`; a restarted job resumes from the last finished chunk and produces
exactly the records an uninterrupted run would.
"""

from __future__ import annotations

import argparse
import sys
import time

import numpy as np

from cm3leon_jax.data import records
from cm3leon_jax.errors import InputError
from cm3leon_jax.paths import artifacts
from cm3leon_jax.retrieval import embed
from cm3leon_jax.retrieval.encoder import document_embedding
from cm3leon_jax.retrieval.pairs import read_chunk
from cm3leon_jax.retrieval.strategy import neighbours_for_batch, query_dropout, unit_rows


def add_arguments(p: argparse.ArgumentParser) -> None:
  p.add_argument("--split", default="train", help="the split whose documents get neighbours")
  p.add_argument("--index", default=None, help="index directory (default: <workdir>/index)")
  p.add_argument("--output", default=None,
                 help="neighbour records (default: <workdir>/neighbours, or "
                      "<workdir>/neighbours-<split> for other splits)")
  p.add_argument("--chunk-size", type=int, default=2048, help="documents per resumable chunk")


def compute_neighbours(config, embedder, index, bank_ND, source, work_dir: str,
                       in_bank: bool = True, chunk_size: int = 2048,
                       progress: bool = True) -> list[np.ndarray]:
  """Per document of `source`, its neighbour ids (global bank ids, interleaved modalities).

  in_bank: the source is the memory bank itself (document i is bank document i), so a
  document is excluded from its own neighbours by id.
  """
  r = config.retrieval
  if in_bank and len(source) != index.num_vectors:
    raise InputError(f"the split has {len(source)} documents but the index holds "
                     f"{index.num_vectors}; rebuild it with `cm3leon index`")
  bank_unit = unit_rows(bank_ND)
  width = 2 * r.k_per_modality

  def compute(c, start, stop):
    rng = np.random.default_rng([config.train.seed, c])  # per chunk: resumable, reproducible
    images, texts = read_chunk(source, start, stop)
    ids_BL, mask_BL = embedder.tokenize(texts)
    has_text = mask_BL.any(axis=1)
    patches = np.ones((len(texts), embedder.cfg.num_patches), bool)
    text_q = embedder.embed_text_tokens(ids_BL, query_dropout(mask_BL, r.query_dropout, rng))
    image_q = embedder.embed_pixels(images, query_dropout(patches, r.query_dropout, rng))
    if in_bank:
      query_ids, query_units = np.arange(start, stop), None
    else:
      full = document_embedding(embedder.embed_text_tokens(ids_BL, mask_BL),
                                embedder.embed_pixels(images), has_text, np.ones_like(has_text))
      query_ids, query_units = np.full(stop - start, -1), unit_rows(full)
    # A document without text searches by its image only.
    queries = [np.where(has_text[:, None], text_q, image_q), image_q]
    found = neighbours_for_batch(index, bank_unit, query_ids, queries, r.k_per_modality,
                                 r.max_score, query_units)
    out = np.full((stop - start, width), -1, np.int64)
    for row, ids in enumerate(found):
      out[row, :len(ids)] = ids
    return {"neighbours": out}

  table = embed.run_chunks(len(source), chunk_size, work_dir, compute, "retrieve", progress)
  table = table.get("neighbours", np.zeros((0, width), np.int64))
  return [row[row >= 0] for row in table]


def write_neighbours(output: str, neighbours: list[np.ndarray], meta: dict) -> int:
  encoded = (records.encode_neighbours(doc_id, ids) for doc_id, ids in enumerate(neighbours))
  return records.write_records(output, encoded, meta)


def run(args, config) -> int:
  from cm3leon_jax.retrieval.index import Index, load_embeddings
  from cm3leon_jax.retrieval.pairs import open_pairs
  from cm3leon_jax.retrieval.train_encoder import load_embedder

  paths = artifacts(config)
  index_dir = args.index or paths.index
  output = args.output or (paths.neighbours if args.split == "train"
                           else f"{paths.neighbours}-{args.split}")
  if args.chunk_size < 1:
    raise InputError(f"--chunk-size={args.chunk_size}: must be >= 1")
  index = Index.load(index_dir)
  bank_ND = load_embeddings(index_dir)
  embedder = load_embedder(config)
  if index.dim != embedder.embed_dim:
    raise InputError(f"{index_dir}: index dim {index.dim} != encoder embed_dim "
                     f"{embedder.embed_dim}; rebuild it with `cm3leon index`")
  source = open_pairs(config, args.split)
  t0 = time.time()
  work_dir = f"{output.rstrip('/')}.partial"
  neighbours = compute_neighbours(config, embedder, index, bank_ND, source, work_dir,
                                  in_bank=args.split == "train", chunk_size=args.chunk_size,
                                  progress=sys.stderr.isatty())
  r = config.retrieval
  meta = dict(kind="neighbours", split=args.split, index=index_dir, bank_size=index.num_vectors,
              k_per_modality=r.k_per_modality, max_score=r.max_score,
              query_dropout=r.query_dropout, seed=config.train.seed)
  count = write_neighbours(output, neighbours, meta)
  embed.cleanup(work_dir)
  lengths = np.array([len(n) for n in neighbours])
  print(f"retrieve: {count} documents, {lengths.mean():.2f} neighbours each "
        f"({int((lengths < 2 * r.k_per_modality).sum())} with fewer than "
        f"{2 * r.k_per_modality}), {time.time() - t0:.1f}s -> {output}")
  return 0

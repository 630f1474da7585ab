"""`cm3leon index`: embed the memory bank with the dual encoder and build its ScaNN index.

    cm3leon index --config quickstart

The memory bank is the train split (document id == record index, the ids of the token
documents). Embedding is chunked and resumable (`embed.py`); the index (ScaNN settings from the
bank size, `retrieval.num_shards` shards) and the bank's document embeddings are written to
`artifacts(config).index` atomically.
"""

from __future__ import annotations

import argparse
import sys
import time

from cm3leon_jax.paths import artifacts
from cm3leon_jax.retrieval import embed
from cm3leon_jax.retrieval.index import Index, settings_from_config


def add_arguments(p: argparse.ArgumentParser) -> None:
  p.add_argument("--split", default="train", help="the split that forms the memory bank")
  p.add_argument("--output", default=None, help="index directory (default: <workdir>/index)")


def build_bank_index(config, embedder, source, output: str, progress: bool = True) -> Index:
  """Embed `source` (resumably), build the index, save it with its embeddings."""
  work_dir = f"{output.rstrip('/')}.partial"
  settings_from_config(config.retrieval, 0)  # a bad retrieval.* field fails before embedding
  bank_ND = embed.document_embeddings(embedder, source, work_dir, progress=progress)
  index = Index.build(bank_ND, num_shards=config.retrieval.num_shards,
                      retrieval_config=config.retrieval)
  index.save(output, embeddings_ND=bank_ND)
  embed.cleanup(work_dir)
  return index


def run(args, config) -> int:
  from cm3leon_jax.retrieval.pairs import open_pairs
  from cm3leon_jax.retrieval.train_encoder import load_embedder

  output = args.output or artifacts(config).index
  embedder = load_embedder(config)
  source = open_pairs(config, args.split)
  t0 = time.time()
  index = build_bank_index(config, embedder, source, output, progress=sys.stderr.isatty())
  s = index.settings[0]
  kind = "brute force" if s.brute_force else (
      f"tree {s.num_leaves} leaves (search {s.leaves_to_search})"
      f"{f' + SOAR {s.soar_lambda} (overretrieve {s.soar_overretrieve})' if s.soar_lambda else ''}"
      f" + AH + reorder {s.reorder}")
  print(f"index: {index.num_vectors} documents x {index.dim} dims, {index.num_shards} shard(s), "
        f"{kind}, {time.time() - t0:.1f}s -> {output}")
  return 0

"""Offline embedding of a dataset split with the dual encoder: chunked, resumable, atomic.

The `index` and `retrieve` jobs embed every document of a split. Each chunk of
`chunk_size` documents is computed as one jitted, mesh-sharded batch series (Embedder) and
written to `<work_dir>/chunk-NNNNNN.npz` (temp + rename); a restarted job skips the chunks it
finds, so an interrupted run loses at most one chunk. Results are deterministic per chunk
(query dropout is seeded by (seed, chunk)), so resumed and uninterrupted runs agree exactly.
"""

from __future__ import annotations

import os
import shutil
from typing import Callable

import numpy as np
from tqdm import tqdm

from cm3leon_jax.retrieval.encoder import document_embedding
from cm3leon_jax.retrieval.pairs import read_chunk


def run_chunks(num_docs: int, chunk_size: int, work_dir: str,
               compute: Callable[[int, int, int], dict], desc: str, progress: bool = True) -> dict:
  """compute(chunk_index, start, stop) -> dict of arrays (first dim stop - start).

  Returns the arrays of all chunks concatenated. Finished chunks in `work_dir` are reused.
  """
  os.makedirs(work_dir, exist_ok=True)
  starts = list(range(0, num_docs, chunk_size))
  parts = []
  for c, start in enumerate(tqdm(starts, desc=desc, disable=not progress, dynamic_ncols=True)):
    stop = min(start + chunk_size, num_docs)
    path = os.path.join(work_dir, f"chunk-{c:06d}.npz")
    if os.path.isfile(path):
      with np.load(path) as f:
        part = {k: f[k] for k in f.files}
      if all(len(v) == stop - start for v in part.values()):
        parts.append(part)
        continue
    part = compute(c, start, stop)
    tmp = f"{path}.tmp-{os.getpid()}.npz"
    np.savez(tmp, **part)
    os.replace(tmp, path)
    parts.append(part)
  if not parts:
    return {}
  return {k: np.concatenate([p[k] for p in parts]) for k in parts[0]}


def document_embeddings(embedder, source, work_dir: str, chunk_size: int = 4096,
                        progress: bool = True) -> np.ndarray:
  """[N, E] document embeddings (mean of the normalised text and image embeddings)."""

  def compute(c, start, stop):
    images, texts = read_chunk(source, start, stop)
    has_text = np.asarray([bool(t) for t in texts])
    doc = document_embedding(embedder.embed_texts(texts), embedder.embed_images(images),
                             has_text_B=has_text, has_image_B=np.ones(len(texts), bool))
    return {"doc": doc.astype(np.float32)}

  return run_chunks(len(source), chunk_size, work_dir, compute, "embed bank",
                    progress).get("doc", np.zeros((0, embedder.embed_dim), np.float32))


def cleanup(work_dir: str) -> None:
  shutil.rmtree(work_dir, ignore_errors=True)

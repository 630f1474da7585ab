"""Random stand-ins for the encode and retrieve jobs' outputs, in their exact record formats.

Tests and benchmarks of the input pipeline (and of anything that consumes its batches) use
these instead of a trained VQ, text tokenizer and retriever:

    docs = random_documents(vocab, 100, image_tokens=16, rng=np.random.default_rng(0))
    write_token_documents(tokens_dir, vocab, docs)
    write_neighbours(neighbours_dir, random_neighbours(100, k=4, rng=...))
"""

from __future__ import annotations

import numpy as np

from cm3leon_jax.data import records
from cm3leon_jax.tokenizers.vocab import Document, ImageSegment, TextSegment, Vocab


def random_document(vocab: Vocab, rng: np.random.Generator, image_tokens: int,
                    max_text: int = 24, max_pairs: int = 1) -> Document:
  """1..max_pairs (caption, image) pairs; captions of 1..max_text text ids."""
  doc: list = []
  for _ in range(int(rng.integers(1, max_pairs + 1))):
    doc.append(TextSegment(rng.integers(0, vocab.text_size, int(rng.integers(1, max_text + 1)))))
    doc.append(ImageSegment(rng.integers(0, vocab.image_size, image_tokens)))
  return doc


def random_documents(vocab: Vocab, n: int, image_tokens: int, rng: np.random.Generator,
                     max_text: int = 24, max_pairs: int = 1) -> list[Document]:
  return [random_document(vocab, rng, image_tokens, max_text, max_pairs) for _ in range(n)]


def random_neighbours(n: int, k: int, rng: np.random.Generator) -> list[np.ndarray]:
  """k distinct neighbour ids per document in [0, n), never the document itself."""
  out = []
  for doc_id in range(n):
    ids = rng.choice(n - 1, size=min(k, n - 1), replace=False)
    out.append(np.where(ids >= doc_id, ids + 1, ids).astype(np.int64))
  return out


def write_token_documents(directory: str, vocab: Vocab, docs: list,
                          meta: dict | None = None) -> int:
  """Documents (segment lists or ready id arrays) -> a token-document record directory."""
  def encoded():
    for doc_id, doc in enumerate(docs):
      ids = doc if isinstance(doc, np.ndarray) else vocab.document_to_ids(doc)
      yield records.encode_tokens(doc_id, ids)
  return records.write_records(directory, encoded(), {"kind": "tokens", **(meta or {})})


def write_neighbours(directory: str, neighbours: list[np.ndarray], meta: dict | None = None) -> int:
  records_iter = (records.encode_neighbours(i, ids) for i, ids in enumerate(neighbours))
  return records.write_records(directory, records_iter, {"kind": "neighbours", **(meta or {})})

"""Synthetic packed batches of the pipeline's batch contract, for tests and benchmarks.

A batch is a dict of numpy arrays, all [B, L] with L = config.model.seq_len:
  inputs int32, targets int32 (next tokens), weights float32 (0 on padding and on the target
  that would cross into the next packed sequence), image_index int32 (raster index of each
  image code, -1 elsewhere), segment_ids int32 (1, 2, ... per packed sequence, 0 = padding),
  positions int32 (position inside its segment).

Sequences look like the real ones: `<eos> text <break> image <break> text <eos>` with ids from
the shared vocabulary, packed back to back, the row's tail padded. Used until (and beside)
the Grain pipeline of `cm3leon_jax/data/pipeline.py`.
"""

from __future__ import annotations

import grain
import numpy as np

from cm3leon_jax.configs.base import tokens_per_image
from cm3leon_jax.data import cm3
from cm3leon_jax.tokenizers.vocab import Vocab


def _sequence(vocab: Vocab, rng: np.random.Generator, image_tokens: int, max_len: int):
  n_text = int(rng.integers(2, 12))
  text = rng.integers(vocab.text_range[0], vocab.text_range[1], n_text)
  image = rng.integers(vocab.image_range[0], vocab.image_range[1], image_tokens)
  brk, eos = vocab.break_id, vocab.eos_id
  ids = np.concatenate([[eos], text[: n_text // 2], [brk], image, [brk], text[n_text // 2:], [eos]])
  return ids[:max_len]


def pack_row(sequences, seq_len: int, vocab: Vocab) -> dict:
  """Pack token sequences (each >= 2 tokens) into one row of the batch contract."""
  inputs = np.zeros(seq_len, np.int32)
  image_index = np.full(seq_len, -1, np.int32)
  targets = np.zeros(seq_len, np.int32)
  weights = np.zeros(seq_len, np.float32)
  segment_ids = np.zeros(seq_len, np.int32)
  positions = np.zeros(seq_len, np.int32)
  at = 0
  for seg, ids in enumerate(sequences, 1):
    n = len(ids) - 1  # a sequence of n+1 tokens gives n (input, next-token) pairs
    if at + n > seq_len:
      break
    inputs[at:at + n] = ids[:-1]
    image_index[at:at + n] = cm3.image_index(ids[:-1], vocab)
    targets[at:at + n] = ids[1:]
    weights[at:at + n] = 1.0
    segment_ids[at:at + n] = seg
    positions[at:at + n] = np.arange(n)
    at += n
  return dict(inputs=inputs, targets=targets, weights=weights, image_index=image_index,
              segment_ids=segment_ids, positions=positions)


def synthetic_batch(config, batch_size: int, seed: int) -> dict:
  """One deterministic packed batch [batch_size, seq_len] for `seed`."""
  vocab = Vocab.from_config(config)
  seq_len = config.model.seq_len
  image_tokens = min(tokens_per_image(config), seq_len // 2)
  rng = np.random.default_rng(seed)
  rows = []
  for _ in range(batch_size):
    sequences, used = [], 0
    while used < seq_len:
      ids = _sequence(vocab, rng, image_tokens, seq_len + 1)
      sequences.append(ids)
      used += len(ids) - 1
    rows.append(pack_row(sequences, seq_len, vocab))
  return {k: np.stack([r[k] for r in rows]) for k in rows[0]}


def synthetic_dataset(config, batch_size: int, seed: int = 0) -> grain.MapDataset:
  """An endless Grain dataset of synthetic batches (checkpointable iterators, like the real one)."""
  return grain.MapDataset.range(1 << 30).map(
      lambda i: synthetic_batch(config, batch_size, seed * 1_000_003 + int(i)))

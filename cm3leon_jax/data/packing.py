"""Examples of varying length -> fixed [L] rows of the batch contract (see pipeline.py).

Two modes (`config.data.packing`):
- packing: Grain's first-fit packer puts several examples in one row of L tokens; every example
  becomes a segment with its own id (1, 2, ...) and positions from 0. Examples are never split.
- padding: one example per row, padded to L.

Padding carries `<pad>` ids, weight 0, image index -1 and segment id 0. Because each example
already holds its own next-token targets (`assembly.Assembler.example`), no target ever crosses
a segment boundary.
"""

from __future__ import annotations

import functools

import grain
import numpy as np

FEATURES = ("inputs", "targets", "weights", "image_index")


def _rename(row: dict) -> dict:
  """Grain's packer names per-feature `<f>_segment_ids`; the contract has one of each."""
  return {"inputs": row["inputs"], "targets": row["targets"], "weights": row["weights"],
          "image_index": row["image_index"], "segment_ids": row["inputs_segment_ids"],
          "positions": row["inputs_positions"]}


def pack(ds: grain.IterDataset, seq_len: int, num_bins: int, pad_id: int = 0,
         seed: int = 0) -> grain.IterDataset:
  """First-fit pack examples {inputs, targets, weights, image_index} [<= L] into rows of L."""
  lengths = {k: seq_len for k in FEATURES}
  packed = grain.experimental.FirstFitPackIterDataset(
      ds, length_struct=lengths, num_packing_bins=num_bins, seed=seed, shuffle_bins=False,
      meta_features=("targets", "weights", "image_index"),
      padding_struct={"inputs": pad_id, "targets": pad_id, "weights": 0, "image_index": -1})
  return packed.map(_rename)


def pad_example(example: dict, seq_len: int, pad_id: int = 0) -> dict:
  """One example -> one row of L: `<pad>` / weight 0 / segment 0 after its S tokens."""
  n = len(example["inputs"])
  if n > seq_len:
    raise ValueError(f"example of {n} tokens does not fit seq_len {seq_len}")
  row = {}
  for key, value, dtype in (("inputs", pad_id, np.int32), ("targets", pad_id, np.int32),
                            ("weights", 0.0, np.float32), ("image_index", -1, np.int32)):
    out = np.full(seq_len, value, dtype)
    out[:n] = example[key]
    row[key] = out
  row["segment_ids"] = (np.arange(seq_len) < n).astype(np.int32)
  row["positions"] = np.where(row["segment_ids"] > 0, np.arange(seq_len), 0).astype(np.int32)
  return row


def pad(ds: grain.IterDataset, seq_len: int, pad_id: int = 0) -> grain.IterDataset:
  return ds.map(functools.partial(pad_example, seq_len=seq_len, pad_id=pad_id))

"""Where each stage of the data flow (DESIGN.md) writes its output, under `config.workdir`.

One table, so the CLI, the quickstart's resume logic and the tests agree on every path.
"""

from __future__ import annotations

import dataclasses
import os


@dataclasses.dataclass(frozen=True)
class Artifacts:
  root: str
  data_dir: str           # TFDS datasets (ArrayRecord)
  text_tokenizer: str     # one JSON file
  vq: str                 # VQ tokenizer checkpoints
  tokens: str             # token documents (ArrayRecord)
  retriever: str          # dual-encoder checkpoints
  index: str              # ScaNN index over the memory bank
  neighbours: str         # static neighbours per training document
  decoder: str            # decoder checkpoints, metrics
  sft_tokens: str         # instruction-tuning token documents, one directory per task
  sft: str                # instruction-tuned decoder checkpoints, metrics (`cm3leon sft`)
  samples: str            # generations
  eval: str               # evaluation reports


def artifacts(config) -> Artifacts:
  root = config.workdir
  join = lambda name: os.path.join(root, name)
  return Artifacts(
      root=root,
      data_dir=config.data.data_dir or join("data"),
      text_tokenizer=join("text_tokenizer.json"),
      vq=join("vq"),
      tokens=join("tokens"),
      retriever=join("retriever"),
      index=join("index"),
      neighbours=join("neighbours"),
      decoder=join("decoder"),
      sft_tokens=join("sft_tokens"),
      sft=join("sft"),
      samples=join("samples"),
      eval=join("eval"),
  )

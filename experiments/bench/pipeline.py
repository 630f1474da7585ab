"""Input-pipeline throughput: packed rows/s and tokens/s of the Grain CM3 pipeline.

    python experiments/bench/pipeline.py            # both shapes, 0/1/2 workers (~3 min here)
    python experiments/bench/pipeline.py --quick    # fewer batches

Data: random caption-image token documents and random static neighbours in the real record
formats (cm3leon_jax/data/synthetic.py), so the full path runs: ArrayRecord reads, the
neighbour join (3 retrieved documents read per example), assembly, CM3 masking, first-fit
packing, batching, multiprocess prefetch. Shapes:
  quickstart   seq_len 512, 64-token images (the quickstart preset)
  paper        seq_len 4096, 1024-token images (cm3leon_350m: 256 px, 32x32 codes)
Workers: 0 runs the pipeline in the consumer process; 1 and 2 are Grain worker processes
(mp_prefetch). Target: >= 100 rows/s of 4096 tokens from one worker (one core).
Reported: median over repeats of rows/s (L-token rows), real tokens/s (non-padding), the
fill (real tokens / L), and for 0 workers rows per CPU-second of the one process doing all
the work (the one-core figure, robust to other jobs sharing the machine). Timing starts
after the first batch (worker start-up excluded).
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", ".."))

import numpy as np  # noqa: E402

from cm3leon_jax import configs  # noqa: E402
from cm3leon_jax.configs.base import tokens_per_image  # noqa: E402
from cm3leon_jax.data import pipeline, synthetic  # noqa: E402
from cm3leon_jax.tokenizers.vocab import Vocab  # noqa: E402

SHAPES = {"quickstart": ("quickstart", 3000), "paper": ("cm3leon_350m", 1000)}


def write_data(root: str, config, num_docs: int) -> list[pipeline.Task]:
  vocab = Vocab.from_config(config)
  rng = np.random.default_rng(0)
  docs = synthetic.random_documents(vocab, num_docs, tokens_per_image(config), rng, max_text=40)
  synthetic.write_token_documents(f"{root}/tokens", vocab, docs)
  synthetic.write_neighbours(f"{root}/neighbours", synthetic.random_neighbours(num_docs, 4, rng))
  return [pipeline.Task("bench", f"{root}/tokens", f"{root}/neighbours")]


def measure(config, tasks, workers: int, batches: int,
            repeats: int) -> tuple[float, float, float | None]:
  it = pipeline.make_iterator(config, tasks, process_index=0, process_count=1,
                              num_workers=workers)
  rates, fills, cpu_rates = [], [], []
  try:
    next(it)  # worker start-up, first reads
    for _ in range(repeats):
      start, cpu, rows, real = time.perf_counter(), time.process_time(), 0, 0
      for _ in range(batches):
        batch = next(it)
        rows += batch["inputs"].shape[0]
        real += int((batch["segment_ids"] > 0).sum())
      rates.append(rows / (time.perf_counter() - start))
      cpu_rates.append(rows / max(time.process_time() - cpu, 1e-9))
      fills.append(real / (rows * batch["inputs"].shape[1]))
  finally:
    if hasattr(it, "close"):
      it.close()
  # With workers the work happens in other processes: this process's CPU time says nothing.
  per_cpu = float(np.median(cpu_rates)) if workers == 0 else None
  return float(np.median(rates)), float(np.median(fills)), per_cpu


def main() -> None:
  parser = argparse.ArgumentParser()
  parser.add_argument("--quick", action="store_true")
  parser.add_argument("--shapes", nargs="+", default=list(SHAPES), choices=list(SHAPES))
  parser.add_argument("--workers", nargs="+", type=int, default=[0, 1, 2])
  args = parser.parse_args()
  batches, repeats = (10, 3) if args.quick else (25, 5)
  print(f"machine: {os.cpu_count()} CPU cores (shared); batch 16 rows; {repeats} repeats x "
        f"{batches} batches; median")
  print(f"{'shape':<11} {'seq_len':>7} {'img tok':>7} {'workers':>7} {'rows/s':>9} "
        f"{'tokens/s':>11} {'fill':>6} {'rows/cpu-s':>10}")
  for shape in args.shapes:
    preset, num_docs = SHAPES[shape]
    config = configs.load(preset, ["train.batch_size=16"])
    with tempfile.TemporaryDirectory() as root:
      tasks = write_data(root, config, num_docs)
      for workers in args.workers:
        rate, fill, per_cpu = measure(config, tasks, workers, batches, repeats)
        seq_len = config.model.seq_len
        print(f"{shape:<11} {seq_len:>7} {tokens_per_image(config):>7} {workers:>7} "
              f"{rate:>9.1f} {rate * seq_len * fill:>11.0f} {fill:>6.1%} "
              f"{'-' if per_cpu is None else f'{per_cpu:.1f}':>10}", flush=True)


if __name__ == "__main__":
  main()

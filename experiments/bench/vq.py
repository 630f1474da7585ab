"""VQ tokenizer throughput: images/s of `ImageTokenizer.encode` and `.decode` (the public API,
host uint8 in and out) at 64 px and 256 px over a batch sweep.

    python experiments/bench/vq.py                 # default sweep for the platform
    python experiments/bench/vq.py --batches 1 8 --sizes 64

64 px: the quickstart VQ at 64 px (4x downsampling, a 16x16 grid; colour-factorised, 128
geometry x 64 colour codes, so `codes` prints 8192 tokens). 256 px: the paper's
tokenizer (cm3leon_7b preset: 32x32 grid, 8192 codes). Weights are random: throughput does not
depend on them. The same script runs unchanged on CPU, GPU or TPU (all local devices, batch
split over the mesh's data axis); on CPU float32, on accelerators too (the VQ computes in f32).
"""

from __future__ import annotations

import argparse
import statistics
import time

import jax
import numpy as np
from flax import nnx

from cm3leon_jax import configs
from cm3leon_jax.tokenizers import vq
from cm3leon_jax.tokenizers.colour_codes import num_tokens

PRESETS = {
    64: ("quickstart", ["vq.image_size=64"]),
    256: ("cm3leon_7b", []),
}
DEFAULT_BATCHES = {
    "cpu": {64: [1, 16, 64, 256], 256: [1, 4]},
    "accelerator": {64: [1, 16, 64, 256, 1024], 256: [1, 8, 32, 128]},
}


def _time(fn, arg, reps: int) -> float:
  fn(arg)  # compile and warm up
  times = []
  for _ in range(reps):
    t = time.perf_counter()
    fn(arg)
    times.append(time.perf_counter() - t)
  return statistics.median(times)


def main() -> None:
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument("--sizes", type=int, nargs="+", default=[64, 256], choices=sorted(PRESETS))
  p.add_argument("--batches", type=int, nargs="+", default=None)
  p.add_argument("--reps", type=int, default=3)
  args = p.parse_args()
  platform = jax.devices()[0].platform
  kind = "cpu" if platform == "cpu" else "accelerator"
  print(f"devices: {len(jax.devices())} x {jax.devices()[0].device_kind} ({platform}); "
        f"median of {args.reps} after warm-up; images/s")
  print(f"{'px':>4} {'grid':>5} {'codes':>6} {'batch':>6} {'encode/s':>10} {'decode/s':>10} "
        f"{'enc x b=1':>9} {'dec x b=1':>9}")
  for size in args.sizes:
    preset, overrides = PRESETS[size]
    config = configs.load(preset, overrides)
    c = config.vq
    tok = vq.ImageTokenizer(vq.VQModel(c, rngs=nnx.Rngs(0)))
    grid = c.image_size // c.downsample
    tokens = num_tokens(c)
    base = None
    for batch in args.batches or DEFAULT_BATCHES[kind][size]:
      images = np.random.default_rng(0).integers(0, 256, (batch, size, size, 3), dtype=np.uint8)
      codes = tok.encode(images)
      enc = batch / _time(tok.encode, images, args.reps)
      dec = batch / _time(tok.decode, codes, args.reps)
      base = base or (enc, dec)
      print(f"{size:>4} {grid:>2}x{grid:<2} {tokens:>6} {batch:>6} {enc:>10.1f} "
            f"{dec:>10.1f} {enc / base[0]:>9.2f} {dec / base[1]:>9.2f}", flush=True)


if __name__ == "__main__":
  main()

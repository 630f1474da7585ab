"""Benchmark: Shapes scenes rendered per second, records written per second (TFDS ArrayRecord
build), and analyzer images parsed per second, at 64 and 256 px (and 32 px, the quickstart's).

    python -m experiments.bench.data_build [--sizes 32 64 256] [--repeats 3]

Prints one table of medians over repeats; "x of 64px" compares each size with 64 px.
"""

from __future__ import annotations

import argparse
import logging
import os
import shutil
import statistics
import tempfile
import time

import tensorflow_datasets as tfds

from cm3leon_jax.data import analyzer, shapes
from cm3leon_jax.data.builders.shapes import Shapes, ShapesConfig

# Work per measurement, sized so each takes about a second or two on 2 CPU cores.
COUNTS = {32: 4000, 64: 2000, 128: 600, 256: 200}


def render_rate(size: int, count: int) -> float:
  start = time.perf_counter()
  for i in range(count):
    shapes.render(shapes.scene_at(0, i), size)
  return count / (time.perf_counter() - start)


def build_rate(size: int, count: int) -> float:
  root = tempfile.mkdtemp(prefix="bench_data_build_")
  try:
    builder = Shapes(data_dir=root, config=ShapesConfig.make(
        image_size=size, num_train=count, num_eval=0, num_heldout=0))
    start = time.perf_counter()
    builder.download_and_prepare(file_format="array_record")
    return count / (time.perf_counter() - start)
  finally:
    shutil.rmtree(root, ignore_errors=True)


def analyze_rate(size: int, count: int) -> float:
  images = [shapes.render(shapes.scene_at(1, i), size) for i in range(count)]
  analyzer.parse(images[0])  # templates are built once per size; not what we time
  start = time.perf_counter()
  for image in images:
    analyzer.parse(image)
  return count / (time.perf_counter() - start)


def main() -> None:
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument("--sizes", type=int, nargs="+", default=[32, 64, 256])
  p.add_argument("--repeats", type=int, default=3)
  args = p.parse_args()
  logging.getLogger("absl").setLevel(logging.ERROR)
  tfds.disable_progress_bar()
  rows = {}
  for size in args.sizes:
    count = COUNTS.get(size, 500)
    rows[size] = [statistics.median(f(size, count) for _ in range(args.repeats))
                  for f in (render_rate, build_rate, analyze_rate)]
  print(f"\nShapes data benchmark ({os.cpu_count()} CPUs; medians of {args.repeats} runs)")
  header = (f"| size | scenes rendered/s | records written/s | analyzer images/s "
            f"| render x of 64px | write x of 64px |")
  print(header)
  print("|" + "---|" * 6)
  base = rows.get(64)
  for size, (render, write, analyze) in rows.items():
    ratio = (lambda v, i: f"{v / base[i]:.2f}" if base else "-")
    print(f"| {size} px | {render:,.0f} | {write:,.0f} | {analyze:,.0f} | {ratio(render, 0)} "
          f"| {ratio(write, 1)} |")


if __name__ == "__main__":
  main()

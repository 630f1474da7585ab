"""`cm3leon data build shapes|coco_captions|image_text_folder`: write a TFDS dataset (ArrayRecord).

    cm3leon data build shapes --config quickstart                  # 20,000 + 1,000 + 1,000 scenes
    cm3leon data build image_text_folder --manual_dir DIR          # DIR/train.jsonl (+ eval.jsonl)
    cm3leon data build coco_captions --manual_dir COCO            # COCO/annotations/captions_*.json

Writes under <workdir>/data (or --config.data.data_dir) at the config's image size
(--config.vq.image_size). A dataset that is already built is left alone (rerunning is free);
--overwrite rebuilds it. Prints a summary: records written and skipped, by split and reason.
A build whose skipped fraction passes --config.data.max_skipped_fraction fails with that summary
as its error and leaves nothing behind.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys

import tensorflow_datasets as tfds
from tqdm import tqdm

from cm3leon_jax.data import sources
from cm3leon_jax.data.builders import common
from cm3leon_jax.errors import InputError
from cm3leon_jax.paths import artifacts


def add_arguments(p: argparse.ArgumentParser) -> None:
  p.add_argument("action", choices=["build"], help="what to do (build a dataset)")
  p.add_argument("dataset", choices=sources.DATASETS)
  p.add_argument("--manual_dir", default=None,
                 help="local data for coco_captions / image_text_folder "
                      "(default: --config.data.manual_dir)")
  p.add_argument("--overwrite", action="store_true", help="rebuild an existing dataset")


def build(config, name: str, manual_dir: str | None = None, overwrite: bool = False,
          progress: bool = False):
  """Build dataset `name` as `config` sets it up; returns the (prepared) builder.

  Raises InputError for bad input (missing manual_dir, too many skipped records); nothing is
  left on disk by a failed build."""
  manual_dir = manual_dir or config.data.manual_dir or None
  if name != "shapes":
    if not manual_dir:
      raise InputError(f"data build {name}: needs --manual_dir (or --config.data.manual_dir)")
    if not os.path.isdir(manual_dir):
      raise InputError(f"--manual_dir {manual_dir}: no such directory")
  bar = tqdm(desc=f"{name}", unit=" items", disable=not progress, file=sys.stderr)
  builder = sources.builder_for(config, name, progress=bar)
  if builder.is_prepared() and not overwrite:
    bar.close()
    return builder
  data_dir = artifacts(config).data_dir
  existed = _tree(data_dir)
  mode = (tfds.download.GenerateMode.FORCE_REDOWNLOAD if overwrite
          else tfds.download.GenerateMode.REUSE_DATASET_IF_EXISTS)
  tfds.disable_progress_bar()  # ours counts items across splits; TFDS's would add one per split
  try:
    builder.download_and_prepare(
        file_format="array_record",
        download_config=tfds.download.DownloadConfig(
            manual_dir=os.path.abspath(manual_dir) if manual_dir else None, download_mode=mode))
  except BaseException:
    # TFDS deletes its incomplete.* directory; remove the empty folders it made around it.
    _remove_new_empty_dirs(data_dir, existed)
    raise
  finally:
    bar.close()
  return builder


def _tree(root: str) -> set[str]:
  return {dirpath for dirpath, _, _ in os.walk(root)} if os.path.isdir(root) else set()


def _remove_new_empty_dirs(root: str, existed: set[str]) -> None:
  for dirpath in sorted(_tree(root), key=len, reverse=True):
    if dirpath not in existed and not os.listdir(dirpath):
      os.rmdir(dirpath)


def summary(builder) -> str:
  """Records written and skipped per split, with reasons."""
  skipped = common.read_skips(builder)
  lines = []
  for split, info in sorted(builder.info.splits.items()):
    counts = skipped.get(split, {})
    reasons = ", ".join(f"{k}={v}" for k, v in sorted(counts.items(), key=lambda kv: -kv[1]))
    lines.append(f"  {split:8s} written {info.num_examples:8d}   skipped {sum(counts.values()):6d}"
                 + (f" ({reasons})" if reasons else ""))
  return "\n".join(lines)


def run(args, config) -> int:
  # TFDS logs a warning per custom builder config; ours are always custom (named by size).
  logging.getLogger("absl").setLevel(logging.ERROR)
  was_built = sources.builder_for(config, args.dataset).is_prepared()
  builder = build(config, args.dataset, args.manual_dir, args.overwrite,
                  progress=sys.stderr.isatty())
  state = "already built" if was_built and not args.overwrite else "built"
  print(f"{builder.name} ({builder.builder_config.name}) {state}: {builder.data_dir}")
  print(summary(builder))
  return 0

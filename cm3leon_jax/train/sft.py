"""`cm3leon sft`: instruction tuning (REFERENCE.md 6) of the pretrained decoder on the Shapes
task mixture.

    cm3leon sft --config quickstart                        # after `cm3leon quickstart`
    cm3leon eval --suite vqa --decoder outputs/quickstart/sft
    cm3leon sft --config quickstart --config.sft.tasks=vqa,image_caption --config.sft.steps=800

1. Data: each task of `sft.tasks` as token documents, `sft.records_per_task` of train scenes
   and `sft.eval_records_per_task` of eval scenes (data/sft_data.py; built once, reused).
2. Mixture: one Grain task per SFT task, weighted by `balance_weights` (the paper's 3 / 0.3
   thresholds), plus the pretraining documents with their neighbours when
   `sft.pretrain_weight` > 0. Every sequence goes through the pretraining pipeline's CM3
   transform and packing: the paper's "same CM3 objective on the concatenated instruction and
   output". The task templates are the whole sequence: no retrieval for SFT records.
3. Training: the trainer (trainer.py) over `sft.steps` with `sft.peak_lr` / `sft.warmup_steps`
   (the rest of optimizer and train as configured), starting from the latest checkpoint of
   `<workdir>/decoder` with a fresh AdamW, writing `<workdir>/sft` (checkpoints, metrics.jsonl,
   TensorBoard); a rerun resumes there. Held-out loss every `sft.eval_every` steps on the
   tasks' eval records.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import sys
from typing import Sequence

from cm3leon_jax import configs
from cm3leon_jax.errors import InputError
from cm3leon_jax.paths import artifacts
from cm3leon_jax.train.train_cli import add_run_arguments, check_run_arguments


def add_arguments(p: argparse.ArgumentParser) -> None:
  add_run_arguments(p, "sft.steps",
                    "start again from the pretrained decoder even if SFT checkpoints exist")


def balance_weights(sizes: Sequence[int], up: float, down: float) -> list[float]:
  """Sampling weights of a mixture: each member's natural share n_i / sum(n), scaled towards
  the equal share 1 / T by a factor clipped to [down, up], then normalised (our reading of the
  paper's up/down-sampling thresholds 3 / 0.3). Equal sizes give equal weights; sizes
  (100, 100, 1000): factors 3 (4 clipped), 3, 0.4 -> (0.3, 0.3, 0.4)."""
  if not sizes or min(sizes) < 1:
    raise InputError(f"mixture sizes {list(sizes)}: every member needs >= 1 record")
  total, count = float(sum(sizes)), len(sizes)
  shares = [n / total for n in sizes]
  scaled = [s * min(up, max(down, (1.0 / count) / s)) for s in shares]
  norm = sum(scaled)
  return [w / norm for w in scaled]


def sft_config(config):
  """The training config of the SFT run: sft.* in place of the schedule fields."""
  c = copy.deepcopy(config)
  sft = config.sft
  for override in (f"train.steps={int(sft.steps)}", f"optimizer.peak_lr={float(sft.peak_lr)}",
                   f"optimizer.warmup_steps={int(sft.warmup_steps)}",
                   f"train.eval_every={int(sft.eval_every)}",
                   f"train.checkpoint_every={int(sft.checkpoint_every)}"):
    configs.apply_override(c, override)
  return c


def mixture(config, split: str = "train") -> list:
  """The pipeline tasks of the SFT mixture for `split` (the data must be built)."""
  from cm3leon_jax.data import pipeline, records, sft_data
  names = sft_data.parse_tasks(config.sft.tasks)
  dirs = [sft_data.task_dir(config, t, split) for t in names]
  sizes = [int(records.read_meta(d)["num_records"]) for d in dirs]
  weights = balance_weights(sizes, float(config.sft.balance_up), float(config.sft.balance_down))
  tasks = [pipeline.Task(f"sft/{t}", d, None, weight=w) for t, d, w in zip(names, dirs, weights)]
  pretrain = float(config.sft.pretrain_weight)
  if pretrain > 0:
    base = pipeline.default_tasks(config, split)[0]
    tasks.append(pipeline.Task("pretraining", base.tokens_dir, base.neighbours_dir,
                               base.memory_dir, weight=pretrain / len(names)))
  return tasks


def check_inputs(config) -> str:
  """Clear errors before any work: the pretrained decoder, the tokenizers. Returns the
  pretrained checkpoint directory."""
  paths = artifacts(config)
  checkpoints = os.path.join(paths.decoder, "checkpoints")
  if not (os.path.isdir(checkpoints) and any(d.isdigit() for d in os.listdir(checkpoints))):
    raise InputError(f"{checkpoints}: no pretrained decoder checkpoint; run `cm3leon train` "
                     "(or `cm3leon quickstart`) first")
  for what, path, command in (("text tokenizer", paths.text_tokenizer, "train-text-tokenizer"),
                              ("VQ tokenizer", paths.vq, "train-vq")):
    if not os.path.exists(path):
      raise InputError(f"{path}: no {what}; run `cm3leon {command}` first")
  if float(config.sft.pretrain_weight) > 0:
    from cm3leon_jax.data import pipeline
    for task in pipeline.default_tasks(config):
      for d in (task.tokens_dir, task.neighbours_dir):
        if d and not os.path.isdir(d):
          raise InputError(f"{d}: missing, and --config.sft.pretrain_weight > 0 mixes the "
                           "pretraining documents in; run `cm3leon encode` / `retrieve`")
  return checkpoints


def build_data(config, progress: bool) -> None:
  """Every SFT task's token documents (train and, for the held-out loss, eval). With several
  processes all of them encode (the jitted VQ is a collective); process 0 writes."""
  import jax

  from cm3leon_jax.data import sft_data
  from cm3leon_jax.tokenizers.encode import fingerprint, load_text_tokenizer
  from cm3leon_jax.tokenizers.vq import ImageTokenizer
  paths = artifacts(config)
  text_tokenizer = load_text_tokenizer(paths.text_tokenizer, config)
  image_tokenizer = ImageTokenizer.load(config)
  ids = dict(text_tokenizer_id=fingerprint(paths.text_tokenizer),
             vq_id=f"{os.path.realpath(paths.vq)}@{image_tokenizer.checkpoint_step}")
  splits = [("train", int(config.sft.records_per_task))]
  if int(config.sft.eval_records_per_task) > 0:
    splits.append(("eval", int(config.sft.eval_records_per_task)))
  for task in sft_data.parse_tasks(config.sft.tasks):
    for split, count in splits:
      sft_data.build(config, task, split, count, text_tokenizer, image_tokenizer,
                     progress=progress, write=jax.process_index() == 0, **ids)
  if jax.process_count() > 1:
    from jax.experimental import multihost_utils
    multihost_utils.sync_global_devices("sft data written")


def eval_batches(config, batch_size: int) -> list[dict]:
  """`train.eval_batches` fixed batches of the tasks' eval records (same mixture and masking
  as training, a fixed seed), or none when sft.eval_every or eval_records_per_task is 0."""
  from cm3leon_jax.data import pipeline
  count = int(config.train.eval_batches)
  if count <= 0 or int(config.sft.eval_every) <= 0 or int(config.sft.eval_records_per_task) <= 0:
    return []
  it = pipeline.make_iterator(config, mixture(config, "eval"), num_workers=0,
                              batch_size=batch_size)
  return [next(it) for _ in range(count)]


def run(args, config) -> int:
  check_run_arguments(args)
  from cm3leon_jax.data import sft_data
  sft_data.parse_tasks(config.sft.tasks)  # a bad task list fails before anything loads
  pretrained = check_inputs(config)
  from cm3leon_jax.train import trainer
  trainer.maybe_initialize_distributed(args.coordinator, args.num_processes, args.process_id)
  import jax

  from cm3leon_jax.data import pipeline
  if config.train.batch_size % jax.process_count():
    raise InputError(f"--config.train.batch_size={config.train.batch_size} is not divisible by "
                     f"{jax.process_count()} processes")
  progress = not args.no_progress and sys.stderr.isatty() and jax.process_index() == 0
  build_data(config, progress)
  c = sft_config(config)
  batch = c.train.batch_size // jax.process_count()
  tasks = mixture(c)
  if jax.process_index() == 0:
    print("sft mixture: " + ", ".join(f"{t.name} {t.weight:.3f}" for t in tasks))
  run_dir = artifacts(c).sft
  if not args.no_resume:
    from cm3leon_jax.train.checkpoint import adopt_saved_workers
    c = adopt_saved_workers(c, trainer.run_paths(c, run_dir)["checkpoints"])
  result = trainer.train(c, pipeline.make_iterator(c, tasks, batch_size=batch),
                         max_steps=args.max_steps, resume=not args.no_resume,
                         eval_batches=eval_batches(c, batch), progress=progress,
                         run_dir=run_dir, init_from=pretrained)
  if jax.process_index() == 0:
    last = result.history[-1] if result.history else {}
    summary = {k: round(v, 5) if isinstance(v, float) else v for k, v in last.items()}
    paths = trainer.run_paths(c, run_dir)
    print(f"sft: step {result.step}/{c.train.steps}"
          + (" (preempted)" if result.preempted else "") + f" {json.dumps(summary)}")
    print(f"checkpoints: {paths['checkpoints']}  metrics: {paths['metrics']}")
    print(f"next: cm3leon eval --suite vqa --decoder {run_dir}")
  return 0

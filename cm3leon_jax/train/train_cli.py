"""`cm3leon train`: pretrain the decoder on retrieval-augmented CM3 batches.

    cm3leon train --config quickstart                         # the project's data (workdir)
    cm3leon train --config tiny --synthetic --config.train.steps=20
    # several processes (one per host, or several on one machine with CPU devices):
    cm3leon train --config ... --num-processes 2 --process-id 0 --coordinator localhost:1234

Data: the token documents (`<workdir>/tokens`) and, with retrieval on, their static
neighbours (`<workdir>/neighbours`), read by the Grain pipeline of cm3leon_jax/data/pipeline.py;
`--synthetic` uses random packed batches instead. With the `eval` split encoded (and retrieved),
`train.eval_batches` fixed batches of it give a held-out loss every `train.eval_every` steps.
Resumes from the latest checkpoint in `<workdir>/decoder/checkpoints` unless `--no-resume`.
"""

from __future__ import annotations

import argparse
import json
import sys

from cm3leon_jax.errors import InputError


def add_run_arguments(p: argparse.ArgumentParser, schedule: str, no_resume_help: str) -> None:
  """The options every training command shares (`train`, `sft`): steps of this run, resume,
  processes, progress bar. `schedule` names the config field holding the total steps."""
  p.add_argument("--max-steps", type=int, default=None,
                 help="stop after this many steps in this run (the schedule still spans "
                      f"{schedule}); resume later")
  p.add_argument("--no-resume", action="store_true", help=no_resume_help)
  p.add_argument("--coordinator", default=None, metavar="HOST:PORT",
                 help="jax.distributed coordinator (with --num-processes/--process-id)")
  p.add_argument("--num-processes", type=int, default=None)
  p.add_argument("--process-id", type=int, default=None)
  p.add_argument("--no-progress", action="store_true", help="no progress bar")


def check_run_arguments(args) -> None:
  """Clear errors for the shared options, before anything starts."""
  if args.num_processes is not None and args.num_processes > 1:
    if args.process_id is None or args.coordinator is None:
      raise InputError("--num-processes > 1 needs --process-id and --coordinator")
  if args.max_steps is not None and args.max_steps < 1:
    raise InputError(f"--max-steps={args.max_steps}: must be >= 1")


def add_arguments(p: argparse.ArgumentParser) -> None:
  p.add_argument("--synthetic", action="store_true",
                 help="train on random packed batches (no data needed; for smoke tests)")
  add_run_arguments(p, "train.steps", "start from scratch even if checkpoints exist")


def data_iterator(config, synthetic: bool):
  """This process's batches: the Grain pipeline, or synthetic batches of the same contract."""
  import jax
  batch = config.train.batch_size // jax.process_count()
  if synthetic:
    from cm3leon_jax.train.synthetic import synthetic_dataset
    return iter(synthetic_dataset(config, batch, seed=config.train.seed * 1009
                                  + jax.process_index()))
  from cm3leon_jax.data import pipeline
  return pipeline.make_iterator(config, batch_size=batch)


def eval_batches(config, synthetic: bool) -> list[dict]:
  """`train.eval_batches` fixed batches of the `eval` split (same assembly and masking as
  training, a fixed seed), or none: synthetic data, eval_batches = 0, or no encoded eval split
  (a note says so)."""
  import os

  import jax
  count = int(config.train.get("eval_batches", 0))
  if synthetic or count <= 0 or int(config.train.eval_every) <= 0:
    return []
  from cm3leon_jax.data import pipeline
  tasks = pipeline.default_tasks(config, "eval")
  missing = [d for d in (tasks[0].tokens_dir, tasks[0].neighbours_dir)
             if d and not os.path.isdir(d)]
  if missing:
    print(f"train: no held-out loss ({', '.join(missing)} missing; `cm3leon encode --split eval`"
          f"{' and `cm3leon retrieve --split eval`' if config.retrieval.enabled else ''} make it)",
          file=sys.stderr)
    return []
  it = pipeline.make_iterator(config, tasks, num_workers=0,
                              batch_size=config.train.batch_size // jax.process_count())
  return [next(it) for _ in range(count)]


def run(args, config) -> int:
  check_run_arguments(args)
  from cm3leon_jax.train import trainer
  trainer.maybe_initialize_distributed(args.coordinator, args.num_processes, args.process_id)
  import jax
  if config.train.batch_size % jax.process_count():
    raise InputError(f"--config.train.batch_size={config.train.batch_size} is not divisible by "
                     f"{jax.process_count()} processes")
  if not args.no_resume:
    from cm3leon_jax.train.checkpoint import adopt_saved_workers
    config = adopt_saved_workers(config, trainer.run_paths(config)["checkpoints"])
  result = trainer.train(config, data_iterator(config, args.synthetic), max_steps=args.max_steps,
                         resume=not args.no_resume,
                         eval_batches=eval_batches(config, args.synthetic),
                         progress=not args.no_progress and sys.stderr.isatty())
  if jax.process_index() == 0:
    last = result.history[-1] if result.history else {}
    summary = {k: round(v, 5) if isinstance(v, float) else v for k, v in last.items()}
    paths = trainer.run_paths(config)
    fitted = (f" (time budget {float(config.train.time_budget_s):.0f} s: "
              f"{result.total_steps} of train.steps={config.train.steps})"
              if result.total_steps < int(config.train.steps) else "")
    if result.num_layers != int(config.model.num_layers):
      fitted += (f" with {result.num_layers} layers, not model.num_layers="
                 f"{config.model.num_layers} (train.time_budget_min_steps)")
    print(f"train: step {result.step}/{result.total_steps}{fitted}"
          + (" (preempted)" if result.preempted else "") + f" {json.dumps(summary)}")
    print(f"checkpoints: {paths['checkpoints']}  metrics: {paths['metrics']}")
  return 0

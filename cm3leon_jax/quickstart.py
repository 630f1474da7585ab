"""`cm3leon quickstart`: the whole CM3Leon recipe end to end, each stage one CLI command.

    cm3leon quickstart                      # quickstart preset: 32 px Shapes on a 2-core CPU
    cm3leon quickstart --config tiny        # the same stages in about a minute (tests)

Stages run in the order of DESIGN.md's data flow, in this process, through the same commands a
user runs by hand (so their progress bars, resume logic and errors are the ones users see):
build Shapes, train the text tokenizer, the VQ tokenizer, encode every split, train the dual
encoder, index the memory bank, compute static neighbours, pretrain the decoder, then generate,
caption, infill and evaluate into `<workdir>/report.md`, `metrics.json`, `samples.png` and
`infill.png`. A stage whose output is recorded in `<workdir>/quickstart.json` and still on disk
is skipped, so re-running resumes after an interruption. Wall time per stage is recorded.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import shlex
import sys
import time
from typing import Callable

from cm3leon_jax import hugepages
from cm3leon_jax.errors import InputError
from cm3leon_jax.paths import artifacts
from cm3leon_jax.train import time_budget

STATE_FILE = "quickstart.json"


@dataclasses.dataclass(frozen=True)
class Stage:
  name: str
  argv: tuple[str, ...]                  # the CLI command and its arguments
  outputs: Callable[[object], list[str]]  # paths that exist once the stage is done


def stages(config) -> list[Stage]:
  p = artifacts(config)
  splits = ("train", "eval", "heldout")
  suffix = lambda d, s: d if s == "train" else f"{d}-{s}"
  out = [
      Stage("data", ("data", "build", "shapes"), lambda c: [p.data_dir]),
      Stage("text tokenizer", ("train-text-tokenizer",), lambda c: [p.text_tokenizer]),
      Stage("VQ tokenizer", ("train-vq",), lambda c: [p.vq]),
  ]
  out += [Stage(f"encode {s}", ("encode", "--split", s), lambda c, s=s: [suffix(p.tokens, s)])
          for s in splits]
  if config.retrieval.enabled:
    out += [
        Stage("dual encoder", ("train-retriever",), lambda c: [p.retriever]),
        Stage("ScaNN index", ("index",), lambda c: [p.index]),
    ]
    out += [Stage(f"retrieve {s}", ("retrieve", "--split", s),
                  lambda c, s=s: [suffix(p.neighbours, s)]) for s in splits]
  out += [
      Stage("decoder", ("train",), lambda c: [p.decoder]),
      Stage("generate + evaluate", ("eval", "--suite", "quickstart"),
            lambda c: [os.path.join(p.root, "report.md")]),
  ]
  return out


def _load_state(path: str) -> dict:
  try:
    with open(path) as f:
      return json.load(f)
  except FileNotFoundError:
    return {"done": {}}
  except json.JSONDecodeError:
    raise InputError(f"{path}: corrupt quickstart state; delete it to re-run every stage") from None


def _save_state(path: str, state: dict) -> None:
  tmp = f"{path}.tmp"
  with open(tmp, "w") as f:
    json.dump(state, f, indent=1)
  os.replace(tmp, path)


def add_arguments(p: argparse.ArgumentParser) -> None:
  p.add_argument("--redo", nargs="*", default=[], metavar="STAGE",
                 help="re-run these stages (names as printed) even if their output exists")


def decoder_budget_overrides(config, state: dict) -> list[str]:
  """`--config.train.time_budget_s=S` for the decoder stage: `quickstart.budget_s` less the
  recorded seconds of the stages before it (this call's and earlier ones'), so a slower
  machine trains fewer steps instead of overrunning the budget (train/time_budget.py). Nothing
  when there is no budget. At least 1 s: the trainer then stops after its calibration steps."""
  budget = float(config.quickstart.get("budget_s", 0.0))
  if budget <= 0:
    return []
  names = [stage.name for stage in stages(config)]
  before = set(names[:names.index("decoder")])  # not an earlier run's evaluation (--redo)
  used = sum(seconds for name, seconds in state["done"].items() if name in before)
  left = max(budget - used, 1.0)
  print(f"quickstart: {used:.0f} s of the {budget:.0f} s budget used; the decoder may take "
        f"{left:.0f} s (its steps fitted to that, at most train.steps={config.train.steps}; "
        "--config.quickstart.budget_s=0 trains them all)", flush=True)
  return [f"--config.train.time_budget_s={left:.1f}"]


def run(args, config, overrides: list[str] | None = None) -> int:
  from cm3leon_jax import cli
  overrides = list(overrides if overrides is not None else getattr(args, "overrides", []))
  root = config.workdir
  os.makedirs(root, exist_ok=True)
  state_path = os.path.join(root, STATE_FILE)
  state = _load_state(state_path)
  todo = stages(config)
  start = time.time()
  print(f"cm3leon quickstart: {len(todo)} stages, preset {config.name}, workdir {root}",
        flush=True)
  note = hugepages.slow_memory_note()
  if note:  # the quickstart preset's 15-minute budget assumes them (configs/quickstart.py)
    print(note, file=sys.stderr, flush=True)
  for i, stage in enumerate(todo, 1):
    outputs = stage.outputs(config)
    recorded = state["done"].get(stage.name)
    if (recorded is not None and stage.name not in args.redo
        and all(os.path.exists(o) for o in outputs)):
      print(f"[{i}/{len(todo)}] {stage.name}: done ({recorded:.1f} s), skipped", flush=True)
      continue
    where = cli.COMMANDS[stage.argv[0]][1]
    if not cli._is_built(where):
      print(f"[{i}/{len(todo)}] {stage.name}: `cm3leon {stage.argv[0]}` is not built yet "
            f"({where}); quickstart stops here.", file=sys.stderr, flush=True)
      return cli.EXIT_NOT_BUILT
    extra = decoder_budget_overrides(config, state) if stage.name == "decoder" else []
    print(f"[{i}/{len(todo)}] {stage.name}: cm3leon {' '.join([*stage.argv, *extra])}",
          flush=True)
    t0 = time.time()
    code = cli.main([*stage.argv, "--config", args.config, *overrides, *extra])
    if code != 0:
      print(f"quickstart: stage {stage.name!r} failed (exit {code}); fix it and re-run to "
            "resume from this stage.", file=sys.stderr)
      return code
    state["done"][stage.name] = time.time() - t0
    _save_state(state_path, state)
  total = time.time() - start
  state["total_seconds_last_run"] = total
  _save_state(state_path, state)
  print(f"quickstart finished in {total / 60:.1f} min; report: {os.path.join(root, 'report.md')}")
  fitted = time_budget.load(artifacts(config).decoder) if config.quickstart.budget_s > 0 else None
  if time_budget.cut_short(fitted):
    layers = time_budget.depth_change(fitted)
    depth = (f", with {layers[0]} layers (too few steps of the preset's {layers[1]} fit)"
             if layers else "")
    print(f"note: the time budget held {fitted['steps']} of the decoder's "
          f"{fitted['configured_steps']} steps on this machine ({fitted['step_s']:.3f} s per "
          f"step){depth}; delete its decoder/ and re-run with --config.quickstart.budget_s=0 "
          "for the full recipe", flush=True)
  preset = shlex.join(["--config", args.config, *overrides])
  print(f"next: cm3leon generate {preset} --prompt \"a small red circle at the top left\"  |  "
        f"cm3leon sft {preset}  |  cm3leon export {preset} (an inference bundle)")
  return 0

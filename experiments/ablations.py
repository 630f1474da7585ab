"""The paper's claims on Shapes, as ablations with their spread over seeds.

    python -m experiments.ablations --config quickstart [--config.x=y ...] [--seeds 2]
        [--workdir outputs/ablations-quickstart] [--from-workdir outputs/quickstart]
        [--prompts 32] [--cfg-weights 1,2,3,4,5,6,7] [--pool-sizes 1,2,4,8,16] [--docs 0,1,2]

Rows (every number is the analyzer's accuracy on held-out single-object prompts, through the
evaluation suite's own stages, cm3leon_jax/eval/suite.py):
  1. retrieval-augmented training vs none: a second decoder trained with `retrieval.enabled=False`
     (the pipeline joins no neighbours; data/pipeline.py `default_tasks`), evaluated with 0
     retrieved documents, against the recipe's decoder with `decoding.num_retrieved` documents;
  2. 0 / 1 / 2 retrieved documents at inference (one model);
  3. CFG weight sweep (`decoding.cfg_weight`; 1 = no guidance);
  4. temperature (top-p pool with top_p = 1) vs top-p vs CD-K vs mixed (half top-p, half CD-K)
     as the re-ranked pool grows (`eval.num_candidates`);
  5. CM3 masking vs plain causal training (`data.causal_fraction=1.0`: every sequence left
     unmasked, data/assembly.py), measured on image infilling (and text-to-image).
Spread: training rows (1, 5) train one decoder per seed (`train.seed` and `data.shuffle_seed`
= the config's + i); inference rows (2-4) vary the sampling seed (`eval.seed` + i) on the
recipe's decoder of the first training seed.

Mechanics: the upstream artifacts (Shapes, tokenizers, VQ, dual encoder, index, neighbours) come
from `--from-workdir` (a `cm3leon quickstart` run of the same config) or are made by the
quickstart's own stages into `<workdir>/upstream`. Each decoder trains into
`<workdir>/runs/<variant>-seed<s>` (upstream artifacts symlinked) through `cm3leon train`;
the recipe's first-seed decoder is copied from `--from-workdir` instead when that run's last
checkpoint was saved with the same training config (`reusable_decoder`).
Every finished stage, training and cell is recorded in `<workdir>/cells.json` and skipped on
re-run. Writes `<workdir>/report.md`, `cfg_sweep.png` and `pool_size.png`.

Cost (quickstart preset, defaults, quiet 2-core CPU): printed at the start; the knobs are
--seeds, --prompts, the lists, and `--config.train.steps`.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import platform
import shlex
import shutil
import sys
import time

from cm3leon_jax import cli, configs, hugepages
from cm3leon_jax.errors import InputError
from cm3leon_jax.paths import artifacts
from experiments import ablation_report as R

# Training variants: overrides on top of the user's config. The recipe's decoder is the
# retrieval-augmented arm of row 1 and the CM3 arm of row 5.
VARIANTS = {
    "ra_cm3": (),
    "no_retrieval": ("retrieval.enabled=False",),
    "causal": ("data.causal_fraction=1.0",),
}
# Candidate pools of row 4 (decode/api.py POOLS); "temperature" = a top-p pool without the cut.
METHODS = {
    "temperature": ("decoding.pool=top_p", "decoding.top_p=1.0"),
    "top_p": ("decoding.pool=top_p",),
    "cdk": ("decoding.pool=cdk",),
    "mixed": ("decoding.pool=mixed",),
}
ITEMS = {
    "retrieval": "1. Retrieval-augmented training vs none",
    "docs": "2. Retrieved documents at inference",
    "cfg": "3. Classifier-free guidance weight",
    "pool": "4. Candidate pools as they grow (re-ranked by the dual encoder)",
    "cm3": "5. CM3 masking vs plain causal training",
}
STATE_FILE = "cells.json"
UPSTREAM_END = "decoder"  # quickstart stages before this one make the shared artifacts
# The start-up cost estimate, from rates of the quickstart preset on a 2-core CPU: 0.1 s per
# decoder step (batch 4 x 384 tokens; 550 s for 5,600 steps with eval and checkpoints) and ~240 s
# of upstream stages on a quiet machine
# (quickstart.py's record); 0.08 s per text-to-image candidate measured at load average ~9
# (compiles included), an upper bound.
SECONDS_PER_STEP = 0.1
SECONDS_PER_SAMPLE = 0.08
SECONDS_UPSTREAM = 240.0


@dataclasses.dataclass(frozen=True)
class Plan:
  preset: str
  overrides: tuple[str, ...]   # "a.b=value", the user's
  seeds: int
  workdir: str
  from_workdir: str | None
  docs: tuple[int, ...]
  cfg_weights: tuple[float, ...]
  pool_sizes: tuple[int, ...]
  methods: tuple[str, ...]
  command: str


@dataclasses.dataclass(frozen=True)
class Cell:
  item: str                     # key of ITEMS
  row: str
  column: str                   # "" or e.g. the pool size / the task of row 5
  variant: str                  # key of VARIANTS
  train_index: int              # which training seed's decoder
  task: str                     # "t2i" | "infill"
  overrides: tuple[str, ...]    # evaluation overrides


# --- flags -----------------------------------------------------------------------------------

def _list(text: str, kind, flag: str) -> tuple:
  try:
    values = tuple(kind(v) for v in text.split(",") if v.strip())
  except ValueError:
    raise InputError(f"{flag}={text!r}: expected comma-separated {kind.__name__}s") from None
  if not values:
    raise InputError(f"{flag}={text!r}: the list is empty")
  return values


def parse(argv: list[str]) -> Plan:
  """Flags -> a validated Plan; bad values raise InputError naming the flag."""
  overrides, rest = cli._split_overrides(argv)
  p = argparse.ArgumentParser(prog="python -m experiments.ablations",
                              description=__doc__.split("\n")[0])
  p.add_argument("--config", default="quickstart")
  p.add_argument("--seeds", type=int, default=2, help="training seeds and sampling seeds")
  p.add_argument("--prompts", type=int, default=None,
                 help="held-out prompts per cell (default: eval.num_prompts)")
  p.add_argument("--workdir", default=None, help="default: outputs/ablations-<preset>")
  p.add_argument("--from-workdir", default=None,
                 help="a finished quickstart run of the same config to take the data, "
                      "tokenizers, dual encoder, index and neighbours from")
  p.add_argument("--docs", default="0,1,2")
  p.add_argument("--cfg-weights", default="1,2,3,4,5,6,7")
  p.add_argument("--pool-sizes", default="1,2,4,8,16")
  p.add_argument("--methods", default=",".join(METHODS))
  args = p.parse_args(rest)
  if args.seeds < 1:
    raise InputError(f"--seeds={args.seeds}: must be >= 1")
  if args.prompts is not None:
    if args.prompts < 1:
      raise InputError(f"--prompts={args.prompts}: must be >= 1")
    overrides.append(f"--config.eval.num_prompts={args.prompts}")
  docs = _list(args.docs, int, "--docs")
  weights = _list(args.cfg_weights, float, "--cfg-weights")
  sizes = _list(args.pool_sizes, int, "--pool-sizes")
  methods = _list(args.methods, str, "--methods")
  if min(docs) < 0:
    raise InputError(f"--docs={args.docs}: document counts must be >= 0")
  if min(weights) < 0:
    raise InputError(f"--cfg-weights={args.cfg_weights}: guidance weights must be >= 0")
  if min(sizes) < 1:
    raise InputError(f"--pool-sizes={args.pool_sizes}: pool sizes must be >= 1")
  unknown = [m for m in methods if m not in METHODS]
  if unknown:
    raise InputError(f"--methods: unknown {unknown} (choose from {', '.join(METHODS)})")
  overrides = tuple(o[len("--config."):] for o in overrides)
  config = configs.load(args.config, overrides)  # a bad override fails here, before any work
  if not config.retrieval.enabled:
    raise InputError("--config.retrieval.enabled=False: the ablations compare against the "
                     "retrieval-augmented recipe; leave retrieval on")
  if args.from_workdir and not os.path.isdir(args.from_workdir):
    raise InputError(f"--from-workdir {args.from_workdir}: not a directory")
  name = os.path.splitext(os.path.basename(args.config.partition(":")[0]))[0]
  return Plan(args.config, overrides, args.seeds,
              args.workdir or os.path.join("outputs", f"ablations-{name}"), args.from_workdir,
              docs, weights, sizes, methods,
              "python -m experiments.ablations " + shlex.join(argv))


def load_config(plan: Plan, *extra: str):
  return configs.load(plan.preset, (*plan.overrides, *extra))


# --- the cells -------------------------------------------------------------------------------

def cells(plan: Plan) -> list[Cell]:
  """Every (row, column, seed) of the report."""
  config = load_config(plan)
  seed0 = int(config.eval.seed)
  out = []
  for i in range(plan.seeds):
    out += [Cell("retrieval", R.RA, "", "ra_cm3", i, "t2i", ()),
            Cell("cm3", R.CM3, "infill", "ra_cm3", i, "infill", ()),
            Cell("cm3", R.CM3, "t2i", "ra_cm3", i, "t2i", ())]
  for i in range(plan.seeds):
    seed = (f"eval.seed={seed0 + i}",)
    out += [Cell("docs", R.docs_label(k), "", "ra_cm3", 0, "t2i",
                 (f"decoding.num_retrieved={k}", *seed)) for k in plan.docs]
    out += [Cell("cfg", R.cfg_label(w), "", "ra_cm3", 0, "t2i", (f"decoding.cfg_weight={w}", *seed))
            for w in plan.cfg_weights]
    out += [Cell("pool", m, str(n), "ra_cm3", 0, "t2i",
                 (*METHODS[m], f"eval.num_candidates={n}", *seed))
            for m in plan.methods for n in plan.pool_sizes]
  for i in range(plan.seeds):
    out += [Cell("retrieval", R.NO_RA, "", "no_retrieval", i, "t2i",
                 ("decoding.num_retrieved=0",))]
  for i in range(plan.seeds):
    out += [Cell("cm3", R.CAUSAL, "infill", "causal", i, "infill", ()),
            Cell("cm3", R.CAUSAL, "t2i", "causal", i, "t2i", ())]
  return out


def run_dir(plan: Plan, variant: str, index: int) -> str:
  return os.path.join(plan.workdir, "runs", f"{variant}-seed{index}")


def train_overrides(plan: Plan, variant: str, index: int) -> tuple[str, ...]:
  config = load_config(plan)
  return (*VARIANTS[variant], f"train.seed={int(config.train.seed) + index}",
          f"data.shuffle_seed={int(config.data.shuffle_seed) + index}",
          f"workdir={run_dir(plan, variant, index)}")


def cell_config(plan: Plan, cell: Cell):
  return load_config(plan, *train_overrides(plan, cell.variant, cell.train_index), *cell.overrides)


def cell_key(cell: Cell, config) -> str:
  """What the measurement depends on (effective values), so equal settings of different rows
  (e.g. 2 documents = the recipe's CFG weight = a mixed pool of 8 at the defaults) are measured
  once."""
  d, e = config.decoding, config.eval
  if cell.task == "t2i":
    # A mixed pool of one is a top-p sample (decode/api.py: the CD-K half is empty).
    pool = "top_p" if d.pool == "mixed" and e.num_candidates == 1 else d.pool
    knobs = dict(k=d.num_retrieved, cfg=d.cfg_weight, pool=pool, top_p=d.top_p,
                 t=d.temperature, n=e.num_candidates, seed=e.seed)
  else:
    knobs = dict(t=d.temperature, top_p=d.top_p, row=e.infill_row, seed=e.seed)
  return f"{cell.variant}/seed{cell.train_index}/{cell.task}/" + json.dumps(knobs, sort_keys=True)


# --- state -----------------------------------------------------------------------------------

class Store:
  """`<workdir>/cells.json`: what is done (upstream stages, trained decoders, measured cells)."""

  def __init__(self, path: str, fingerprint: dict):
    self.path = path
    try:
      with open(path) as f:
        self.data = json.load(f)
    except FileNotFoundError:
      self.data = {"plan": fingerprint, "upstream": {}, "trained": {}, "cells": {}}
    except json.JSONDecodeError:
      raise InputError(f"{path}: corrupt ablation state; delete it to start over") from None
    if self.data.get("plan") != fingerprint:
      raise InputError(f"{path}: holds results of another plan ({self.data.get('plan')}); "
                       f"this one is {fingerprint}: use another --workdir or delete the file")

  def save(self) -> None:
    tmp = f"{self.path}.tmp"
    with open(tmp, "w") as f:
      json.dump(self.data, f, indent=1)
    os.replace(tmp, self.path)


# --- upstream, training, measurement (the real CLI stages and eval code) ---------------------

def _argv(plan: Plan, *extra: str) -> list[str]:
  return ["--config", plan.preset, *(f"--config.{o}" for o in (*plan.overrides, *extra))]


def upstream(plan: Plan, store: Store) -> str:
  """The directory holding the shared artifacts: --from-workdir, or made by quickstart stages."""
  from cm3leon_jax import quickstart
  root = plan.from_workdir or os.path.join(plan.workdir, "upstream")
  config = load_config(plan, f"workdir={root}")
  for stage in quickstart.stages(config):
    if stage.name == UPSTREAM_END:
      break
    on_disk = all(os.path.exists(o) for o in stage.outputs(config))
    if plan.from_workdir:
      if not on_disk:
        raise InputError(f"--from-workdir {root}: no output of stage {stage.name!r} "
                         f"({', '.join(stage.outputs(config))}); run `cm3leon quickstart` there")
      continue
    if stage.name in store.data["upstream"] and on_disk:
      continue
    print(f"ablations upstream: cm3leon {' '.join(stage.argv)}", flush=True)
    t0 = time.time()
    code = cli.main([*stage.argv, *_argv(plan, f"workdir={root}")])
    if code:
      raise RuntimeError(f"upstream stage {stage.name!r} failed (exit {code})")
    store.data["upstream"][stage.name] = time.time() - t0
    store.save()
  return root


def link_upstream(plan: Plan, root: str, directory: str) -> None:
  """Symlink the shared artifacts of `root` into a run's workdir (everything but the decoder)."""
  p = artifacts(load_config(plan, f"workdir={root}"))
  shared = [p.text_tokenizer, p.vq, p.retriever, p.index]
  shared += [d + s for d in (p.tokens, p.neighbours) for s in ("", "-eval", "-heldout")]
  if not load_config(plan).data.data_dir:
    shared.append(p.data_dir)
  os.makedirs(directory, exist_ok=True)
  for src in shared:
    dst = os.path.join(directory, os.path.basename(src))
    if os.path.exists(src) and not os.path.lexists(dst):
      os.symlink(os.path.abspath(src), dst)


# The config sections that decide what a decoder learns (decoding and eval do not).
TRAINING_SECTIONS = ("vocab", "text_tokenizer", "vq", "data", "retrieval", "model", "optimizer",
                     "train", "mesh")


def reusable_decoder(plan: Plan, variant: str, index: int) -> str | None:
  """The --from-workdir run's decoder directory when it is exactly this run's decoder: the
  recipe's variant of the first seed, its last checkpoint saved with the same training config
  (checkpoint.py stores the config beside the state). None otherwise."""
  if not plan.from_workdir or VARIANTS[variant] or index:
    return None
  source = artifacts(load_config(plan, f"workdir={plan.from_workdir}")).decoder
  ckpts = os.path.join(source, "checkpoints")
  steps = [int(d) for d in os.listdir(ckpts) if d.isdigit()] if os.path.isdir(ckpts) else []
  if not steps:
    return None
  try:
    with open(os.path.join(ckpts, str(max(steps)), "config", "metadata")) as f:
      saved = json.load(f)
  except (OSError, json.JSONDecodeError):
    return None
  config = load_config(plan, *train_overrides(plan, variant, index))
  wanted = json.loads(config.to_json_best_effort())
  same = all(saved.get(s) == wanted.get(s) for s in TRAINING_SECTIONS)
  return source if same and max(steps) == int(wanted["train"]["steps"]) else None


def train_run(plan: Plan, root: str, variant: str, index: int) -> None:
  """One decoder variant, through `cm3leon train` (which itself resumes from checkpoints). The
  recipe's first-seed decoder is copied from --from-workdir when that run trained the same one
  (copied, not linked, so nothing here writes into the user's run)."""
  directory = run_dir(plan, variant, index)
  link_upstream(plan, root, directory)
  source = reusable_decoder(plan, variant, index)
  target = artifacts(load_config(plan, *train_overrides(plan, variant, index))).decoder
  if source and not os.path.exists(target):
    print(f"ablations: {variant} seed {index} is the decoder of {plan.from_workdir}; copying it",
          flush=True)
    shutil.copytree(source, target)
  code = cli.main(["train", *_argv(plan, *train_overrides(plan, variant, index))])
  if code:
    raise RuntimeError(f"training {variant} seed {index} failed (exit {code})")


def load_run(config):
  """The trained decoder of a run with the tokenizers and the dual encoder (for re-ranking,
  even in the run trained without retrieval) and the embedder (CLIP score, FID features)."""
  from cm3leon_jax.decode.api import Generator
  from cm3leon_jax.eval.eval_cli import load_embedder
  generator = Generator.load(config, retrieval=True)
  return generator, load_embedder(config, generator)


def measure(cell: Cell, config, generator, embedder, records) -> dict:
  """One cell through the eval suite's stage; the numbers the report needs."""
  from cm3leon_jax.decode.api import Generator
  from cm3leon_jax.eval import attributes, suite
  # The suite decodes with the generator's config: one per cell, sharing the loaded weights.
  g = Generator(config, generator.model, generator.text_tokenizer, generator.image_tokenizer,
                generator.retriever, generator.memory)
  t0 = time.time()
  if cell.task == "t2i":
    m, _ = suite.text_to_image(config, g, embedder, records)
    out = {"accuracy": m["accuracy"], "clip": (m.get("clip_score") or {}).get("best"),
           "fid": m["fid"]["best"]["fid"], "mean_retrieved": m["mean_retrieved"],
           "chance": m["chance"]["all"], "samples": m["num_prompts"] * m["num_candidates"]}
  else:
    m, _ = suite.infilling(config, g, embedder, records)
    out = {"accuracy": m["accuracy"], "erased": m["erased"]["all"],
           "reconstruction": m["reconstruction"]["all"], "images": m["num_images"]}
  out["all"] = out["accuracy"]["all"]
  out["attributes"] = sum(out["accuracy"][a] for a in attributes.ATTRIBUTES) / len(
      attributes.ATTRIBUTES)
  out["seconds"] = time.time() - t0
  return out


class _CachedSplit:
  """A split's records read once for every cell (the suite walks the same records each time)."""

  def __init__(self, source):
    self._source, self._seen = source, {}

  def __len__(self):
    return len(self._source)

  def __getitem__(self, i):
    if i not in self._seen:
      self._seen[i] = self._source[i]
    return self._seen[i]

  def __repr__(self):
    return repr(self._source)


def _records(config):
  from cm3leon_jax.data.sources import image_text_source
  splits = {}
  return lambda split: splits.setdefault(split, _CachedSplit(image_text_source(config, split)))


# --- the run ---------------------------------------------------------------------------------

def estimate(plan: Plan, todo: list[tuple[Cell, object]], store: Store) -> str:
  trainings = {f"{c.variant}/seed{c.train_index}" for c, _ in todo
               if not reusable_decoder(plan, c.variant, c.train_index)}
  trainings -= set(store.data["trained"])
  steps = int(load_config(plan).train.steps)
  samples = sum(int(cfg.eval.num_prompts) * int(cfg.eval.num_candidates) for c, cfg in todo
                if c.task == "t2i")
  infills = sum(int(cfg.eval.num_infill) for c, cfg in todo if c.task == "infill")
  up = 0.0 if plan.from_workdir or store.data["upstream"] else SECONDS_UPSTREAM
  seconds = (up + len(trainings) * steps * SECONDS_PER_STEP
             + (samples + infills) * SECONDS_PER_SAMPLE)
  return (f"to do: {'upstream stages, ' if up else ''}{len(trainings)} decoder trainings x "
          f"{steps} steps, {len(todo)} cells ({samples} text-to-image samples, {infills} "
          f"infilled images); estimate {seconds / 60:.0f} min at the quickstart preset's rates "
          f"on a quiet 2-core CPU")


def run(plan: Plan) -> int:
  from tqdm import tqdm
  start = time.time()
  os.makedirs(plan.workdir, exist_ok=True)
  config = load_config(plan)
  store = Store(os.path.join(plan.workdir, STATE_FILE),
                {"preset": plan.preset, "overrides": list(plan.overrides)})
  planned = [(c, cell_config(plan, c)) for c in cells(plan)]
  keyed = {}
  for c, cfg in planned:
    keyed.setdefault(cell_key(c, cfg), (c, cfg))
  todo = [v for k, v in keyed.items() if k not in store.data["cells"]]
  order = list(VARIANTS)  # each decoder is trained and loaded once
  todo.sort(key=lambda v: (order.index(v[0].variant), v[0].train_index))
  print(f"ablations: preset {config.name}, {plan.seeds} seeds, workdir {plan.workdir}", flush=True)
  print(f"ablations: {estimate(plan, todo, store)}", flush=True)
  root = upstream(plan, store) if todo else None
  loaded, records = {}, None
  bar = tqdm(todo, desc="ablation cells", unit="cell", disable=not todo)
  for cell, cfg in bar:
    model = (cell.variant, cell.train_index)
    name = f"{cell.variant}/seed{cell.train_index}"
    if model not in loaded:
      loaded.clear()  # one decoder in memory at a time (cells are grouped by model)
      if not (name in store.data["trained"]
              and os.path.isdir(os.path.join(artifacts(cfg).decoder, "checkpoints"))):
        bar.write(f"ablations: training {name} (cm3leon train)")
        t0 = time.time()
        train_run(plan, root, *model)
        store.data["trained"][name] = time.time() - t0
        store.save()
      loaded[model] = load_run(cfg)
    records = records or _records(cfg)
    bar.set_postfix_str(f"{cell.item} {cell.row} {cell.column}".strip())
    store.data["cells"][cell_key(cell, cfg)] = measure(cell, cfg, *loaded[model], records)
    store.save()
  total = time.time() - start
  results = [(c, store.data["cells"][cell_key(c, cfg)]) for c, cfg in planned]
  written = R.write(plan.workdir, results, info(plan, config, store, total))
  print(f"ablations finished in {total / 60:.1f} min (this run); wrote {', '.join(written)}")
  return 0


def info(plan: Plan, config, store: Store, total: float) -> dict:
  """What the report says about how it was made."""
  import jax
  load = ", ".join(f"{x:.2f}" for x in os.getloadavg())
  trained = store.data["trained"]
  return {
      "command": plan.command, "preset": config.name, "seeds": plan.seeds, "items": ITEMS,
      "machine": (f"{platform.machine()} {platform.system()}, {os.cpu_count()} CPUs, jax "
                  f"{jax.__version__} on {jax.default_backend()}, Python "
                  f"{platform.python_version()}; load average at the end {load}"),
      "seconds_this_run": total,
      "seconds_training": sum(trained.values()), "trainings": len(trained),
      "seconds_cells": sum(c.get("seconds", 0.0) for c in store.data["cells"].values()),
      "seconds_upstream": sum(store.data["upstream"].values()),
      "from_workdir": plan.from_workdir,
      "train_steps": int(config.train.steps), "num_prompts": int(config.eval.num_prompts),
      "num_candidates": int(config.eval.num_candidates), "pool": config.decoding.pool,
      "cfg_weight": float(config.decoding.cfg_weight),
      "num_retrieved": int(config.decoding.num_retrieved),
      "train_seed": int(config.train.seed), "eval_seed": int(config.eval.seed),
      "docs": plan.docs, "cfg_weights": plan.cfg_weights, "pool_sizes": plan.pool_sizes,
      "methods": plan.methods,
  }


def main(argv: list[str] | None = None) -> int:
  if argv is None:  # run as a script: the allocator setting of the `cm3leon` command
    hugepages.reexec_with_hugepages()
  argv = list(sys.argv[1:] if argv is None else argv)
  try:
    return run(parse(argv))
  except InputError as e:
    print(f"error: {e}", file=sys.stderr)
    return cli.EXIT_INPUT_ERROR


if __name__ == "__main__":
  sys.exit(main())

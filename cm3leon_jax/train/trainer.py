"""The training loop: mesh, sharded state (fresh or restored), batches, the jitted step,
metrics, checkpoints. Reads top to bottom; `train()` is importable (notebooks, tests).

    result = train(config, data_iter)      # data_iter: local numpy batches (batch contract)

Per log interval it records loss (all / text / image), z-loss, grad norm, learning rate,
step time, tokens/s, analytic model FLOPs and MFU, to `<workdir>/decoder/metrics.jsonl`
and TensorBoard (`<workdir>/decoder/tensorboard`), with a tqdm bar on process 0.
With `eval_batches` (fixed held-out batches; `cm3leon train` takes `train.eval_batches` of
them from the `eval` split) it also records their loss (eval_loss / eval_text_loss /
eval_image_loss) every `train.eval_every` steps and at the end.
Checkpoints (train state + the data iterator's position) go to
`<workdir>/decoder/checkpoints` every `train.checkpoint_every` steps, at the end, and at the
step where a preemption is noticed; a rerun resumes from the latest one.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import logging
import os
import time
from typing import Iterator, Sequence

import jax
import jax.numpy as jnp
import tqdm
from flax import nnx

from cm3leon_jax.errors import InputError
from cm3leon_jax.model.decoder import DecoderConfig
from cm3leon_jax.paths import artifacts
from cm3leon_jax import configs
from cm3leon_jax.train import flops, time_budget
from cm3leon_jax.train.checkpoint import Checkpointer, adopt_budget_depth, with_layers
from cm3leon_jax.train.mesh import global_batch, make_mesh
from cm3leon_jax.train.state import TrainState, abstract_train_state, init_train_state
from cm3leon_jax.train.step import (check_accumulation, check_batch_arrays, make_eval_step,
                                    make_train_step, metrics_from_sums)

log = logging.getLogger(__name__)


@dataclasses.dataclass
class TrainResult:
  state: TrainState
  step: int                   # optimizer steps done
  history: list[dict]         # the logged metric records
  preempted: bool = False
  total_steps: int = 0        # the run's length: train.steps, or what fit the time budget
  num_layers: int = 0         # the decoder's depth: model.num_layers, or the budget's choice


def run_paths(config, run_dir: str | None = None) -> dict:
  """Checkpoints, metrics and TensorBoard of a run under `run_dir` (default: the decoder's)."""
  root = run_dir or artifacts(config).decoder
  return dict(root=root, checkpoints=os.path.join(root, "checkpoints"),
              metrics=os.path.join(root, "metrics.jsonl"),
              tensorboard=os.path.join(root, "tensorboard"))


class MetricsWriter:
  """JSONL + TensorBoard, written by process 0 only."""

  def __init__(self, jsonl_path: str, tensorboard_dir: str):
    self.enabled = jax.process_index() == 0
    if not self.enabled:
      return
    os.makedirs(os.path.dirname(jsonl_path), exist_ok=True)
    self.jsonl = open(jsonl_path, "a", encoding="utf-8")
    from tensorboardX import SummaryWriter
    self.tb = SummaryWriter(tensorboard_dir)

  def write(self, step: int, record: dict) -> None:
    if not self.enabled:
      return
    self.jsonl.write(json.dumps({"step": step, **record}) + "\n")
    self.jsonl.flush()
    for key, value in record.items():
      if isinstance(value, (int, float)) and value is not None:
        self.tb.add_scalar(f"train/{key}", value, step)
    self.tb.flush()

  def close(self) -> None:
    if self.enabled:
      self.jsonl.close()
      self.tb.close()


def maybe_initialize_distributed(coordinator_address: str | None = None,
                                 num_processes: int | None = None,
                                 process_id: int | None = None) -> None:
  """`jax.distributed.initialize` when the job spans more than one process.

  Explicit arguments (e.g. several processes on one machine) or, with none given, the
  environment a TPU pod / multislice job / SLURM / JAX_COORDINATOR_ADDRESS provides.
  `CM3LEON_DISTRIBUTED=1` forces the argument-free call: Cloud TPU VMs may keep their worker
  list in the VM metadata rather than the environment, where JAX finds it and this check
  cannot (tpu/pod.py sets it on every worker). Call before anything touches a JAX device.
  """
  explicit = num_processes is not None and num_processes > 1
  env_multi = ("JAX_COORDINATOR_ADDRESS" in os.environ
               or os.environ.get("CM3LEON_DISTRIBUTED") == "1"
               or "," in os.environ.get("TPU_WORKER_HOSTNAMES", "")
               or int(os.environ.get("MEGASCALE_NUM_SLICES", "1")) > 1
               or int(os.environ.get("SLURM_NTASKS", "1")) > 1)
  if not (explicit or env_multi):
    return
  # CPU hosts need a collectives implementation for cross-process all-reduces (harmless on
  # TPU/GPU, where the accelerator's own collectives are used).
  jax.config.update("jax_cpu_collectives_implementation", "gloo")
  if explicit:
    jax.distributed.initialize(coordinator_address=coordinator_address,
                               num_processes=num_processes, process_id=process_id)
  else:
    jax.distributed.initialize()


def held_out_loss(eval_fn, state, batches: Sequence[dict], mesh) -> dict:
  """Token-weighted mean loss (all / text / image) of fixed batches, without an update."""
  sums = None
  for batch in batches:
    batch_sums = eval_fn(state, global_batch(batch, mesh))
    sums = batch_sums if sums is None else jax.tree.map(jnp.add, sums, batch_sums)
  m = jax.device_get(metrics_from_sums(sums))
  return {f"eval_{kind}": float(m[kind]) for kind, weight in (
      ("loss", "tokens"), ("text_loss", "text_tokens"), ("image_loss", "image_tokens"))
          if m[weight] > 0}


def fresh_optimizer(state):
  """`state` (of (Decoder, nnx.Optimizer)) with the optimizer part as a fresh init leaves it:
  AdamW's moments and every count are zeros (optimizer.py; a test pins this against
  `init_train_state`). Zeroed in place of a second init, so fine-tuning a large model holds one
  train state, not two."""
  pure = nnx.to_pure_dict(state)
  pure[1] = jax.tree.map(jnp.zeros_like, pure[1])
  nnx.replace_by_pure_dict(state, pure)
  return state


def pretrained_state(config, mesh, directory: str):
  """The train state with the parameters of the latest checkpoint in `directory` (another
  run's, e.g. the pretrained decoder's) and a fresh optimizer. Clear error when the checkpoint
  is missing or shaped for another model."""
  ckpt = Checkpointer(directory, config, async_save=False)
  try:
    if ckpt.latest_step() is None:
      raise InputError(f"{directory}: no checkpoint to start from; run `cm3leon train` first")
    abstract = abstract_train_state(config, mesh)
    state = fresh_optimizer(ckpt.restore(abstract))
  finally:
    ckpt.close()
  return TrainState(abstract.graphdef, state, abstract.shardings)


def _compiled(config, ts: TrainState, mesh, eval_batches) -> tuple:
  """(train step, held-out loss step or None, model FLOPs per step) for `config`'s model and
  schedule: built at the start, and again when a time budget changes the depth or length."""
  step_fn = make_train_step(config, ts, mesh)
  eval_fn = make_eval_step(config, ts, mesh) if eval_batches else None
  flops_per_step = flops.train_flops_per_step(DecoderConfig.from_config(config),
                                              config.train.batch_size)
  return step_fn, eval_fn, flops_per_step


def with_steps(config, steps: int, refit: tuple[int, int] | None = None):
  """A copy of `config` with `train.steps` = steps (and the step and length of a re-fit that
  made it that length, train/optimizer.py)."""
  c = copy.deepcopy(config)
  configs.apply_override(c, f"train.steps={int(steps)}")
  at, before = refit or (0, 0)
  configs.apply_override(c, f"train.time_budget_refit_step={int(at)}")
  configs.apply_override(c, f"train.time_budget_refit_from={int(before)}")
  return c


def _end(total_steps: int, start: int, max_steps: int | None) -> int:
  """The step this call stops at: the run's length, or `max_steps` after where it started."""
  return total_steps if max_steps is None else min(total_steps, start + int(max_steps))


def _with_length(config, steps: int, refit: tuple[int, int] | None, ckpt, ts, state, mesh,
                 eval_batches):
  """(config, train state, train step, held-out loss step) for a new length fitted to a time
  budget. The schedule is part of the optimizer (the graphdef) and of the compiled steps; the
  config is the one saved with later checkpoints."""
  config = ckpt.config = with_steps(config, steps, refit)
  ts = TrainState(abstract_train_state(config, mesh).graphdef, state, ts.shardings)
  step_fn, eval_fn, _ = _compiled(config, ts, mesh, eval_batches)
  return config, ts, step_fn, eval_fn


def _fit_to_budget(config, budget_s: float, t_call: float, timed_from: tuple[float, int],
                   step: int, compile_s: float, margin: float,
                   cap: int) -> tuple[int, float, float]:
  """(steps, seconds per step, seconds used): the run's length fitted to the budget from the
  steps timed since `timed_from` (time_budget.py), at most `cap` (the configured length); every
  process takes process 0's decision."""
  now = time.perf_counter()
  step_s = (now - timed_from[0]) / (step - timed_from[1])
  reserve = int(config.train.get("time_budget_reserve_steps", 0))
  # A new length compiles its step again (and the held-out loss's): keep that time back too.
  steps = time_budget.affordable_steps(step, now - t_call, step_s, budget_s, reserve,
                                       extra_s=compile_s, margin=margin)
  steps = min(steps, cap)
  if jax.process_count() > 1:
    from jax.experimental import multihost_utils
    steps = int(multihost_utils.broadcast_one_to_all(jnp.int32(steps)))
  return steps, step_s, now - t_call


def train(config, data_iter: Iterator[dict], *, max_steps: int | None = None,
          resume: bool = True, progress: bool = True,
          eval_batches: Sequence[dict] = (), run_dir: str | None = None,
          init_from: str | None = None) -> TrainResult:
  """Train `config` on `data_iter` (this process's local batches) until `train.steps`.

  `max_steps` stops earlier (this call only; the schedule still spans train.steps).
  `run_dir` holds this run's checkpoints and metrics (default: `<workdir>/decoder`).
  `init_from`: a checkpoint directory whose latest parameters start the run when it has no
  checkpoint of its own to resume (the optimizer starts fresh): fine-tuning (`cm3leon sft`);
  with `eval_batches` the held-out loss is also recorded at step 0, before any update.
  `train.time_budget_s` > 0 fits the run's length (at most `train.steps`) to that many seconds
  from this call on (time_budget.py); the length decided is in `<run_dir>/time_budget.json`.
  """
  t_call = time.perf_counter()
  budget_s = time_budget.check(config)
  # --- Set up mesh -------------------------------------------------------------------------
  mesh = make_mesh(config.mesh)
  check_accumulation(config, mesh)
  local_batch = config.train.batch_size // jax.process_count()
  paths = run_paths(config, run_dir)

  # --- Load checkpoint or initialise -----------------------------------------------------
  ckpt = Checkpointer(paths["checkpoints"], config)
  start = ckpt.latest_step() if resume else None
  # The depth a time budget chose (this run's earlier call, or the run fine-tuning starts from).
  depth_source = paths["checkpoints"] if start is not None else init_from
  if depth_source:
    config = ckpt.config = adopt_budget_depth(config, depth_source, start)
  # A resumed run keeps the length an earlier call fitted to the budget (and its schedule).
  fitted = time_budget.load(paths["root"]) if budget_s > 0 and start is not None else None
  if fitted is not None:
    config = ckpt.config = with_steps(config, int(fitted["steps"]),
                                      time_budget.schedule_refit(fitted))
  total_steps = int(config.train.steps)
  if start is not None:
    abstract = abstract_train_state(config, mesh)
    restorable = data_iter if hasattr(data_iter, "get_state") else None
    state = ckpt.restore(abstract, restorable, step=start)
    ts = TrainState(abstract.graphdef, state, abstract.shardings)
    log.info("resumed from %s/%d", paths["checkpoints"], start)
  elif init_from:
    ts = pretrained_state(config, mesh, init_from)
    log.info("parameters from %s, optimizer fresh", init_from)
    start = 0
  else:
    ts = init_train_state(config, mesh)
    start = 0
  end = _end(total_steps, start, max_steps)

  # --- Update step -------------------------------------------------------------------------
  step_fn, eval_fn, flops_per_step = _compiled(config, ts, mesh, eval_batches)
  eval_every = int(config.train.eval_every)
  peak, peak_source = flops.peak_flops_per_device()
  tokens_per_step = config.train.batch_size * config.model.seq_len
  writer = MetricsWriter(paths["metrics"], paths["tensorboard"])
  bar = tqdm.tqdm(total=end, initial=start, desc=f"train {config.name}", unit="step",
                  disable=not progress or jax.process_index() != 0, dynamic_ncols=True)
  log_every, ckpt_every = max(int(config.train.log_every), 1), int(config.train.checkpoint_every)

  # --- Train loop --------------------------------------------------------------------------
  history, state, step, preempted = [], ts.state, start, False
  last_time, last_step, compile_s = time.perf_counter(), start, None
  timed_from = None  # (time, step) once the first (compiling) step is done
  # The re-fit (time_budget.py): its step, and (time, step) once the step after the fit is done
  # (None until then).
  refit_at, refit_timed = None, None
  # Only Grain iterators can be checkpointed; others (plain generators) restart on resume.
  saved_iter = data_iter if hasattr(data_iter, "get_state") else None
  with jax.set_mesh(mesh):
    if eval_fn is not None and init_from and start == 0:
      # Where fine-tuning starts from: the other run's parameters on this run's held-out data.
      values = held_out_loss(eval_fn, state, eval_batches, mesh)
      writer.write(0, values)
      history.append({"step": 0, **values})
      last_time = time.perf_counter()
    while step < end:
      batch = next(data_iter)
      if step == start:
        check_batch_arrays(batch, config, local_batch)
      state, metrics = step_fn(state, global_batch(batch, mesh))
      step += 1
      if compile_s is None:  # the first step includes compilation: keep it out of timings
        jax.block_until_ready(metrics)
        compile_s = time.perf_counter() - last_time
        last_time, last_step = time.perf_counter(), step
        timed_from = (last_time, step)
      if (budget_s > 0 and fitted is None
          and step - timed_from[1] == time_budget.CALIBRATION_STEPS):
        jax.block_until_ready(metrics)
        origin = int(config.train.get("time_budget_depth_from", 0))
        depth = (dict(num_layers=int(config.model.num_layers), configured_num_layers=origin)
                 if origin else {})
        configured = int(config.train.steps)
        steps, step_s, used_s = _fit_to_budget(config, budget_s, t_call, timed_from, step,
                                               compile_s, time_budget.MARGIN, configured)
        fitted = dict(steps=steps, configured_steps=configured, budget_s=budget_s,
                      step_s=round(step_s, 5), elapsed_s=round(used_s, 2), at_step=step,
                      reserve_steps=int(config.train.get("time_budget_reserve_steps", 0)),
                      **depth)
        layers = time_budget.fallback_layers(config, int(fitted["steps"]))
        if layers is not None and start == 0 and not init_from and ckpt.latest_step() is None:
          # Too few steps of this depth fit: start afresh, shallower (time_budget.py). Nothing
          # was saved yet, so no checkpoint holds the dropped model.
          log.warning("time budget %.0f s: %d steps of %d layers fit (%.3f s per step, %.0f s "
                      "used), fewer than train.time_budget_min_steps=%d; starting again with %d "
                      "layers", budget_s, fitted["steps"], config.model.num_layers,
                      fitted["step_s"], fitted["elapsed_s"],
                      int(config.train.time_budget_min_steps), layers)
          config = ckpt.config = with_layers(config, layers, int(config.model.num_layers))
          if jax.process_index() == 0:  # the new depth calibrates afresh, also on a resume
            time_budget.clear(paths["root"])
          ts = init_train_state(config, mesh)
          state, step, fitted, compile_s = ts.state, 0, None, None
          refit_at, refit_timed = None, None
          step_fn, eval_fn, flops_per_step = _compiled(config, ts, mesh, eval_batches)
          total_steps = int(config.train.steps)
          end = _end(total_steps, 0, max_steps)
          history = []
          writer.write(0, {"num_layers": layers, "restarted_for_time_budget": 1})
          bar.reset(total=end)
          last_time, last_step = time.perf_counter(), 0
          continue
        if jax.process_index() == 0:
          time_budget.save(paths["root"], fitted)
        refit_at = time_budget.refit_step(fitted)
        if fitted["steps"] < total_steps:
          log.warning("time budget %.0f s: %d of %d steps fit (%.3f s per step, %.0f s used); "
                      "the schedule now decays over %d steps", budget_s, fitted["steps"],
                      total_steps, fitted["step_s"], fitted["elapsed_s"], fitted["steps"])
          total_steps = int(fitted["steps"])
          config, ts, step_fn, eval_fn = _with_length(config, total_steps, None, ckpt, ts,
                                                      state, mesh, eval_batches)
          end = _end(total_steps, start, max_steps)
          bar.total = end
          bar.refresh()
      elif refit_at is not None and refit_timed is None:
        # The step after the fit (and its recompilation) is done: the re-fit times from here.
        jax.block_until_ready(metrics)
        refit_timed = (time.perf_counter(), step)
      elif refit_at is not None and step == refit_at:
        jax.block_until_ready(metrics)
        steps, step_s, used_s = _fit_to_budget(config, budget_s, t_call, refit_timed, step,
                                               compile_s, time_budget.REFIT_MARGIN,
                                               int(fitted["configured_steps"]))
        fitted = dict(fitted, steps=steps, step_s=round(step_s, 5),
                      refit=dict(at_step=step, steps_before=total_steps,
                                 step_s=round(step_s, 5), elapsed_s=round(used_s, 2)))
        if jax.process_index() == 0:
          time_budget.save(paths["root"], fitted)
        refit_at = None
        if steps != total_steps:
          log.warning("time budget %.0f s: re-fitted at step %d from %d to %d steps (%.3f s per "
                      "step since step %d, %.0f s used); the schedule's rest stretches over "
                      "them", budget_s, step, total_steps, steps, step_s, refit_timed[1], used_s)
          total_steps = steps
          config, ts, step_fn, eval_fn = _with_length(config, total_steps,
                                                      time_budget.schedule_refit(fitted), ckpt,
                                                      ts, state, mesh, eval_batches)
          end = _end(total_steps, start, max_steps)
          bar.total = end
          bar.refresh()
      evaluate = eval_fn is not None and (step == end or (eval_every > 0
                                                        and step % eval_every == 0))
      if step % log_every == 0 or step == end or evaluate:
        values = {k: float(v) for k, v in jax.device_get(metrics).items()}
        now = time.perf_counter()
        if step > last_step:
          step_s = (now - last_time) / (step - last_step)
          values.update(step_time_s=step_s, tokens_per_s=tokens_per_step / step_s,
                        tflops_per_device=flops_per_step / step_s / jax.device_count() / 1e12)
          util = flops.mfu(flops_per_step, step_s, jax.device_count(), peak)
          if util is not None:
            values["mfu"] = util
        values["first_step_s"] = compile_s
        last_time, last_step = now, step
        if evaluate:
          values.update(held_out_loss(eval_fn, state, eval_batches, mesh))
          last_time = time.perf_counter()  # keep evaluation out of the next step timings
        writer.write(step, values)
        history.append({"step": step, **values})
        bar.set_postfix(loss=f"{values['loss']:.3f}", lr=f"{values['lr']:.2e}",
                        tok_s=f"{values.get('tokens_per_s', 0):.0f}")
      bar.update(1)
      preempted = ckpt.reached_preemption(step)
      if preempted or step == end or (ckpt_every and step % ckpt_every == 0):
        ckpt.save(step, state, saved_iter, force=True)
      if preempted:
        log.warning("preempted at step %d: checkpoint saved, stopping", step)
        break
  bar.close()
  ckpt.close()
  writer.close()
  if history:
    log.info("peak FLOP/s per device: %s (%s)", peak, peak_source)
  return TrainResult(TrainState(ts.graphdef, state, ts.shardings), step, history, preempted,
                     total_steps, int(config.model.num_layers))

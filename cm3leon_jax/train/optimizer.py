"""AdamW with linear warmup, then cosine / linear / constant decay, and global-norm clipping.

REFERENCE.md section 4 (DECIDED): AdamW (0.9, 0.95), eps 1e-8, weight decay 0.1, clip 1.0,
linear warmup to `peak_lr` over `warmup_steps`, then decay to `end_lr_ratio * peak_lr` at
`train.steps`. Every parameter of the decoder is a matrix (no biases, no norm scales), so
weight decay applies to all of them.

A run whose length a time budget re-fitted midway (train/time_budget.py) keeps the schedule it
had up to that step and stretches (or squeezes) the rest of it over the new length: no jump in
the learning rate, the same end value at the new last step.
"""

from __future__ import annotations

import jax.numpy as jnp
import optax

from cm3leon_jax.errors import InputError


def schedule(opt_config, total_steps: int,
             refit: tuple[int, int] | None = None) -> optax.Schedule:
  """Learning rate as a function of the optimizer step (0-based).

  `refit` = (step, steps before): the run's length became `total_steps` at `step`; until then
  the schedule is that of a `steps before`-step run, after it that schedule's remainder maps
  linearly onto steps `step`..`total_steps`."""
  if refit is not None:
    at, before = int(refit[0]), int(refit[1])
    if not 0 < at < min(before, int(total_steps)):
      raise InputError(f"learning-rate schedule re-fitted at step {at} from {before} to "
                       f"{total_steps} steps: the step must lie inside both lengths")
    planned = schedule(opt_config, before)
    ratio = (before - at) / (int(total_steps) - at)
    # `where` evaluates both branches; the stretched one is only read from step `at` on.
    return lambda count: jnp.where(count < at, planned(count),
                                   planned(at + (count - at) * ratio))
  peak, warmup = float(opt_config.peak_lr), int(opt_config.warmup_steps)
  end = peak * float(opt_config.end_lr_ratio)
  if peak <= 0:
    raise InputError(f"--config.optimizer.peak_lr={peak}: must be > 0")
  if warmup < 0:
    raise InputError(f"--config.optimizer.warmup_steps={warmup}: must be >= 0")
  # Warmup starts above 0 (step 0 gets peak/warmup) so the first update is not wasted.
  warm = optax.linear_schedule(peak / max(warmup, 1), peak, max(warmup - 1, 1))
  decay_steps = max(int(total_steps) - warmup, 1)
  if opt_config.decay == "cosine":
    decay = optax.cosine_decay_schedule(peak, decay_steps, alpha=end / peak)
  elif opt_config.decay == "linear":
    decay = optax.linear_schedule(peak, end, decay_steps)
  elif opt_config.decay == "constant":
    decay = optax.constant_schedule(peak)
  else:
    raise InputError(f"--config.optimizer.decay={opt_config.decay!r}: expected cosine | linear "
                     "| constant")
  if warmup == 0:
    return decay
  return optax.join_schedules([warm, decay], [warmup])


def make_optimizer(opt_config, total_steps: int,
                   refit: tuple[int, int] | None = None) -> optax.GradientTransformation:
  """clip_by_global_norm(clip_norm) -> AdamW(schedule)."""
  if opt_config.clip_norm <= 0:
    raise InputError(f"--config.optimizer.clip_norm={opt_config.clip_norm}: must be > 0")
  return optax.chain(
      optax.clip_by_global_norm(float(opt_config.clip_norm)),
      optax.adamw(schedule(opt_config, total_steps, refit), b1=float(opt_config.b1),
                  b2=float(opt_config.b2), eps=float(opt_config.eps),
                  weight_decay=float(opt_config.weight_decay)),
  )


def refit_of(train_config) -> tuple[int, int] | None:
  """(step, steps before) where a time budget re-fitted the decoder run's length, or None."""
  at = int(train_config.get("time_budget_refit_step", 0))
  return (at, int(train_config.time_budget_refit_from)) if at > 0 else None

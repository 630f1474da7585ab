"""Fit a run's step count to a wall-clock budget (`train.time_budget_s`).

Why: the quickstart promises its whole recipe within 15 minutes on a 2-core CPU, but 2-core
machines differ by 2x and more in what a decoder step costs (0.072 s on the 2-core AMD EPYC the
preset was tuned on, 0.15-0.19 s on a 2-core KVM Xeon; experiments/bench/train_step.py). A fixed
step count either overruns the budget on a slow machine or wastes it on a fast one.

How: the trainer times `CALIBRATION_STEPS` steps after compilation, then fixes the run's length
to the most steps that fit what is left of the budget, never more than `train.steps`. Time is
kept back for `train.time_budget_reserve_steps` step-times after training (what follows it:
the quickstart's evaluation costs ~750 decoder steps on either machine) and for one more
compilation when the length changes (the learning-rate schedule is part of the compiled step).
The decided length is written to `<run dir>/time_budget.json` before training goes on, so a
resumed run keeps the same schedule instead of calibrating again.

Re-fit: the 50 timed steps are a noisy estimate (a machine's step time drifts by +-15% over a
run), so the first fit keeps a wide margin (`MARGIN`). Halfway from the fit to the fitted end
(`REFIT_AT`) the trainer fits the length once more from the mean step time since the fit (held-
out evaluations and checkpoints included) with a narrow margin (`REFIT_MARGIN`): a machine
faster than its calibration gets the seconds the wide margin kept back, a slower one stops
before overrunning. The learning-rate schedule keeps its first half and stretches its rest over
the new length (train/optimizer.py); the record then also holds `refit` (the step, the length
before, the step time measured) and resumed runs rebuild that schedule. Only the call that
calibrated re-fits: a resumed call has no timings of its own for the steps before it.

Depth (`train.time_budget_min_steps`, `train.time_budget_fallback_layers`): a budget may hold
too few steps for the configured depth to learn what it must (the quickstart's 6-layer decoder
needs thousands of steps for shapes; a 4-layer one, ~1.3x faster per step, did better in the
same short budget, configs/quickstart.py). When fewer than `min_steps` fit, the trainer drops
the calibrated model and starts afresh with `fallback_layers` layers, calibrating once more;
the time the first calibration took is already spent, so the second fit counts it. The record
then holds `num_layers` and `configured_num_layers`, and the checkpoints' config
`train.time_budget_depth_from`, which is how later commands find the depth (checkpoint.py).

Only the decay of the schedule depends on the length; the first `CALIBRATION_STEPS` + 1 steps
run under the schedule of `train.steps`. Warm-up is the same in both, so where it is at least
that long (the quickstart's: 50 steps) the fitted run's learning rates are exactly those of a
run of that length from the start; a shorter warm-up leaves a few steps of barely begun decay.
"""

from __future__ import annotations

import json
import math
import os

from cm3leon_jax.errors import InputError

FILE = "time_budget.json"
CALIBRATION_STEPS = 50
# The 50 timed steps predict the run's steps optimistically: on a 2-core KVM Xeon the quickstart
# decoder timed 0.147 s and then averaged 0.159 s (6 layers), timed 0.107 s and averaged
# 0.121 s (4 layers; 100-step means 0.098-0.136 s: other load, held-out evaluations,
# checkpoints). With 1.05 that run overran its budget by 25 s.
MARGIN = 1.15
# The re-fit's mean covers half the run (~1,400 quickstart steps on the Xeon, evaluations and
# checkpoints included); what varies after it is the other half's drift. 5% on the remaining
# half of the Xeon's decoder (~170 s) is ~9 s, also the cost of one more evaluation and checkpoint.
REFIT_AT = 0.5
REFIT_MARGIN = 1.05
REFIT_MIN_STEPS = 4 * CALIBRATION_STEPS  # after the fit; fewer: the first estimate stands


def check(config) -> float:
  """`train.time_budget_s` (0: off) after checking it and its reserve."""
  budget = float(config.train.get("time_budget_s", 0.0))
  reserve = int(config.train.get("time_budget_reserve_steps", 0))
  if budget < 0 or not math.isfinite(budget):
    raise InputError(f"--config.train.time_budget_s={budget}: expected seconds >= 0 (0: off)")
  if reserve < 0:
    raise InputError(f"--config.train.time_budget_reserve_steps={reserve}: must be >= 0")
  min_steps = int(config.train.get("time_budget_min_steps", 0))
  layers = int(config.train.get("time_budget_fallback_layers", 0))
  if min_steps < 0:
    raise InputError(f"--config.train.time_budget_min_steps={min_steps}: must be >= 0 (0: off)")
  if layers < 0:
    raise InputError(f"--config.train.time_budget_fallback_layers={layers}: must be >= 0 "
                     "(0: off)")
  return budget


def fallback_layers(config, fitted_steps: int) -> int | None:
  """The depth to start afresh with when only `fitted_steps` of the configured depth fit the
  budget: `train.time_budget_fallback_layers` when that is shallower and fewer than
  `train.time_budget_min_steps` fit; otherwise None (keep the configured depth)."""
  min_steps = int(config.train.get("time_budget_min_steps", 0))
  layers = int(config.train.get("time_budget_fallback_layers", 0))
  if min_steps <= 0 or not 0 < layers < int(config.model.num_layers):
    return None
  return layers if fitted_steps < min_steps else None


def depth_change(record: dict | None) -> tuple[int, int] | None:
  """(layers trained, layers configured) when the record's run trained a shallower decoder
  than configured (the fallback above); otherwise None."""
  if not record or "num_layers" not in record:
    return None
  trained, configured = int(record["num_layers"]), int(record["configured_num_layers"])
  return (trained, configured) if trained != configured else None


def cut_short(record: dict | None) -> bool:
  """Whether the record's run differs from its config: fewer steps, or fewer layers."""
  return bool(record) and (int(record["steps"]) < int(record["configured_steps"])
                           or depth_change(record) is not None)


def affordable_steps(step: int, elapsed_s: float, step_s: float, budget_s: float,
                     reserve_steps: int = 0, extra_s: float = 0.0,
                     margin: float = MARGIN) -> int:
  """The total steps a run can reach: `step` done after `elapsed_s`, each further step
  `step_s * margin`, and `reserve_steps * step_s + extra_s` kept back from `budget_s`.
  Never fewer than `step` (what is done is done)."""
  if step_s <= 0:
    raise ValueError(f"step_s={step_s}: must be > 0")
  left = budget_s - elapsed_s - reserve_steps * step_s - extra_s
  return step + max(math.floor(left / (step_s * margin)), 0)


def refit_step(record: dict) -> int | None:
  """The step at which a fit recorded in `record` is fitted again (REFIT_AT of the way from the
  fit to its end), or None when too few steps remain for a better estimate than the first."""
  at, steps = int(record["at_step"]), int(record["steps"])
  if steps - at < REFIT_MIN_STEPS:
    return None
  return at + int((steps - at) * REFIT_AT)


def schedule_refit(record: dict | None) -> tuple[int, int] | None:
  """(step, steps before) of the record's re-fit where it changed the length and steps remain
  after it (the learning-rate schedule's knot, train/optimizer.py); otherwise None."""
  refit = (record or {}).get("refit")
  if not refit:
    return None
  at, before, steps = int(refit["at_step"]), int(refit["steps_before"]), int(record["steps"])
  return (at, before) if steps != before and steps > at else None


def load(run_dir: str) -> dict | None:
  """The decision recorded by an earlier call of this run, or None."""
  path = os.path.join(run_dir, FILE)
  if not os.path.exists(path):
    return None
  try:
    with open(path) as f:
      record = json.load(f)
    steps = int(record["steps"])
  except (OSError, ValueError, KeyError, TypeError) as e:
    raise InputError(f"{path}: not a time-budget record ({e}); delete it to calibrate again "
                     "(the run's checkpoints stay)") from None
  if steps < 1:
    raise InputError(f"{path}: steps={steps}; delete it to calibrate again")
  return record


def save(run_dir: str, record: dict) -> None:
  os.makedirs(run_dir, exist_ok=True)
  path = os.path.join(run_dir, FILE)
  tmp = path + ".tmp"
  with open(tmp, "w") as f:
    json.dump(record, f, indent=1)
  os.replace(tmp, path)  # a crash leaves the old record or the new one, never half of one


def clear(run_dir: str) -> None:
  """Forget the recorded decision (the run starts afresh with another depth)."""
  try:
    os.remove(os.path.join(run_dir, FILE))
  except FileNotFoundError:
    pass

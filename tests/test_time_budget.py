"""`train.time_budget_s` (cm3leon_jax/train/time_budget.py): a run's length fitted to a
wall-clock budget, recorded, kept on resume; the quickstart's decoder budget; the report's note."""

import json
import os

import numpy as np
import pytest

from cm3leon_jax import cli, configs, quickstart
from cm3leon_jax.errors import InputError
from cm3leon_jax.eval import report
from cm3leon_jax.train import time_budget
from cm3leon_jax.train.optimizer import schedule

# warm-up over the 51 calibration steps: a fitted run's learning rates are exactly those of a
# run of its length (time_budget.py), so the two can be compared parameter for parameter.
TINY = ["--config.model.num_layers=1", "--config.model.seq_len=64",
        "--config.optimizer.warmup_steps=51", "--config.train.log_every=1",
        "--config.train.checkpoint_every=1000"]


def train(workdir, *extra):
  return cli.main(["train", "--config", "tiny", "--synthetic", f"--config.workdir={workdir}",
                   *TINY, "--no-progress", *extra])


def last_metrics(workdir):
  with open(os.path.join(workdir, "decoder", "metrics.jsonl")) as f:
    return [json.loads(line) for line in f][-1]


def final_params(workdir, steps):
  from flax import nnx
  import jax
  from cm3leon_jax.train.checkpoint import Checkpointer
  from cm3leon_jax.train.mesh import make_mesh
  from cm3leon_jax.train.state import abstract_train_state
  config = configs.load("tiny", [f"workdir={workdir}", f"train.steps={steps}"]
                        + [o[len("--config."):] for o in TINY])
  ckpt = Checkpointer(os.path.join(workdir, "decoder", "checkpoints"), config)
  state = ckpt.restore(abstract_train_state(config, make_mesh(config.mesh)))
  ckpt.close()
  return jax.tree.map(np.asarray, nnx.to_pure_dict(state[0]))


def test_affordable_steps_hand_computed():
  # 100 s budget, 10 s used, 100 reserve steps x 0.1 s = 10 s kept: 80 s / (0.1 s x 1.05) = 761.9
  assert time_budget.affordable_steps(50, 10.0, 0.1, 100.0, reserve_steps=100) == 50 + 761
  # a recompile of 5 s is kept back too: 75 / 0.105 = 714.3
  assert time_budget.affordable_steps(50, 10.0, 0.1, 100.0, 100, extra_s=5.0) == 50 + 714
  assert time_budget.affordable_steps(50, 10.0, 0.1, 100.0, margin=1.0) == 50 + 900


def test_affordable_steps_never_below_what_is_done():
  assert time_budget.affordable_steps(51, 30.0, 0.1, 20.0) == 51  # the budget is already spent


@pytest.mark.parametrize("field,value,match", [
    ("time_budget_s", -1.0, "time_budget_s=-1.0"),
    ("time_budget_s", float("nan"), "time_budget_s=nan"),
    ("time_budget_reserve_steps", -5, "time_budget_reserve_steps=-5")])
def test_bad_budget_fields_are_clear_errors(field, value, match):
  config = configs.load("tiny", [f"train.{field}={value}"])
  with pytest.raises(InputError, match=match):
    time_budget.check(config)


@pytest.mark.parametrize("text", ["{not json", '{"configured_steps": 7000}', '{"steps": 0}',
                                  '{"steps": "many"}'])
def test_a_bad_record_names_its_file(tmp_path, text):
  (tmp_path / time_budget.FILE).write_text(text)
  with pytest.raises(InputError, match=str(tmp_path / time_budget.FILE)):
    time_budget.load(str(tmp_path))


def test_record_round_trip(tmp_path):
  assert time_budget.load(str(tmp_path)) is None
  time_budget.save(str(tmp_path), {"steps": 12, "configured_steps": 20})
  assert time_budget.load(str(tmp_path)) == {"steps": 12, "configured_steps": 20}


def test_fitted_run_equals_a_run_of_that_length(tmp_path, monkeypatch):
  """Calibration ends at step 51; the fit (here forced to 10 more steps) shortens the run to
  61 and swaps the schedule: the parameters are those of a plain 61-step run, bit for bit."""
  monkeypatch.setattr(time_budget, "affordable_steps", lambda step, *a, **k: step + 10)
  assert train(tmp_path / "fitted", "--config.train.steps=1000",
               "--config.train.time_budget_s=3600") == 0
  record = time_budget.load(str(tmp_path / "fitted" / "decoder"))
  assert (record["steps"], record["configured_steps"], record["at_step"]) == (61, 1000, 51)
  assert train(tmp_path / "plain", "--config.train.steps=61") == 0
  fitted, plain = last_metrics(tmp_path / "fitted"), last_metrics(tmp_path / "plain")
  assert fitted["step"] == plain["step"] == 61
  # The last update's learning rate is the 61-step schedule's at optimizer step 60.
  opt = configs.load("tiny", [o[len("--config."):] for o in TINY]).optimizer
  assert fitted["lr"] == pytest.approx(float(schedule(opt, 61)(60)), rel=1e-6)
  assert float(schedule(opt, 1000)(60)) > 2 * fitted["lr"]
  import jax
  a, b = final_params(tmp_path / "fitted", 61), final_params(tmp_path / "plain", 61)
  assert jax.tree.structure(a) == jax.tree.structure(b)
  for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
    np.testing.assert_array_equal(x, y)


def test_spent_budget_stops_after_calibration_and_resume_keeps_the_length(tmp_path, capsys):
  # 1 s is gone before the first step compiles: the run ends at the calibration's step 51.
  assert train(tmp_path, "--config.train.steps=1000", "--config.train.time_budget_s=1") == 0
  assert "train: step 51/51 (time budget 1 s: 51 of train.steps=1000)" in capsys.readouterr().out
  record_path = tmp_path / "decoder" / time_budget.FILE
  before = record_path.read_text()
  # Resumed with a generous budget: the recorded length stands, nothing is calibrated again.
  assert train(tmp_path, "--config.train.steps=1000", "--config.train.time_budget_s=3600") == 0
  assert "train: step 51/51" in capsys.readouterr().out
  assert record_path.read_text() == before


def test_quickstart_gives_the_decoder_what_the_stages_before_it_left():
  config = configs.load("quickstart", [])
  state = {"done": {"data": 10.0, "VQ tokenizer": 200.0, "dual encoder": 260.0}}
  assert quickstart.decoder_budget_overrides(config, state) == [
      "--config.train.time_budget_s=400.0"]  # 870 - 470
  # an earlier, interrupted decoder's own seconds are not counted against it
  state["done"]["decoder"] = 500.0
  assert quickstart.decoder_budget_overrides(config, state) == [
      "--config.train.time_budget_s=400.0"]
  spent = {"done": {"VQ tokenizer": 1000.0}}
  assert quickstart.decoder_budget_overrides(config, spent) == [
      "--config.train.time_budget_s=1.0"]
  off = configs.load("quickstart", ["quickstart.budget_s=0"])
  assert quickstart.decoder_budget_overrides(off, state) == []


def test_report_says_when_the_decoder_was_cut_short():
  fitted = {"steps": 3210, "configured_steps": 7000, "budget_s": 420.0, "step_s": 0.12}
  lines = report._time_budget(fitted)
  assert lines[0].startswith("**The decoder trained 3,210 of its preset's 7,000 steps**: "
                             "0.120 s per step")
  assert "--config.quickstart.budget_s=0" in lines[0]
  assert report._time_budget(dict(fitted, steps=7000)) == []
  assert report._time_budget(None) == []

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
  # 100 s budget, 10 s used, 100 reserve steps x 0.1 s = 10 s kept: 80 s / (0.1 s x 1.15) = 695.7
  assert time_budget.affordable_steps(50, 10.0, 0.1, 100.0, reserve_steps=100) == 50 + 695
  # a recompile of 5 s is kept back too: 75 / 0.115 = 652.2
  assert time_budget.affordable_steps(50, 10.0, 0.1, 100.0, 100, extra_s=5.0) == 50 + 652
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
      "--config.train.time_budget_s=360.0"]  # 830 - 470
  # an earlier, interrupted decoder's own seconds are not counted against it, nor an earlier
  # run's evaluation (`cm3leon quickstart --redo decoder ...`)
  state["done"]["decoder"] = 500.0
  state["done"]["generate + evaluate"] = 80.0
  assert quickstart.decoder_budget_overrides(config, state) == [
      "--config.train.time_budget_s=360.0"]
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


# --- depth for a short budget (train.time_budget_min_steps / _fallback_layers) ---------------

@pytest.mark.parametrize("min_steps,layers,fitted,expected", [
    (3000, 4, 2999, 4),      # fewer than min_steps fit: the fallback depth
    (3000, 4, 3000, None),   # exactly min_steps fit: keep the configured 6 layers
    (3000, 6, 100, None),    # the fallback is not shallower than the configured depth
    (3000, 0, 100, None),    # off
    (0, 4, 100, None)])      # off
def test_fallback_layers_rule(min_steps, layers, fitted, expected):
  config = configs.load("tiny", ["model.num_layers=6", f"train.time_budget_min_steps={min_steps}",
                                 f"train.time_budget_fallback_layers={layers}"])
  assert time_budget.fallback_layers(config, fitted) == expected


@pytest.mark.parametrize("field", ["time_budget_min_steps", "time_budget_fallback_layers"])
def test_bad_depth_fields_are_clear_errors(field):
  config = configs.load("tiny", [f"train.{field}=-1"])
  with pytest.raises(InputError, match=f"--config.train.{field}=-1"):
    time_budget.check(config)


DEPTH = ["--config.model.num_layers=2", "--config.train.time_budget_fallback_layers=1",
         "--config.train.time_budget_min_steps=1000000", "--config.train.steps=1000",
         "--config.train.time_budget_s=3600"]


def saved_model_config(workdir):
  from cm3leon_jax.train.checkpoint import Checkpointer
  config = configs.load("tiny", [])
  ckpt = Checkpointer(os.path.join(workdir, "decoder", "checkpoints"), config, async_save=False)
  try:
    saved = ckpt.saved_config(ckpt.latest_step())
  finally:
    ckpt.close()
  return saved["model"]["num_layers"], saved["train"]["time_budget_depth_from"]


def test_too_few_steps_start_again_shallower(tmp_path, monkeypatch, capsys):
  """2 layers fit fewer than min_steps: the trainer starts afresh with 1 layer, calibrates it
  (step 51 of the new run) and trains what fits (forced to 10 more steps); the record and the
  checkpoint's config say which depth was trained instead of which."""
  monkeypatch.setattr(time_budget, "affordable_steps", lambda step, *a, **k: step + 10)
  assert train(tmp_path, *DEPTH) == 0
  assert ("train: step 61/61 (time budget 3600 s: 61 of train.steps=1000) with 1 layers, not "
          "model.num_layers=2" in capsys.readouterr().out)
  record = time_budget.load(str(tmp_path / "decoder"))
  assert (record["steps"], record["at_step"]) == (61, 51)
  assert (record["num_layers"], record["configured_num_layers"]) == (1, 2)
  assert saved_model_config(tmp_path) == (1, 2)
  with open(tmp_path / "decoder" / "metrics.jsonl") as f:
    records = [json.loads(line) for line in f]
  restart = [i for i, r in enumerate(records) if r.get("restarted_for_time_budget")]
  assert len(restart) == 1 and records[restart[0]]["num_layers"] == 1
  # the dropped 2-layer model's 51 logged steps, then the 1-layer run's 61 from step 1
  assert [r["step"] for r in records[restart[0] + 1:]] == list(range(1, 62))


def test_enough_steps_keep_the_configured_depth(tmp_path, monkeypatch):
  monkeypatch.setattr(time_budget, "affordable_steps", lambda step, *a, **k: step + 10)
  assert train(tmp_path, *DEPTH[:2], "--config.train.time_budget_min_steps=61",
               *DEPTH[3:]) == 0
  record = time_budget.load(str(tmp_path / "decoder"))
  assert record["steps"] == 61 and "num_layers" not in record
  assert saved_model_config(tmp_path) == (2, 0)


def test_later_commands_load_the_depth_the_budget_chose(tmp_path, monkeypatch, capsys):
  from cm3leon_jax.decode.api import restore_model
  monkeypatch.setattr(time_budget, "affordable_steps", lambda step, *a, **k: step + 10)
  assert train(tmp_path, *DEPTH) == 0
  # A resumed train with the same (2-layer) config finds the 1-layer checkpoint finished.
  assert train(tmp_path, *DEPTH) == 0
  assert "train: step 61/61" in capsys.readouterr().out
  # Loading for inference with the configured depth: the 1-layer decoder.
  base = [o[len("--config."):] for o in TINY] + [f"workdir={tmp_path}"]
  model = restore_model(configs.load("tiny", base + ["model.num_layers=2"]))
  assert model.cfg.num_layers == 1
  # A depth asked for by hand that is neither is the usual clear error.
  with pytest.raises(InputError, match="model.num_layers: checkpoint 1, config 3"):
    restore_model(configs.load("tiny", base + ["model.num_layers=3"]))


def test_fine_tuning_starts_from_the_depth_the_budget_chose(tmp_path, monkeypatch):
  from cm3leon_jax.train import trainer
  from cm3leon_jax.train.synthetic import synthetic_dataset
  monkeypatch.setattr(time_budget, "affordable_steps", lambda step, *a, **k: step + 10)
  assert train(tmp_path, *DEPTH) == 0
  config = configs.load("tiny", [o[len("--config."):] for o in TINY] + [
      f"workdir={tmp_path}", "model.num_layers=2", "train.steps=3"])
  result = trainer.train(config, iter(synthetic_dataset(config, config.train.batch_size)),
                         progress=False, run_dir=str(tmp_path / "ft"),
                         init_from=str(tmp_path / "decoder" / "checkpoints"))
  assert (result.step, result.num_layers) == (3, 1)


def test_report_says_when_the_decoder_is_shallower():
  fitted = {"steps": 2634, "configured_steps": 7000, "budget_s": 423.0, "step_s": 0.123,
            "num_layers": 4, "configured_num_layers": 6}
  line = report._time_budget(fitted)[0]
  assert line.startswith("**The decoder trained 2,634 of its preset's 7,000 steps, with 4 of "
                         "its preset's 6 layers**: 0.123 s per step")
  assert "fewer than `train.time_budget_min_steps` of the 6-layer decoder fit" in line


def test_quickstart_trains_4_layers_where_fewer_than_5600_of_its_6_fit():
  config = configs.load("quickstart", [])
  assert config.model.num_layers == 6
  assert time_budget.fallback_layers(config, 5599) == 4
  assert time_budget.fallback_layers(config, 5600) is None


# --- the re-fit halfway (time_budget.REFIT_AT) ------------------------------------------------

def test_schedule_after_a_refit_keeps_its_start_and_stretches_its_rest():
  opt = configs.load("quickstart", []).optimizer  # warm-up 50, cosine to 10% of 6e-3
  planned, refitted = schedule(opt, 1000), schedule(opt, 1500, (400, 1000))
  for step in (0, 49, 200, 399, 400):
    assert float(refitted(step)) == pytest.approx(float(planned(step)), rel=1e-6)
  # step 950 lies (950 - 400) / (1500 - 400) = half-way through the rest: planned step 700
  assert float(refitted(950)) == pytest.approx(float(planned(700)), rel=1e-6)
  assert float(refitted(1500)) == pytest.approx(6e-4, rel=1e-6)  # the end value, at the new end
  squeezed = schedule(opt, 700, (400, 1000))  # a shorter run: planned step 700 at step 550
  assert float(squeezed(550)) == pytest.approx(float(planned(700)), rel=1e-6)


@pytest.mark.parametrize("refit", [(0, 1000), (1000, 1000), (600, 1000)])
def test_a_refit_outside_the_run_is_a_clear_error(refit):
  with pytest.raises(InputError, match="re-fitted at step"):
    schedule(configs.load("quickstart", []).optimizer, 500, refit)


@pytest.mark.parametrize("at,steps,expected", [(51, 251, 151), (51, 250, None), (51, 7000, 3525)])
def test_refit_step_is_half_way_from_the_fit_to_its_end(at, steps, expected):
  # fewer than 4 x 50 steps after the fit: no re-fit (its mean would be no better)
  assert time_budget.refit_step({"at_step": at, "steps": steps}) == expected


def fake_fits(first, second):
  """affordable_steps forced to `first` more steps at the first fit, `second` at the re-fit."""
  return lambda step, *a, margin=time_budget.MARGIN, **k: step + (
      first if margin == time_budget.MARGIN else second)


def test_refit_lengthens_the_run_and_equals_a_run_planned_that_way(tmp_path, monkeypatch,
                                                                    capsys):
  """Fit at step 51 to 91 steps; re-fit at 71 (half-way) to 111: the record says so, and the
  parameters equal those of a plain run given that schedule, bit for bit; a resumed call keeps
  the length."""
  monkeypatch.setattr(time_budget, "REFIT_MIN_STEPS", 40)  # (200: too long a test)
  monkeypatch.setattr(time_budget, "affordable_steps", fake_fits(40, 40))
  assert train(tmp_path / "fitted", "--config.train.steps=1000",
               "--config.train.time_budget_s=3600") == 0
  record = time_budget.load(str(tmp_path / "fitted" / "decoder"))
  assert (record["steps"], record["at_step"], record["configured_steps"]) == (111, 51, 1000)
  assert (record["refit"]["at_step"], record["refit"]["steps_before"]) == (71, 91)
  opt = configs.load("tiny", [o[len("--config."):] for o in TINY]).optimizer
  fitted = last_metrics(tmp_path / "fitted")
  assert fitted["step"] == 111
  assert fitted["lr"] == pytest.approx(float(schedule(opt, 111, (71, 91))(110)), rel=1e-6)
  with open(tmp_path / "fitted" / "decoder" / "metrics.jsonl") as f:
    lr_81 = [r["lr"] for r in map(json.loads, f) if r["step"] == 81][0]
  # optimizer step 80 of the stretched rest: the first fit's step 71 + 9 x 20 / 40 = 75.5
  assert lr_81 == pytest.approx(float(schedule(opt, 91)(75.5)), rel=1e-6)
  assert float(schedule(opt, 91)(80)) < 0.9 * lr_81  # not the first fit's schedule
  assert train(tmp_path / "plain", "--config.train.steps=111",
               "--config.train.time_budget_refit_step=71",
               "--config.train.time_budget_refit_from=91") == 0
  import jax
  a, b = final_params(tmp_path / "fitted", 111), final_params(tmp_path / "plain", 111)
  for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
    np.testing.assert_array_equal(x, y)
  capsys.readouterr()
  assert train(tmp_path / "fitted", "--config.train.steps=1000",
               "--config.train.time_budget_s=3600") == 0
  assert "train: step 111/111" in capsys.readouterr().out
  assert time_budget.load(str(tmp_path / "fitted" / "decoder")) == record


def test_refit_shortens_a_run_that_would_overrun(tmp_path, monkeypatch):
  """The re-fit finds 5 more steps where 20 were planned: the run ends at 76 with the
  schedule's end value, instead of overrunning its budget."""
  monkeypatch.setattr(time_budget, "REFIT_MIN_STEPS", 40)
  monkeypatch.setattr(time_budget, "affordable_steps", fake_fits(40, 5))
  assert train(tmp_path, "--config.train.steps=1000", "--config.train.time_budget_s=3600") == 0
  record = time_budget.load(str(tmp_path / "decoder"))
  assert (record["steps"], record["refit"]["at_step"], record["refit"]["steps_before"]) == (
      76, 71, 91)
  opt = configs.load("tiny", [o[len("--config."):] for o in TINY]).optimizer
  last = last_metrics(tmp_path)
  assert last["step"] == 76
  end_lr = float(opt.peak_lr) * float(opt.end_lr_ratio)
  assert float(schedule(opt, 76, (71, 91))(76)) == pytest.approx(end_lr, rel=1e-6)
  assert last["lr"] == pytest.approx(float(schedule(opt, 76, (71, 91))(75)), rel=1e-6)


@pytest.mark.parametrize("steps,expected", [
    (111, (71, 91)),   # lengthened: the schedule's rest stretches from step 71
    (76, (71, 91)),    # shortened
    (91, None),        # unchanged: the first fit's schedule stands
    (71, None)])       # the budget was spent at the re-fit: nothing remains to schedule
def test_schedule_refit_from_a_record(steps, expected):
  record = {"steps": steps, "at_step": 51, "refit": {"at_step": 71, "steps_before": 91}}
  assert time_budget.schedule_refit(record) == expected
  assert time_budget.schedule_refit({"steps": 91, "at_step": 51}) is None

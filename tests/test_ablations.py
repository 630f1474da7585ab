"""experiments/ablations.py: the paper's claims as rows with their spread over seeds."""

import json
import math
import os

import pytest

from cm3leon_jax.errors import InputError
from experiments import ablation_report as R
from experiments import ablations as A


def test_spread_is_mean_sample_std_and_count():
  s = R.spread([0.25, 0.5])
  assert s.n == 2 and s.mean == pytest.approx(0.375)
  assert s.std == pytest.approx(math.sqrt(0.125 ** 2 + 0.125 ** 2))  # ddof = 1
  assert R.fmt(s) == "37.5% ± 17.7 (n=2)"
  one = R.spread([0.3])
  assert one.std is None and R.fmt(one) == "30.0% (n=1)"
  assert R.spread([1, 2, 3, 4]).std == pytest.approx(1.2909944)


def _sides(better, worse):
  return ({"all": R.spread(better), "attributes": R.spread([0.5])},
          {"all": R.spread(worse), "attributes": R.spread([0.5])})


def test_verdict_says_plainly_when_the_numbers_go_against_the_claim():
  assert R.verdict(*_sides([0.1, 0.2], [0.5, 0.6])).startswith("**against the paper's claim**")
  assert R.verdict(*_sides([0.8, 0.82], [0.2, 0.22])).startswith("agrees with the claim")
  assert "within the seed spread" in R.verdict(*_sides([0.3, 0.9], [0.2, 0.6]))
  tied = R.verdict({"all": R.spread([0.0]), "attributes": R.spread([0.6])},
                   {"all": R.spread([0.0]), "attributes": R.spread([0.4])})
  assert "mean attribute accuracy (all-attributes accuracy tied at 0.0%) +20.0 points" in tied


@pytest.mark.parametrize("flags, field", [
    (["--seeds", "0"], "--seeds"),
    (["--pool-sizes", ","], "--pool-sizes"),
    (["--pool-sizes", "0,2"], "--pool-sizes"),
    (["--cfg-weights", "x"], "--cfg-weights"),
    (["--methods", "beam"], "--methods"),
    (["--prompts", "0"], "--prompts"),
    (["--config.decoding.cfg_wieght=2"], "cfg_wieght"),
])
def test_bad_flags_are_one_input_error_naming_the_flag(flags, field):
  with pytest.raises(InputError, match=field):
    A.parse(["--config", "tiny", *flags])


def test_main_prints_one_error_line(capsys):
  assert A.main(["--config", "tiny", "--seeds", "0"]) == 2
  err = capsys.readouterr().err.strip().splitlines()
  assert len(err) == 1 and err[0].startswith("error: --seeds=0")


def _fake_upstream(root):
  """Empty stand-ins for every upstream artifact (the fake run below never opens them)."""
  for name in ("data", "vq", "tokens", "tokens-eval", "tokens-heldout", "retriever", "index",
               "neighbours", "neighbours-eval", "neighbours-heldout"):
    os.makedirs(os.path.join(root, name))
  open(os.path.join(root, "text_tokenizer.json"), "w").close()


class Calls:
  """Counts trainings and measurements; results are a function of the cell, so the report's
  numbers are known."""

  def __init__(self, monkeypatch):
    self.train, self.measure = [], []
    monkeypatch.setattr(A, "train_run", self._train)
    monkeypatch.setattr(A, "load_run", lambda config: (None, None))
    monkeypatch.setattr(A, "measure", self._measure)

  def _train(self, plan, root, variant, index):
    self.train.append((variant, index))
    os.makedirs(os.path.join(A.run_dir(plan, variant, index), "decoder", "checkpoints"))

  def _measure(self, cell, config, generator, embedder, records):
    self.measure.append(cell)
    acc = 0.1 * (1 + cell.train_index) + 0.01 * int(config.eval.seed)
    return {"all": acc, "attributes": acc + 0.3, "clip": 50.0, "chance": 0.0014,
            "accuracy": {"all": acc}, "mean_retrieved": float(config.decoding.num_retrieved),
            "erased": 0.0, "reconstruction": 0.9, "seconds": 0.0}


def test_report_has_every_row_and_plots_and_a_rerun_skips_finished_cells(tmp_path, monkeypatch):
  root, out = str(tmp_path / "qs"), str(tmp_path / "abl")
  _fake_upstream(root)
  calls = Calls(monkeypatch)
  argv = ["--config", "tiny", "--seeds", "2", "--from-workdir", root, "--workdir", out]
  assert A.main(argv) == 0
  assert sorted(set(calls.train)) == sorted(calls.train)  # each decoder trained once
  assert len(calls.train) == len(A.VARIANTS) * 2
  measured = len(calls.measure)
  # Equal settings of different rows are measured once (2 documents = weight 3 = mixed 2).
  assert measured < len(A.cells(A.parse(argv)))

  report = open(os.path.join(out, "report.md")).read()
  for line in [*(t for t in A.ITEMS.values()), R.RA, R.NO_RA, R.CM3, R.CAUSAL,
               *(R.docs_label(k) for k in (0, 1, 2)), *(R.cfg_label(w) for w in range(1, 8)),
               *(f"| {m} |" for m in A.METHODS), "pool of 16", "python -m experiments.ablations",
               "Machine:", "## Against the paper's claims"]:
    assert line in report, line
  # Hand-made values: the recipe's decoder of seed i scores 0.1 (i + 1); seeds 0 and 1.
  assert f"| {R.RA} | 15.0% ± 7.1 (n=2) |" in report
  for name in ("cfg_sweep.png", "pool_size.png"):
    with open(os.path.join(out, name), "rb") as f:
      assert f.read(8) == b"\x89PNG\r\n\x1a\n"

  calls.train.clear(), calls.measure.clear()
  assert A.main(argv) == 0  # everything recorded: nothing trains or measures again
  assert calls.train == [] and calls.measure == []

  state_path = os.path.join(out, A.STATE_FILE)
  with open(state_path) as f:
    state = json.load(f)
  dropped = next(iter(state["cells"]))
  del state["cells"][dropped]
  with open(state_path, "w") as f:
    json.dump(state, f)
  assert A.main(argv) == 0  # only the missing cell is measured again
  assert len(calls.measure) == 1 and calls.train == []


def test_state_of_another_plan_is_refused(tmp_path, monkeypatch):
  root, out = str(tmp_path / "qs"), str(tmp_path / "abl")
  _fake_upstream(root)
  Calls(monkeypatch)
  base = ["--config", "tiny", "--seeds", "1", "--from-workdir", root, "--workdir", out,
          "--pool-sizes", "1", "--cfg-weights", "3", "--docs", "2"]
  assert A.main(base) == 0
  with pytest.raises(InputError, match="another plan"):
    A.run(A.parse([*base, "--prompts", "3"]))


@pytest.mark.slow
def test_tiny_end_to_end_then_resume(tmp_path, capsys):
  out = str(tmp_path / "abl")
  argv = ["--config", "tiny", "--config.vq.steps=10", "--config.retrieval.steps=4",
          "--config.train.steps=4", "--seeds", "1", "--prompts", "1", "--workdir", out,
          "--docs", "0,2", "--cfg-weights", "1,3", "--pool-sizes", "1,2", "--methods",
          "temperature,mixed"]
  assert A.main(argv) == 0
  report = open(os.path.join(out, "report.md")).read()
  for line in (R.RA, R.NO_RA, R.CM3, R.CAUSAL, R.docs_label(0), R.cfg_label(1), "| mixed |"):
    assert line in report, line
  assert os.path.isfile(os.path.join(out, "pool_size.png"))
  state = json.load(open(os.path.join(out, A.STATE_FILE)))
  assert set(state["trained"]) == {f"{v}/seed0" for v in A.VARIANTS}
  assert all(0 <= c["all"] <= 1 for c in state["cells"].values())
  capsys.readouterr()
  assert A.main(argv) == 0
  out_text = capsys.readouterr().out
  assert "0 decoder trainings" in out_text and "0 cells" in out_text


def _finished_quickstart(root, steps: int, **changes) -> str:
  """A --from-workdir whose decoder's last checkpoint saved `changes` over the tiny config."""
  from cm3leon_jax import configs
  config = json.loads(configs.load("tiny", [f"workdir={root}"]).to_json_best_effort())
  for path, value in changes.items():
    section, field = path.split("__")
    config[section][field] = value
  meta = os.path.join(root, "decoder", "checkpoints", str(steps), "config", "metadata")
  os.makedirs(os.path.dirname(meta))
  with open(meta, "w") as f:
    json.dump(config, f)
  return str(root)


def test_the_quickstart_decoder_is_reused_only_when_it_is_the_recipes_first_seed(tmp_path):
  same = _finished_quickstart(tmp_path / "same", 20)
  plan = A.parse(["--config", "tiny", "--from-workdir", same, "--workdir", str(tmp_path / "w")])
  assert A.reusable_decoder(plan, "ra_cm3", 0) == os.path.join(same, "decoder")
  assert A.reusable_decoder(plan, "ra_cm3", 1) is None  # another training seed
  assert A.reusable_decoder(plan, "causal", 0) is None  # another variant
  other_lr = _finished_quickstart(tmp_path / "lr", 20, optimizer__peak_lr=1.0)
  plan = A.parse(["--config", "tiny", "--from-workdir", other_lr, "--workdir", str(tmp_path / "w")])
  assert A.reusable_decoder(plan, "ra_cm3", 0) is None
  short = _finished_quickstart(tmp_path / "short", 10)  # stopped before train.steps
  plan = A.parse(["--config", "tiny", "--from-workdir", short, "--workdir", str(tmp_path / "w")])
  assert A.reusable_decoder(plan, "ra_cm3", 0) is None
  # eval / decoding settings do not change what was trained
  plan = A.parse(["--config", "tiny", "--from-workdir", same, "--workdir", str(tmp_path / "w"),
                  "--prompts", "3", "--config.decoding.cfg_weight=5.0"])
  assert A.reusable_decoder(plan, "ra_cm3", 0) == os.path.join(same, "decoder")

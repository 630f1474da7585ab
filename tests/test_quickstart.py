"""The main job: every quickstart stage runs on the tiny preset, and a second run resumes."""

import json
import os

import pytest

from cm3leon_jax import cli
from cm3leon_jax.quickstart import STATE_FILE

# Few steps everywhere: this checks the wiring of the stages, not the quality of the models.
FAST = ["--config.vq.steps=10", "--config.retrieval.steps=4", "--config.train.steps=4"]


@pytest.mark.slow
def test_quickstart_runs_every_stage_then_resumes(tmp_path, capsys):
  workdir = str(tmp_path / "qs")
  argv = ["quickstart", "--config", "tiny", f"--config.workdir={workdir}", *FAST]
  assert cli.main(argv) == 0
  for name in ("report.md", "metrics.json", "samples.png", "infill.png", STATE_FILE):
    assert os.path.isfile(os.path.join(workdir, name)), name
  with open(os.path.join(workdir, STATE_FILE)) as f:
    done = json.load(f)["done"]
  assert len(done) == 13 and all(seconds >= 0 for seconds in done.values())
  with open(os.path.join(workdir, "metrics.json")) as f:
    assert json.load(f)  # the evaluation wrote its numbers
  capsys.readouterr()

  assert cli.main(argv) == 0  # everything recorded and on disk: every stage is skipped
  out = capsys.readouterr().out
  assert out.count("skipped") == 13
  # What to run next, with this run's preset and overrides (here: its workdir).
  assert f"next: cm3leon generate --config tiny --config.workdir={workdir} " in out
  assert f"cm3leon export --config tiny --config.workdir={workdir} " in out


def test_quickstart_reruns_a_stage_whose_output_vanished(tmp_path, capsys, monkeypatch):
  workdir = str(tmp_path / "qs")
  os.makedirs(workdir)
  # Pretend the text tokenizer stage finished, but its file is gone: it must run again.
  with open(os.path.join(workdir, STATE_FILE), "w") as f:
    json.dump({"done": {"data": 1.0, "text tokenizer": 1.0}}, f)
  argv = ["quickstart", "--config", "tiny", f"--config.workdir={workdir}", *FAST,
          "--config.data.num_train=64"]
  # Stop after the tokenizer: pretend the VQ command is not built.
  monkeypatch.setitem(cli.COMMANDS, "train-vq", ("train the VQ image tokenizer", "issue 4"))
  code = cli.main(argv)
  out = capsys.readouterr()
  assert "[1/13] data: cm3leon data build shapes" in out.out  # no dataset on disk: re-run
  assert "[2/13] text tokenizer: cm3leon train-text-tokenizer" in out.out
  assert os.path.isfile(os.path.join(workdir, "text_tokenizer.json"))
  assert code == cli.EXIT_NOT_BUILT and "VQ tokenizer" in out.err


def test_corrupt_state_file_is_a_clear_error(tmp_path, capsys):
  workdir = tmp_path / "qs"
  workdir.mkdir()
  (workdir / STATE_FILE).write_text("{not json")
  code = cli.main(["quickstart", "--config", "tiny", f"--config.workdir={workdir}"])
  assert code == cli.EXIT_INPUT_ERROR
  assert "corrupt quickstart state" in capsys.readouterr().err

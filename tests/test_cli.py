"""The `cm3leon` command line: help, not-yet-built commands, errors, the text tokenizer command."""

import json
import subprocess
import sys

import pytest

from cm3leon_jax import cli
from cm3leon_jax.tokenizers.text import TextTokenizer

DATA_FLOW = ("data", "train-text-tokenizer", "train-vq", "encode", "train-retriever", "index",
             "retrieve", "train", "sft", "generate", "eval", "export", "quickstart")


def test_help_lists_every_command_of_the_data_flow():
  out = subprocess.run([sys.executable, "-m", "cm3leon_jax", "--help"], capture_output=True,
                       text=True, check=True).stdout
  for command in DATA_FLOW:
    assert f"    {command}" in out


def test_unbuilt_commands_say_so_and_exit_non_zero(capsys, monkeypatch):
  # Every command of the data flow is built now; a command whose issue has not landed (its
  # "where" names the issue, not a module) must still say so rather than fail obscurely.
  monkeypatch.setitem(cli.COMMANDS, "export", ("export an inference bundle", "the export issue"))
  assert cli.main(["export", "--config", "tiny"]) == cli.EXIT_NOT_BUILT
  assert "not built yet (the export issue)" in capsys.readouterr().err


def test_config_typo_is_one_error_line(capsys):
  code = cli.main(["train-text-tokenizer", "--config", "tiny", "--config.vocab.txt_size=3",
                   "--input", "x.txt"])
  err = capsys.readouterr().err
  assert code == cli.EXIT_INPUT_ERROR
  assert err.startswith("error: --config.vocab.txt_size") and err.count("\n") == 1


def test_train_text_tokenizer_from_text_and_jsonl(tmp_path, capsys):
  (tmp_path / "a.txt").write_text("a large red circle\na small blue square 12\n" * 20)
  (tmp_path / "b.jsonl").write_text(
      "\n".join(json.dumps({"text": "a green triangle above it"}) for _ in range(20)))
  out = tmp_path / "tok.json"
  code = cli.main(["train-text-tokenizer", "--config", "tiny", "--input", str(tmp_path / "a.txt"),
                   str(tmp_path / "b.jsonl"), "--output", str(out), "--config.vocab.text_size=300"])
  assert code == 0
  tokenizer = TextTokenizer.load(str(out))
  assert tokenizer.vocab_size <= 300
  assert tokenizer.decode(tokenizer.encode("green triangle")) == "green triangle"


@pytest.mark.parametrize("content, message", [
    (b'{"text": "ok"}\n{broken\n', "b.jsonl:2: malformed JSON"),
    (b'{"txt": "no text field"}\n', "b.jsonl:1: expected an object with a string 'text'"),
    (b'\xff\xfe bad utf8', "not UTF-8"),
])
def test_train_text_tokenizer_bad_input(tmp_path, capsys, content, message):
  path = tmp_path / "b.jsonl"
  path.write_bytes(content)
  code = cli.main(["train-text-tokenizer", "--config", "tiny", "--input", str(path),
                   "--output", str(tmp_path / "t.json")])
  assert code == cli.EXIT_INPUT_ERROR
  assert message in capsys.readouterr().err
  assert not (tmp_path / "t.json").exists()


def test_missing_input_file(tmp_path, capsys):
  code = cli.main(["train-text-tokenizer", "--config", "tiny", "--input", str(tmp_path / "no.txt")])
  assert code == cli.EXIT_INPUT_ERROR
  assert "no.txt: input file not found" in capsys.readouterr().err

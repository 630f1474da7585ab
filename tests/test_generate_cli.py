"""`cm3leon generate`: prompts from the command line and files, bad input as one error line, and
every task end to end on a tiny random stack."""

import json

import numpy as np
import pytest
from PIL import Image

from cm3leon_jax import cli, configs
from cm3leon_jax.data import shapes
from cm3leon_jax.decode import generate_cli
from cm3leon_jax.errors import InputError
from tests.eval_fixtures import tiny_generator


def _generate(tmp_path, *args):
  return cli.main(["generate", "--config", "tiny", f"--config.workdir={tmp_path / 'work'}", *args])


def _one_error_line(capsys, message):
  err = capsys.readouterr().err
  assert err.startswith("error: ") and err.count("\n") == 1, err
  assert message in err


def test_missing_checkpoint_is_one_error_line(tmp_path, capsys):
  assert _generate(tmp_path, "--prompt", "a red circle") == cli.EXIT_INPUT_ERROR
  _one_error_line(capsys, "no decoder checkpoints; run `cm3leon train` first")


@pytest.mark.parametrize("name, content, message", [
    ("empty.txt", "", "empty.txt: no prompts (the file is empty)"),
    ("blank.txt", "\n  \n", "blank.txt: no prompts (the file is empty)"),
    ("p.jsonl", '{"text": "a red circle"}\n{"text": \n', "p.jsonl:2: malformed JSON"),
    ("p.jsonl", '{"caption": "a red circle"}\n', "p.jsonl:1: text-to-image needs a non-empty"),
    ("p.jsonl", '["a red circle"]\n', "p.jsonl:1: expected a JSON object"),
])
def test_bad_prompts_file_is_one_error_line(tmp_path, capsys, name, content, message):
  path = tmp_path / name
  path.write_text(content)
  assert _generate(tmp_path, "--prompts-file", str(path)) == cli.EXIT_INPUT_ERROR
  _one_error_line(capsys, message)


@pytest.mark.parametrize("args, message", [
    ((), "no prompts: give --prompt"),
    (("--prompt", "  "), "--prompt 1: empty prompt"),
    (("--prompts-file", "nowhere.txt"), "nowhere.txt: prompts file not found"),
    (("--task", "caption", "--prompt", "missing.png"), "missing.png: missing_file"),
    (("--task", "infill", "--prompt", "x.png", "--rows", "3:1"), "--rows: rows 3:1"),
    (("--num-candidates", "0", "--prompt", "a red circle"), "--num-candidates=0"),
])
def test_bad_arguments_are_one_error_line(tmp_path, capsys, args, message):
  assert _generate(tmp_path, *args) == cli.EXIT_INPUT_ERROR
  _one_error_line(capsys, message)


def test_prompts_from_lines_and_jsonl(tmp_path):
  (tmp_path / "p.txt").write_text("a.png\ta red circle\n\nb.png\n")
  assert generate_cli.load_prompts("infill", [], str(tmp_path / "p.txt")) == [
      {"image": str(tmp_path / "a.png"), "text": "a red circle"},
      {"image": str(tmp_path / "b.png"), "text": None}]
  (tmp_path / "p.jsonl").write_text(json.dumps({"image": "a.png", "rows": [1, 2]}) + "\n")
  assert generate_cli.load_prompts("infill", [], str(tmp_path / "p.jsonl")) == [
      {"image": str(tmp_path / "a.png"), "text": None, "rows": [1, 2]}]
  assert generate_cli.load_prompts("text-to-image", ["a red circle "], None) == [
      {"text": "a red circle"}]


def test_rows_default_to_the_middle_third_and_are_checked():
  assert generate_cli.parse_rows(None, 8, "x") == (2, 6)
  assert generate_cli.parse_rows("0:4", 8, "x") == (0, 4)
  assert generate_cli.parse_rows([1, 3], 4, "x") == (1, 3)
  with pytest.raises(InputError, match="x: rows 0:9"):
    generate_cli.parse_rows("0:9", 8, "x")


def test_every_task_writes_a_grid_the_images_and_a_jsonl(tmp_path):
  config = configs.load("tiny")
  generator, _ = tiny_generator(config, str(tmp_path / "bank"))
  paths = []
  for i in range(2):
    scene = shapes.scene_at(0, i, "eval")
    paths.append(str(tmp_path / f"in{i}.png"))
    Image.fromarray(shapes.render(scene, 16)).save(paths[-1])
  prompts = {
      "text-to-image": [{"text": "a large red circle at the top left"}, {"text": "a blue square"}],
      "caption": [{"image": p, "text": None} for p in paths],
      "infill": [{"image": paths[0], "text": "a red circle"},
                 {"image": paths[1], "text": None, "rows": [0, 2]}],
  }
  for task, task_prompts in prompts.items():
    out = tmp_path / task
    records = generate_cli.generate(task, generator, task_prompts, str(out))
    lines = [json.loads(x) for x in (out / "outputs.jsonl").read_text().splitlines()]
    assert lines == records and [r["index"] for r in lines] == [0, 1]
    assert Image.open(out / "grid.png").size[0] > 128
    if task == "caption":
      assert all(isinstance(r["caption"], str) for r in lines)
    else:
      images = [np.asarray(Image.open(out / r["output"])) for r in lines]
      assert all(im.shape == (16, 16, 3) for im in images)
  assert [r["rows"] for r in records] == [[1, 3], [0, 2]]  # default band, then the prompt's own


def test_infill_pool_needs_a_caption_for_every_prompt(tmp_path):
  config = configs.load("tiny")
  generator, _ = tiny_generator(config, str(tmp_path / "bank"))
  path = str(tmp_path / "in.png")
  Image.fromarray(shapes.render(shapes.scene_at(0, 0, "eval"), 16)).save(path)
  prompts = [{"image": path, "text": "a red circle"}, {"image": path, "text": None}]
  with pytest.raises(InputError, match="infill prompt 2 has no caption"):
    generate_cli.generate("infill", generator, prompts, str(tmp_path / "out"), num_candidates=2)
  # Captioned prompts: a re-ranked pool of 2 per image.
  records = generate_cli.generate("infill", generator, prompts[:1], str(tmp_path / "out"),
                                  num_candidates=2)
  assert len(records) == 1

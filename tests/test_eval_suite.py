"""Evaluation suites: features, CLIP score, the infilling band, and the quickstart suite end to
end on a tiny random stack (every real component, nothing trained)."""

import json
import os

import numpy as np
import pytest
from PIL import Image

from cm3leon_jax import cli, configs
from cm3leon_jax.errors import InputError
from cm3leon_jax.eval import features, report, suite
from cm3leon_jax.eval.clip_score import clip_score
from cm3leon_jax.eval.fid import fid
from tests.eval_fixtures import shapes_records, tiny_generator

OVERRIDES = ["eval.num_prompts=4", "eval.num_candidates=2", "eval.num_captions=4",
             "eval.num_infill=4", "eval.num_fid_real=8", "eval.num_binding=3"]


@pytest.mark.parametrize("row, rows", [(0, (0, 3)), (1, (2, 6)), (2, (5, 8))])
def test_band_covers_the_grid_row_at_32_px_with_an_8x8_code_grid(row, rows):
  # Row 1 spans pixels 10.7..21.3; codes are 4 px tall: code rows 2..5.
  assert suite.band_rows(row, 32, 8) == rows


def test_band_of_a_bad_row_is_an_error():
  with pytest.raises(InputError, match="infill_row=3"):
    suite.band_rows(3, 32, 8)


def test_pixel_features_are_block_means():
  image = np.zeros((1, 16, 16, 3), np.uint8)
  image[0, :, 8:] = 255  # right half white
  f = features.pixel_features(image).reshape(8, 8, 3)
  assert (f[:, :4] == 0).all() and (f[:, 4:] == 1).all()


def test_pixel_fid_of_a_set_with_itself_is_zero():
  images = np.random.default_rng(0).integers(0, 256, (50, 16, 16, 3), np.uint8)
  x = features.pixel_features(images)
  assert fid(x, x) == pytest.approx(0.0, abs=1e-6)


def test_feature_extractor_choices():
  config = configs.load("tiny", ["eval.fid_features=inception"])
  with pytest.raises(InputError, match="eval.inception_weights"):  # unset: no weights file
    features.feature_extractor(config)
  with pytest.raises(InputError, match="needs the trained dual encoder"):
    features.feature_extractor(configs.load("tiny"), embedder=None)


class _FixedScores:
  def __init__(self, scores):
    self.scores = np.asarray(scores)

  def score(self, images, texts):
    return self.scores


def test_clip_score_is_100_times_the_mean_clipped_cosine():
  # max(0.5, 0) and max(-0.2, 0): (50 + 0) / 2.
  assert clip_score(_FixedScores([0.5, -0.2]), np.zeros((2, 16, 16, 3), np.uint8),
                    ["a", "b"]) == pytest.approx(25.0)


def test_pool_oracle_counts_prompts_with_any_exactly_right_candidate():
  # 3 prompts x 2 candidates: (0, 1) has one, (0.5, 0) none (0.5 is not exactly right), (1, 1).
  assert suite.pool_oracle([0, 1, 0.5, 0, 1, 1], 2) == pytest.approx(2 / 3)


def test_unknown_suite_is_an_error():
  with pytest.raises(InputError, match="unknown suite"):
    suite.run_suite("nope", configs.load("tiny"), generator=None)


def test_quickstart_suite_end_to_end_on_a_tiny_random_stack(tmp_path):
  config = configs.load("tiny", OVERRIDES)
  generator, embedder = tiny_generator(config, str(tmp_path / "bank"))
  records = {s: shapes_records(s, 64, config.vq.image_size) for s in ("heldout", "eval")}
  metrics, figures = suite.run_suite("quickstart", config, generator, embedder,
                                     records=records.__getitem__, log=lambda _: None)
  t2i = metrics["text_to_image"]
  assert t2i["num_prompts"] == 4 and t2i["num_candidates"] == 2 and t2i["reranked"]
  # Two documents are asked for; the tiny 128-token window may only fit one with the prompt.
  assert t2i["num_retrieved"] == 2 and 1 <= t2i["mean_retrieved"] <= 2
  heldout = [r for r in records["heldout"] if len(r["scene"].objects) == 1]
  assert t2i["prompts"] == [r["text"] for r in heldout[:4]]
  assert t2i["chance"]["all"] == pytest.approx(1 / 720)
  # The seen-pairs row: as many single-object prompts from the eval split.
  assert t2i["seen_pairs"]["split"] == "eval" and t2i["seen_pairs"]["num_prompts"] == 4
  assert set(t2i["seen_pairs"]["accuracy"]) == set(t2i["accuracy"])
  # The ceilings: the chosen image is one of the candidates, so a pool with none right
  # cannot give a right choice; the VQ reconstruction row is scored like the samples.
  for row in (t2i, t2i["seen_pairs"]):
    assert row["accuracy"]["all"] <= row["pool_oracle"] <= 1.0
    assert set(row["vq_reconstruction"]) == set(row["accuracy"])
  for scores in (t2i["accuracy"], metrics["captioning"]["recall"],
                 metrics["infilling"]["accuracy"]):
    assert set(scores) == {"colour", "shape", "size", "position", "count", "all"}
    assert all(0.0 <= v <= 1.0 for v in scores.values())
  assert metrics["captioning"]["reference_recall"]["all"] == 1.0
  assert metrics["infilling"]["code_rows"] == [1, 3]  # 16 px, 4x4 codes, middle row
  assert metrics["infilling"]["num_candidates"] == 2  # re-ranked like text-to-image
  # 4 prompts, 8 real reference images, 4 more for the floor of the 8 candidates: 16 needed.
  assert len(heldout) >= 16 and t2i["fid"]["num_real"] == 8
  assert t2i["fid"]["best"]["fid"] >= 0 and t2i["fid"]["best"]["floor"] >= 0
  assert t2i["fid"]["candidates"]["num_images"] == 8 and t2i["fid"]["candidates"]["floor"] >= 0
  b = metrics["binding"]
  assert b["num_scenes"] == 3 and set(b["by_retrieved"]) == {"0", "2"}
  for probe in b["by_retrieved"].values():
    assert set(probe) == {"colour", "shape", "size"}
    assert probe["shape"]["chance"] == pytest.approx(1 / 5)
    assert probe["shape"]["num_scenes"] == 3  # every Shapes caption names its shape once
    assert 0.0 <= probe["shape"]["accuracy"] <= 1.0
  assert set(metrics["seconds"]) == {"text_to_image", "binding", "captioning", "infilling"}

  report.write(str(tmp_path / "out"), metrics, figures)
  out = tmp_path / "out"
  assert json.loads((out / "metrics.json").read_text())["suite"] == "quickstart"
  assert "## Text-to-image" in (out / "report.md").read_text()
  assert "## Attribute binding" in (out / "report.md").read_text()
  # 4 samples of 16 px upscaled x8 in one row, each under a prompt strip.
  width, height = Image.open(out / "samples.png").size
  assert width == 4 + 4 * (128 + 4) and height > 128 + 8
  assert Image.open(out / "infill.png").size[0] == 4 + 6 * (128 + 4)


def test_eval_command_without_a_checkpoint_is_one_error_line(tmp_path, capsys):
  code = cli.main(["eval", "--config", "tiny", f"--config.workdir={tmp_path}"])
  err = capsys.readouterr().err
  assert code == cli.EXIT_INPUT_ERROR
  assert err.startswith("error: ") and err.count("\n") == 1
  assert "no decoder checkpoints" in err


def test_eval_command_with_an_unknown_suite_is_one_error_line(tmp_path, capsys):
  code = cli.main(["eval", "--config", "tiny", f"--config.workdir={tmp_path}", "--suite", "x"])
  assert code == cli.EXIT_INPUT_ERROR
  assert "unknown suite" in capsys.readouterr().err


class _ScriptedAnswerer:
  """Answers Shapes questions about a red circle at the top left: right on colour, count and
  position, always 'square' on shape."""

  def __init__(self):
    self.questions = []

  def answer(self, images, questions):
    self.questions += list(questions)
    out = []
    for q in questions:
      if q.startswith("What colour"):
        out.append("red")
      elif q.startswith("What shape"):
        out.append("square")
      elif q.startswith("Where"):
        out.append("top left")
      elif q == "How many objects are there?":
        out.append("one")  # normalised to "1" like the reference
      else:  # "How many <colour> objects are there?"
        out.append("1" if " red " in q else "0")
    return out


def test_vqa_stage_scores_each_question_kind_beside_the_language_prior():
  from cm3leon_jax.data import shapes
  scene = shapes.Scene((shapes.Obj("circle", "red", "small", 0, 0),))
  records = [{"image": shapes.render(scene, 16), "text": "a small red circle", "scene": scene}] * 8
  answerer = _ScriptedAnswerer()
  metrics, _ = suite.run_suite("vqa", configs.load("tiny", ["eval.num_vqa=8"]), answerer,
                               records=lambda split: records, log=lambda _: None)
  m = metrics["vqa"]
  assert m["num_questions"] == 8 and len(answerer.questions) == 8
  # Two questions per kind, in turn: colour, shape, count, position.
  assert answerer.questions[0].startswith("What colour")
  assert answerer.questions[1].startswith("What shape")
  assert m["by_kind"] == {"colour": 1.0, "shape": 0.0, "count": 1.0, "position": 1.0}
  assert m["accuracy"] == pytest.approx(0.75)
  # Every scene is the same: the most frequent answer is right for colour, shape, position.
  assert m["prior_by_kind"]["colour"] == m["prior_by_kind"]["shape"] == 1.0
  assert m["prior_by_kind"]["position"] == 1.0
  text = report.markdown(metrics)
  assert "## Visual question answering" in text and "VQA accuracy 75.0%" in text


def test_vqa_stage_with_no_questions_asked_for_is_an_error():
  with pytest.raises(InputError, match="num_vqa=0"):
    suite.run_suite("vqa", configs.load("tiny", ["eval.num_vqa=0"]), _ScriptedAnswerer(),
                    records=lambda split: [], log=lambda _: None)


def test_generator_answers_questions_with_text_on_a_tiny_random_stack(tmp_path):
  config = configs.load("tiny")
  generator, _ = tiny_generator(config, str(tmp_path / "bank"))
  images = np.stack([r["image"] for r in shapes_records("eval", 2, config.vq.image_size)])
  answers = generator.answer(images, ["What colour is the object at the top left?",
                                      "How many objects are there?"])
  assert len(answers) == 2 and all(isinstance(a, str) and "." not in a for a in answers)
  with pytest.raises(InputError, match="2 images but 1 questions"):
    generator.answer(images, ["What shape?"])
  with pytest.raises(InputError, match="empty question"):
    generator.answer(images, ["", " "])


def test_caption_instruction_follows_the_image_in_the_prompt(tmp_path):
  config = configs.load("tiny")
  generator, _ = tiny_generator(config, str(tmp_path / "bank"))
  images = np.stack([r["image"] for r in shapes_records("eval", 2, config.vq.image_size)])
  seen = []
  generator._decode_text = lambda prompts_, t, seed: seen.extend(prompts_) or [" a cat "] * 2
  assert generator.caption(images, instruction="Describe the given picture.") == ["a cat"] * 2
  codes = generator.image_tokenizer.encode(images)
  words = generator.text_tokenizer.encode("Describe the given picture.")
  vocab = generator.vocab
  # <eos> <break> I <break> Describe the given picture.   (the SFT record without its caption)
  want = np.concatenate([[vocab.eos_id, vocab.break_id], vocab.image_to_ids(codes[0]),
                         [vocab.break_id], vocab.text_to_ids(words)])
  np.testing.assert_array_equal(seen[0], want)
  with pytest.raises(InputError, match="an instruction needs the causal prompt"):
    generator.caption(images, instruction="Describe.", infill=True)


def test_captioning_suite_uses_the_configured_instruction(tmp_path):
  config = configs.load("tiny", ["eval.caption_instruction=Describe the given picture."])
  generator, embedder = tiny_generator(config, str(tmp_path / "bank"))
  used = []
  generator.caption = lambda images, instruction=None: used.append(instruction) or [
      "a small red circle"] * len(images)
  records = {"eval": shapes_records("eval", 4, config.vq.image_size)}
  m, _ = suite.captioning(config, generator, embedder, lambda split: records[split])
  assert used == ["Describe the given picture."] and m["instruction"] == used[0]

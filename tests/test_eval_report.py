"""Evaluation outputs: PNG grids with the prompt above each image, report.md, metrics.json."""

import json
import os

import numpy as np
import pytest

from cm3leon_jax.errors import InputError
from cm3leon_jax.eval import grids, report


def _images(n, size=32):
  return np.stack([np.full((size, size, 3), 40 * (i + 1), np.uint8) for i in range(n)])


def test_wrap_fits_the_width_and_cuts_after_max_lines():
  lines = grids.wrap("a large red circle at the top left and a small blue square below it",
                     width_px=128, max_lines=2)
  assert len(lines) == 2
  assert all(len(line) <= (128 - 2 * grids.MARGIN) // grids.CHAR_WIDTH for line in lines)
  assert lines[-1].endswith("...")


def test_wrap_replaces_characters_the_bitmap_font_cannot_draw():
  assert grids.wrap("red \u2192 \ufffd\x00 ok", 128, 1) == ["red ? ?? ok"]


def test_captioned_grid_has_the_size_of_its_tiles_and_strips():
  # 3 images of 32 px, upscaled x4 to 128 px, 2 columns -> 2 rows; one-line texts: strip of
  # 11 + 2*2 = 15 px above each image.
  grid = grids.captioned_grid(_images(3), ["red", "green", "blue"], columns=2, target=128)
  tile_h = 15 + 128
  assert grid.shape == (4 + 2 * (tile_h + 4), 4 + 2 * (128 + 4), 3)
  assert grid.dtype == np.uint8


def test_each_image_is_upscaled_under_a_strip_with_its_text():
  images = _images(2)
  grid = grids.captioned_grid(images, ["a red circle", ""], columns=2, target=128)
  strip_h = 15
  for col, image in enumerate(images):
    x = 4 + col * (128 + 4)
    np.testing.assert_array_equal(grid[4 + strip_h:4 + strip_h + 128, x:x + 128],
                                  grids.upscale(image[None], 4)[0])
  strips = [grid[4:4 + strip_h, 4 + c * 132:4 + c * 132 + 128] for c in range(2)]
  assert (strips[0] < 128).any()      # black text where there is a prompt
  assert (strips[1] == 255).all()     # a blank strip for an empty one


def test_the_strip_grows_with_the_longest_prompt():
  long = "a large red circle at the top left and a small blue square below it"
  grid = grids.captioned_grid(_images(2), ["red", long], columns=2, target=128, max_lines=4)
  lines = len(grids.wrap(long, 128, 4))
  assert lines == 4
  assert grid.shape[0] == 4 + (lines * 11 + 4) + 128 + 4


def test_infill_grid_puts_two_triptychs_per_row():
  grid = grids.infill_grid(_images(3), _images(3), _images(3))
  # 9 tiles in rows of 6 -> 2 rows; each tile 15 px of label + 128 px of image.
  assert grid.shape == (4 + 2 * (15 + 128 + 4), 4 + 6 * (128 + 4), 3)


def test_grid_of_mismatched_images_and_texts_is_an_error():
  with pytest.raises(InputError, match="2 images but 1 texts"):
    grids.captioned_grid(_images(2), ["one"])


def _metrics():
  acc = {"all": 0.75, "colour": 1.0, "shape": 0.75, "size": 1.0, "position": 1.0, "count": 1.0}
  chance = {"all": 1 / 720, "colour": 0.125, "shape": 0.2, "size": 0.5, "position": 1 / 9}
  fid_row = {"num_images": 4, "fid": 1.5, "floor": 0.25}
  return {
      "suite": "quickstart", "preset": "tiny", "seconds": {"text_to_image": 2.0},
      "text_to_image": {
          "num_prompts": 4, "num_candidates": 2, "pool": "mixed", "cfg_weight": 3.0,
          "num_retrieved": 2, "reranked": True, "accuracy": acc, "accuracy_candidates": acc,
          "chance": chance, "prompts": ["a red circle"] * 4,
          "fid": {"features": "encoder", "num_real": 8, "best": fid_row, "candidates": fid_row}},
  }


def test_markdown_tables_show_accuracy_beside_chance_and_the_wall_times():
  md = report.markdown(_metrics(), {"data": 10.0, "decoder": 30.0,
                                    report.QUICKSTART_EVAL_STAGE: 99.0})
  assert "| **all** | 75.0% | 75.0% | 0.1% |" in md
  assert "seen pairs" not in md  # no such row in these metrics
  assert "| colour | 100.0% | 100.0% | 12.5% |" in md
  assert "| best of pool | 4 | 1.50 | 0.25 |" in md
  assert "| quickstart: data | 10.0 |" in md
  assert report.QUICKSTART_EVAL_STAGE not in md  # replaced by the eval's own stages
  assert "| **total** | **42.0** |" in md
  assert "(chance 0.1%; 95% interval 30.1-95.4% over 4 prompts)" in md  # Wilson, 3 of 4


def _with_seen_pairs():
  metrics = _metrics()
  seen = {"all": 0.5, "colour": 1.0, "shape": 0.5, "size": 1.0, "position": 0.75, "count": 1.0}
  metrics["text_to_image"]["seen_pairs"] = {"split": "eval", "num_prompts": 4, "accuracy": seen,
                                            "accuracy_candidates": seen}
  return metrics


def test_seen_pairs_columns_sit_between_the_heldout_ones_and_chance():
  md = report.markdown(_with_seen_pairs())
  assert "| **all** | 75.0% | 75.0% | 50.0% | 50.0% | 0.1% |" in md
  assert "a right candidate in the pool" not in md  # metrics without the ceilings
  assert "75.0% on unseen colour-shape pairs, 50.0% on unseen scenes of seen pairs" in md


def test_headline_gives_each_accuracy_its_95_percent_interval_and_prompt_count():
  md = report.markdown(_with_seen_pairs())
  # Wilson, z = 1.96: 3 of 4 -> [0.3006, 0.9544]; 2 of 4 -> [0.1500, 0.8500].
  assert "95% intervals 30.1-95.4% and 15.0-85.0% over 4 prompts and 4)" in md
  assert "One prompt is 25.0 points: the 95% (Wilson) interval of **all** is 30.1-95.4%" in md


def test_ceilings_table_puts_each_split_beside_its_pool_and_vq_ceiling():
  metrics = _metrics()
  t2i = metrics["text_to_image"]
  t2i.update(pool_oracle=0.875, vq_reconstruction={"all": 0.92})
  t2i["seen_pairs"] = {"split": "eval", "num_prompts": 4, "accuracy": {"all": 0.5},
                       "accuracy_candidates": {"all": 0.25}, "pool_oracle": 1.0,
                       "vq_reconstruction": {"all": 1.0}}
  md = report.markdown(metrics)
  assert "| never-seen pairs | 75.0% | 87.5% | 92.0% |" in md
  assert "| seen pairs | 50.0% | 100.0% | 100.0% |" in md


def test_write_is_complete_and_leaves_no_temp_files(tmp_path):
  metrics = _metrics()
  written = report.write(str(tmp_path), metrics, {"samples": (_images(4), ["p"] * 4)},
                         {"data": 1.0})
  assert sorted(os.listdir(tmp_path)) == ["metrics.json", "report.md", "samples.png"]
  assert [os.path.basename(p) for p in written][-1] == "report.md"  # the quickstart's marker
  saved = json.loads((tmp_path / "metrics.json").read_text())
  assert saved["text_to_image"]["accuracy"]["all"] == 0.75
  assert saved["quickstart_seconds"] == {"data": 1.0}


def test_quickstart_seconds_reads_the_quickstart_state(tmp_path):
  assert report.quickstart_seconds(str(tmp_path)) == {}
  (tmp_path / "quickstart.json").write_text(json.dumps({"done": {"data": 3.5}}))
  assert report.quickstart_seconds(str(tmp_path)) == {"data": 3.5}

"""experiments/code_novelty.py: code windows of held-out images that no training image holds."""

import numpy as np

from experiments import code_novelty as cn


def grid(rows):
  return np.array(rows, np.int32)


def test_windows_are_row_major_k_by_k_tuples():
  g = grid([[1, 2, 3], [4, 5, 6], [7, 8, 9]])
  assert cn.windows(g, 2) == [(1, 2, 4, 5), (2, 3, 5, 6), (4, 5, 7, 8), (5, 6, 8, 9)]
  assert cn.windows(g, 3) == [(1, 2, 3, 4, 5, 6, 7, 8, 9)]


def test_object_windows_leave_out_pure_background():
  # Background code 0 (the most common); the object is the 7 in the top-left corner.
  g = grid([[7, 0, 0], [0, 0, 0], [0, 0, 0]])
  assert cn.object_windows(g, 2) == [(7, 0, 0, 0)]


def test_novelty_counts_new_codes_and_new_object_windows():
  train = [grid([[7, 0, 0], [0, 0, 0], [0, 0, 0]]),
           grid([[0, 0, 0], [0, 8, 0], [0, 0, 0]])]
  # Query 1: only known windows (a 7 top-left, as in training). Query 2: codes 7 and 8 both
  # known, but side by side they form windows no training grid holds; code 9 is new.
  known = grid([[7, 0, 0], [0, 0, 0], [0, 0, 0]])
  novel = grid([[0, 0, 0], [0, 7, 8], [0, 0, 9]])
  rates = cn.novelty(cn.seen_patterns(train, 2), [known, novel], 2)
  assert rates["images"] == 2
  assert rates["codes_new"] == 1 / 18  # the one 9 among 2 x 9 codes
  # Object windows: the first query's one, (7,0,0,0), is in training; the second query's four,
  # (0,0,0,7) (0,0,7,8) (0,7,0,0) (7,8,0,9), are not (training holds a 7 only top-left).
  assert rates["windows_per_image"] == (1 + 4) / 2
  assert rates["windows_new"] == 4 / 5
  assert rates["images_with_new"] == 1 / 2


def test_a_workdir_without_a_dataset_is_one_error(tmp_path, capsys):
  assert cn.main(["--config", "tiny", f"--config.workdir={tmp_path}"]) == 2
  assert capsys.readouterr().err.startswith("error: ")


def test_a_window_below_one_is_refused(capsys):
  assert cn.main(["--config", "tiny", "--window", "0"]) == 2
  assert "--window 0" in capsys.readouterr().err


def test_factorised_tokens_are_measured_as_tokens_geometry_and_colour():
  from cm3leon_jax import configs
  parts = cn.factors(configs.load("tiny", ["vq.colour_codes=4"]))
  tokens = grid([[13, 2], [4, 7]])  # token = g * 4 + c
  assert list(parts) == ["tokens", "geometry", "colour"]
  np.testing.assert_array_equal(parts["geometry"](tokens), [[3, 0], [1, 1]])
  np.testing.assert_array_equal(parts["colour"](tokens), [[1, 2], [0, 3]])
  assert list(cn.factors(configs.load("tiny"))) == ["tokens"]

"""Evaluation metrics on hand-computed cases: FID, CIDEr-D, VQA accuracy."""

import numpy as np
import pytest

from cm3leon_jax.errors import InputError
from cm3leon_jax.eval.captioning import cider_d, tokenize
from cm3leon_jax.eval.fid import fid, frechet_distance
from cm3leon_jax.eval.vqa import mean_vqa_accuracy, normalize_answer, vqa_accuracy


def test_fid_of_a_set_with_itself_is_zero():
  features = np.random.default_rng(0).normal(size=(500, 16))
  assert fid(features, features) == pytest.approx(0.0, abs=1e-6)


def test_fid_grows_with_added_noise():
  rng = np.random.default_rng(0)
  features = rng.normal(size=(2000, 8))
  scores = [fid(features, features + rng.normal(scale=s, size=features.shape)) for s in (0.1, 0.5, 1.0)]
  assert 0 < scores[0] < scores[1] < scores[2]


def test_frechet_distance_of_gaussians_in_closed_form():
  # Same covariance I: FID = ||mu_a - mu_b||^2 = 3^2 + 4^2.
  eye = np.eye(2)
  assert frechet_distance(np.zeros(2), eye, np.array([3.0, 4.0]), eye) == pytest.approx(25.0)
  # Diagonal covariances: sum (sqrt(a) - sqrt(b))^2 = (2 - 1)^2 + (3 - 1)^2 = 5.
  assert frechet_distance(np.zeros(2), np.diag([4.0, 9.0]), np.zeros(2), eye) == pytest.approx(5.0)


@pytest.mark.parametrize("features", [np.zeros((1, 4)), np.full((3, 2), np.nan)])
def test_fid_bad_features(features):
  with pytest.raises(InputError):
    fid(features, np.zeros((5, features.shape[1])))


def test_cider_perfect_match_beats_wrong_caption():
  refs = {"1": ["a red circle at the top left", "a red circle in the top left corner"],
          "2": ["a small blue square below it", "a blue square"],
          "3": ["a green triangle on the right", "one green triangle"]}
  good = {"1": "a red circle at the top left", "2": "a small blue square below it",
          "3": "a green triangle on the right"}
  bad = {"1": "a green triangle on the right", "2": "a red circle at the top left",
         "3": "a small blue square below it"}
  assert cider_d(refs, good) > 100.0 > cider_d(refs, bad)


def test_cider_mismatched_ids_is_an_error():
  with pytest.raises(InputError, match="different ids"):
    cider_d({"1": ["a"]}, {"2": "a"})


def test_tokenize_drops_case_and_punctuation():
  assert tokenize("A Red, circle!") == "a red circle"


@pytest.mark.parametrize("raw, normalised", [
    ("Two", "2"), ("the red one.", "red 1"), ("Blue!", "blue"), ("3.5", "3.5"), ("an apple", "apple"),
])
def test_answer_normalisation(raw, normalised):
  assert normalize_answer(raw) == normalised


def test_vqa_accuracy_official_ten_answer_protocol():
  # 2 of 10 humans said "red": each leave-one-out subset has 1 or 2 matches ->
  # (8 subsets * 2/3 + 2 subsets * 1/3) / 10 = 0.6
  answers = ["red"] * 2 + ["blue"] * 8
  assert vqa_accuracy("red", answers) == pytest.approx(0.6)
  assert vqa_accuracy("blue", answers) == pytest.approx(1.0)


def test_vqa_accuracy_single_reference_is_exact_match():
  assert vqa_accuracy("Two.", ["2"]) == 1.0
  assert vqa_accuracy("three", ["2"]) == 0.0
  assert mean_vqa_accuracy(["red", "blue"], [["red"], ["green"]]) == pytest.approx(50.0)


def test_fid_with_fewer_images_than_dimensions_equals_the_full_covariance_formula():
  # 12 and 30 vectors in 64-d: rank-deficient covariances take the small N x N path in fid();
  # frechet_distance works on the full 64 x 64 covariances; scipy's sqrtm is the reference.
  import scipy.linalg
  from cm3leon_jax.eval.fid import feature_stats
  rng = np.random.default_rng(0)
  a, b = rng.normal(size=(12, 64)), rng.normal(loc=0.3, size=(30, 64))
  (mu_a, s_a), (mu_b, s_b) = feature_stats(a), feature_stats(b)
  reference = ((mu_a - mu_b) @ (mu_a - mu_b) + np.trace(s_a) + np.trace(s_b)
               - 2 * np.trace(np.real(scipy.linalg.sqrtm(s_a @ s_b))))
  assert fid(a, b) == pytest.approx(reference, rel=1e-6)
  assert fid(b, a) == pytest.approx(reference, rel=1e-6)
  assert frechet_distance(mu_a, s_a, mu_b, s_b) == pytest.approx(reference, rel=1e-6)

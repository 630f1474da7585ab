"""Image infilling with a re-ranked candidate pool (Generator.infill_image, num_candidates)."""

import numpy as np
import pytest

from cm3leon_jax import configs
from cm3leon_jax.errors import InputError
from tests.eval_fixtures import shapes_records, tiny_generator


@pytest.fixture(scope="module")
def stack(tmp_path_factory):
  config = configs.load("tiny")
  generator, _ = tiny_generator(config, str(tmp_path_factory.mktemp("bank")))
  records = shapes_records("eval", 2, config.vq.image_size)
  images = np.stack([r["image"] for r in records])
  grid = generator.image_tokenizer.grid
  region = np.zeros((grid, grid), bool)
  region[1:3] = True
  return generator, images, [r["text"] for r in records], region.reshape(-1)


def test_the_pick_is_the_candidate_the_dual_encoder_scores_highest(stack, monkeypatch):
  generator, images, captions, region = stack
  seen = {}
  scores = np.array([0.1, 0.9, 0.3, 0.8, 0.2, 0.4])  # image 0 -> candidate 1, image 1 -> 0

  def score(candidates, texts):
    seen["images"], seen["texts"] = np.asarray(candidates), list(texts)
    return scores

  monkeypatch.setattr(generator.retriever.embedder, "score", score)
  out = generator.infill_image(images, captions, region, num_candidates=3, seed=0)
  assert out.shape == images.shape
  assert seen["texts"] == [captions[0]] * 3 + [captions[1]] * 3
  np.testing.assert_array_equal(out[0], seen["images"][1])
  np.testing.assert_array_equal(out[1], seen["images"][3])


@pytest.mark.parametrize("n, captions, message", [
    (0, ["a red circle"] * 2, "num_candidates=0"),
    (2, None, "needs captions"),
    (2, ["a red circle", ""], "needs captions"),
])
def test_bad_pool_arguments_are_errors(stack, n, captions, message):
  generator, images, _, region = stack
  with pytest.raises(InputError, match=message):
    generator.infill_image(images, captions, region, num_candidates=n)


def test_the_configs_cache_window_reaches_the_sampler(stack, monkeypatch):
  from cm3leon_jax.decode import api
  generator, images, captions, region = stack
  specs = []
  real = api.generate
  monkeypatch.setattr(api, "generate", lambda *a, **k: specs.append(a[3]) or real(*a, **k))
  decoding = generator.config.decoding
  saved, decoding.cache_window = decoding.cache_window, 3
  try:
    generator.infill_image(images, captions, region, num_candidates=1, seed=0)
  finally:
    decoding.cache_window = saved
  assert [s.cache_window for s in specs] == [3]

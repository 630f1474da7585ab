"""The attribute-binding probe (eval/binding.py) and teacher-forced scoring (decode/likelihood.py)."""

import jax
import numpy as np
import pytest

from cm3leon_jax import configs
from cm3leon_jax.data import shapes
from cm3leon_jax.decode.likelihood import continuation_nll
from cm3leon_jax.errors import InputError
from cm3leon_jax.eval.binding import binding
from tests.eval_fixtures import random_decoder


def _scene(colour, shape, size="small"):
  return shapes.Scene((shapes.Obj(shape, colour, size, 0, 0),))


def test_binding_scores_a_model_that_reads_colour_but_not_shape():
  # codes_BN[:, 0] holds the colour index; the fake NLL is 0 when the caption names that colour
  # and 5 otherwise, whatever the shape: colour always wins by 5 nats, shape ties (a tie is a
  # loss: the true caption must be strictly lowest).
  scenes = [_scene("red", "circle"), _scene("blue", "square", "large")]
  captions = ["a small red circle", "a large blue square"]
  codes_BN = np.array([[shapes.COLOUR_NAMES.index("red")], [shapes.COLOUR_NAMES.index("blue")]])

  def image_nll(caps, codes):
    return np.array([0.0 if f" {shapes.COLOUR_NAMES[c[0]]} " in f" {t} " else 5.0
                     for t, c in zip(caps, codes)])

  out = binding(image_nll, captions, scenes, codes_BN)
  assert out["colour"] == {"num_scenes": 2, "chance": 1 / 8, "accuracy": 1.0,
                           "median_margin": 5.0}
  assert out["shape"] == {"num_scenes": 2, "chance": 1 / 5, "accuracy": 0.0,
                          "median_margin": 0.0}
  assert out["size"]["accuracy"] == 0.0 and out["size"]["num_scenes"] == 2


def test_binding_skips_a_caption_that_does_not_name_the_value():
  out = binding(lambda caps, codes: np.zeros(len(caps)), ["a red shape"],
                [_scene("red", "circle")], np.zeros((1, 1), int))
  assert out["shape"]["num_scenes"] == 0 and out["shape"]["accuracy"] is None
  assert out["colour"]["num_scenes"] == 1


def test_binding_rejects_multi_object_scenes_and_mismatched_inputs():
  two = shapes.Scene((shapes.Obj("circle", "red", "small", 0, 0),
                      shapes.Obj("square", "blue", "small", 2, 2)))
  with pytest.raises(InputError, match="single-object"):
    binding(lambda c, x: np.zeros(len(c)), ["a red circle and a blue square"], [two],
            np.zeros((1, 1), int))
  with pytest.raises(InputError, match="1 captions, 2 scenes"):
    binding(lambda c, x: np.zeros(len(c)), ["a red circle"], [_scene("red", "circle")] * 2,
            np.zeros((2, 1), int))


def test_continuation_nll_equals_the_summed_log_probs_of_a_full_forward():
  config = configs.load("tiny")
  model = random_decoder(config)
  rng = np.random.default_rng(0)
  prompts = [rng.integers(1, 100, 5), rng.integers(1, 100, 9), rng.integers(1, 100, 3)]
  conts = [rng.integers(1, 100, 4), rng.integers(1, 100, 2), rng.integers(1, 100, 7)]
  got = continuation_nll(model, prompts, conts, batch_size=2)
  for p, c, nll in zip(prompts, conts, got):
    full = np.concatenate([p, c])[None]
    logits = model(full, np.arange(full.shape[1])[None], np.ones_like(full))
    logp = np.asarray(jax.nn.log_softmax(np.asarray(logits, np.float64), -1))[0]
    want = -sum(logp[len(p) - 1 + j, t] for j, t in enumerate(c))
    assert nll == pytest.approx(want, rel=1e-4)


def test_continuation_nll_rejects_rows_longer_than_the_window():
  config = configs.load("tiny")
  model = random_decoder(config)
  with pytest.raises(InputError, match="window"):
    continuation_nll(model, [np.ones(config.model.seq_len, int)], [np.ones(2, int)])


def test_binding_stage_with_no_scenes_asked_for_is_an_error():
  from cm3leon_jax.eval import suite
  config = configs.load("tiny", ["eval.num_binding=0"])
  with pytest.raises(InputError, match="num_binding=0"):
    suite.binding(config, None, None, lambda split: [])


def test_image_nll_of_codes_of_the_wrong_shape_is_an_error():
  from cm3leon_jax.decode.api import Generator
  config = configs.load("tiny")
  generator = Generator(config, None, None, None)  # the check runs before any model call
  with pytest.raises(InputError, match=r"expected \[1, 16\]"):
    generator.image_nll(["a red circle"], np.zeros((1, 3), int))

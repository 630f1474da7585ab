"""Logit processing for decoding: top-k/top-p, sampling, CFG, CD-K, modality constraints."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from cm3leon_jax.decode import constraints
from cm3leon_jax.decode.cdk import cdk_scores
from cm3leon_jax.decode.guidance import cfg, cfg_two
from cm3leon_jax.decode.sampling import _first_above, sample, top_k_filter, top_p_filter
from cm3leon_jax.tokenizers.vocab import Vocab

LOG_PROBS = jnp.log(jnp.array([[0.5, 0.3, 0.15, 0.05]]))


def test_top_k_keeps_the_k_best():
  kept = np.isfinite(top_k_filter(LOG_PROBS, 2))
  assert kept.tolist() == [[True, True, False, False]]


@pytest.mark.parametrize("top_p, expected", [
    (0.5, [True, False, False, False]),   # 0.5 alone reaches 0.5
    (0.6, [True, True, False, False]),
    (0.9, [True, True, True, False]),     # 0.5 + 0.3 = 0.8 < 0.9: add 0.15
    (1.0, [True, True, True, True]),
    (0.01, [True, False, False, False]),  # the best token is always kept
])
def test_top_p_keeps_the_smallest_nucleus(top_p, expected):
  assert np.isfinite(top_p_filter(LOG_PROBS, top_p))[0].tolist() == expected


def test_top_p_per_row():
  scores = jnp.concatenate([LOG_PROBS, LOG_PROBS])
  kept = np.isfinite(top_p_filter(scores, jnp.array([0.5, 0.9])))
  assert kept.sum(1).tolist() == [1, 3]


def test_temperature_zero_is_greedy_and_sampling_follows_probabilities():
  rng = jax.random.key(0)
  assert int(sample(rng, LOG_PROBS, 0.0)[0]) == 0
  draws = jax.vmap(lambda r: sample(r, LOG_PROBS, 1.0)[0])(jax.random.split(rng, 4000))
  freq = np.bincount(np.asarray(draws), minlength=4) / 4000
  np.testing.assert_allclose(freq, [0.5, 0.3, 0.15, 0.05], atol=0.03)


def test_sampling_never_picks_a_forbidden_token():
  scores = jnp.array([[0.0, -jnp.inf, 0.0, -jnp.inf]] * 64)
  tokens = sample(jax.random.key(1), scores, 1.0)
  assert set(np.asarray(tokens).tolist()) <= {0, 2}


def test_sampling_follows_probabilities_across_blocks_and_padding():
  # 300 tokens = two full 128-token blocks of the inverse-CDF sampler + a padded third one;
  # the mass sits in all three blocks and on the last token, with forbidden tokens in between.
  probs = np.zeros(300)
  probs[[3, 130, 131, 260, 299]] = [0.1, 0.2, 0.3, 0.15, 0.25]
  scores = jnp.log(jnp.asarray(probs, jnp.float32))[None]
  draws = jax.vmap(lambda r: sample(r, scores, 1.0)[0])(jax.random.split(jax.random.key(7), 8000))
  freq = np.bincount(np.asarray(draws), minlength=300) / 8000
  assert set(np.flatnonzero(freq).tolist()) <= {3, 130, 131, 260, 299}
  np.testing.assert_allclose(freq[[3, 130, 131, 260, 299]], probs[[3, 130, 131, 260, 299]],
                             atol=0.02)


def test_inverse_cdf_never_lands_on_a_zero_mass_token_when_u_rounds_to_the_total():
  p = jnp.array([[0.5, 0.5, 0.0, 0.0]])
  cum = jnp.cumsum(p, axis=-1)
  # u equal to the total (float rounding of u * total): the last token with mass, not index 4.
  assert int(_first_above(cum, cum[:, -1:], p > 0)[0]) == 1
  assert int(_first_above(cum, jnp.array([[0.0]]), p > 0)[0]) == 0
  assert int(_first_above(cum, jnp.array([[0.5]]), p > 0)[0]) == 1


def test_cfg_weight_one_is_conditional_and_zero_is_unconditional():
  cond = jax.random.normal(jax.random.key(0), (3, 11))
  uncond = jax.random.normal(jax.random.key(1), (3, 11))
  np.testing.assert_allclose(cfg(cond, uncond, 1.0), jax.nn.log_softmax(cond), atol=1e-5)
  np.testing.assert_allclose(cfg(cond, uncond, 0.0), jax.nn.log_softmax(uncond), atol=1e-5)


def test_cfg_extrapolates_away_from_the_unconditional():
  cond = jnp.log(jnp.array([[0.6, 0.4]]))
  uncond = jnp.log(jnp.array([[0.4, 0.6]]))
  out = jax.nn.softmax(cfg(cond, uncond, 3.0))
  # log-odds: uncond -0.405 + 3 * (0.405 - (-0.405)) = 2.03 -> p = 0.884
  np.testing.assert_allclose(out[0, 0], 1 / (1 + (0.4 / 0.6) ** 5), rtol=1e-5)


def test_cfg_keeps_tokens_forbidden_in_both_streams_forbidden():
  cond = jnp.array([[0.0, -jnp.inf, 1.0]])
  out = cfg(cond, cond, 2.0)
  assert np.isneginf(out[0, 1]) and not np.isnan(out).any()


def test_two_weight_guidance_reduces_to_its_streams():
  u, i, f = (jax.random.normal(jax.random.key(k), (2, 7)) for k in range(3))
  ls = jax.nn.log_softmax
  np.testing.assert_allclose(cfg_two(u, i, f, 1.0, 1.0), ls(f), atol=1e-5)
  np.testing.assert_allclose(cfg_two(u, i, f, 0.0, 0.0), ls(u), atol=1e-5)
  np.testing.assert_allclose(cfg_two(u, i, f, 1.0, 0.0), ls(i), atol=1e-5)


def test_cdk_with_k1_alpha1_is_greedy_on_the_expert():
  expert = jax.random.normal(jax.random.key(0), (16, 50))
  amateur = jax.random.normal(jax.random.key(1), (16, 50))
  scores = cdk_scores(expert, amateur, k=1, alpha=1.0)
  assert (np.isfinite(scores).sum(1) == 1).all()
  tokens = sample(jax.random.key(2), scores, 1.0)
  np.testing.assert_array_equal(tokens, jnp.argmax(expert, -1))


def test_cdk_scores_are_the_log_ratio_inside_v():
  expert = jnp.log(jnp.array([[0.5, 0.3, 0.15, 0.05]]))
  amateur = jnp.log(jnp.array([[0.7, 0.1, 0.1, 0.1]]))
  # k=2: the 2nd largest p_exp is 0.3; alpha=0.5 -> V = {p >= 0.15} = tokens 0, 1, 2.
  scores = cdk_scores(expert, amateur, k=2, alpha=0.5)
  expected = [np.log(0.5 / 0.7), np.log(0.3 / 0.1), np.log(0.15 / 0.1), -np.inf]
  np.testing.assert_allclose(scores[0], expected, rtol=1e-5)


VOCAB = Vocab(text_size=10, image_size=6, num_sentinels=2, pad_multiple=8)
N = 3  # tokens per image


def _allowed(state, position, max_len=32, **kw):
  mask = constraints.allowed_mask(state, jnp.array([position]), VOCAB, N, max_len, **kw)
  return set(np.flatnonzero(np.asarray(mask[0])).tolist())


def _state(image_left, close=None, done=False):
  close = VOCAB.break_id if close is None else close
  return constraints.ModalityState(jnp.array([image_left], jnp.int32), jnp.array([close], jnp.int32),
                                   jnp.array([done]))


TEXT = set(range(*VOCAB.text_range))
IMAGE = set(range(*VOCAB.image_range))


def test_inside_an_image_only_image_ids_then_break_is_forced():
  assert _allowed(_state(2), 5) == IMAGE
  assert _allowed(_state(0), 5) == {VOCAB.break_id}


def test_in_text_break_only_with_room_for_the_whole_image():
  assert _allowed(_state(-1), 5) == TEXT | {VOCAB.eos_id, VOCAB.break_id}
  # position 27 + 3 image tokens + closing break + eos = 32: no room in a 32-token cache.
  assert _allowed(_state(-1), 27) == TEXT | {VOCAB.eos_id}
  assert _allowed(_state(-1), 31) == {VOCAB.eos_id}
  assert _allowed(_state(-1), 5, allow_images=False) == TEXT | {VOCAB.eos_id}


def test_done_rows_only_pad():
  assert _allowed(_state(-1, done=True), 5) == {VOCAB.pad_id}


def test_infill_span_closes_with_its_own_token():
  assert _allowed(_state(0, close=VOCAB.eos_id), 5) == {VOCAB.eos_id}


def test_initial_state_from_prompts():
  i0 = VOCAB.image_start
  t0 = VOCAB.text_start
  prompts = np.array([[1, t0, 2, 0, 0], [1, t0, 2, i0, 0], [1, t0, 2, i0, 2]])
  state = constraints.initial_state(VOCAB, prompts, np.array([3, 4, 5]), N)
  assert np.asarray(state.image_left_B).tolist() == [3, 2, -1]


def test_random_model_under_constraints_writes_exact_images():
  """A random 'model' (uniform logits) sampled under the constraints for 200 steps."""
  batch, max_len = 64, 200
  state = constraints.initial_state(VOCAB, np.ones((batch, 1), np.int32), np.ones(batch, int), N)
  rng = jax.random.key(0)
  out = []
  for position in range(1, max_len):
    rng, key_logits, key_sample = jax.random.split(rng, 3)
    logits = jax.random.normal(key_logits, (batch, VOCAB.size))
    mask = constraints.allowed_mask(state, jnp.full((batch,), position), VOCAB, N, max_len)
    tokens = sample(key_sample, jnp.where(mask, logits, -jnp.inf), 1.0)
    state = constraints.update(state, tokens, VOCAB, N)
    out.append(np.asarray(tokens))
  seqs = np.stack(out, 1)
  for seq in seqs:
    body = seq[:np.flatnonzero(seq == VOCAB.eos_id)[0]] if (seq == VOCAB.eos_id).any() else seq
    assert (seq[len(body) + 1:] == VOCAB.pad_id).all()
    breaks = np.flatnonzero(body == VOCAB.break_id)
    assert len(breaks) % 2 == 0
    for open_at, close_at in breaks.reshape(-1, 2):
      assert close_at - open_at - 1 == N
      assert VOCAB.is_image(body[open_at + 1:close_at]).all()
    outside = np.ones(len(body), bool)
    for open_at, close_at in breaks.reshape(-1, 2):
      outside[open_at:close_at + 1] = False
    assert not VOCAB.is_image(body[outside]).any()
  assert (seqs == VOCAB.break_id).any()  # images were actually opened

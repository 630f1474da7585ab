"""The KV-cached compiled sampler on a small random decoder."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from cm3leon_jax import configs
from cm3leon_jax.decode import constraints as C
from cm3leon_jax.decode import prompts as P
from cm3leon_jax.decode.cache import forward_cached, init_cache
from cm3leon_jax.decode.sampler import (SamplerSpec, cache_windows, generate, make_knobs,
                                        step_logits)
from cm3leon_jax.errors import InputError
from cm3leon_jax.model.decoder import Decoder, DecoderConfig
from cm3leon_jax.tokenizers.vocab import Vocab

CONFIG = configs.load("tiny")
VOCAB = Vocab.from_config(CONFIG)
N = 16  # tiny preset: 16 px images, 4x downsampling


@pytest.fixture(scope="module")
def model():
  m = Decoder(DecoderConfig.from_config(CONFIG), rngs=nnx.Rngs(0))
  # The paper's init (std 0.006, zero residual outputs) gives near-uniform logits; give the
  # weights scale so the logits depend on the context and the tests can tell streams apart.
  m.embed[...] = jax.random.normal(jax.random.key(10), m.embed.shape)
  for i, name in enumerate(("wq", "wk", "wv", "wo", "w_in", "w_out")):
    p = getattr(m.layers, name)
    p[...] = jax.random.normal(jax.random.key(i), p.shape) / np.sqrt(p.shape[1])
  return m


def _text(*ids):
  return np.array(ids, np.int32)


def test_cached_logits_equal_the_full_forward_token_by_token(model):
  tokens = np.asarray(jax.random.randint(jax.random.key(3), (2, 12), VOCAB.text_start, 300))
  full = model(jnp.asarray(tokens), jnp.broadcast_to(jnp.arange(12), (2, 12)),
               jnp.ones((2, 12), jnp.int32))
  cache = init_cache(model, 2, 16)
  ones = lambda t: jnp.ones((2, t), jnp.int32)
  logits, cache = forward_cached(model, cache, jnp.asarray(tokens[:, :4]),
                                 jnp.broadcast_to(jnp.arange(4), (2, 4)), ones(4), jnp.int32(0))
  steps = [logits]
  for t in range(4, 12):
    logits, cache = forward_cached(model, cache, jnp.asarray(tokens[:, t:t + 1]),
                                   jnp.full((2, 1), t), ones(1), jnp.int32(t))
    steps.append(logits)
  np.testing.assert_allclose(jnp.concatenate(steps, 1), full, rtol=1e-5, atol=1e-4)


def _reference_greedy(model, prompt, max_new):
  """Greedy decoding by re-running the full forward on the growing sequence."""
  seq = list(prompt)
  state = C.initial_state(VOCAB, np.array([prompt]), np.array([len(prompt)]), N)
  out = []
  for _ in range(max_new):
    length = len(seq)
    logits = model(jnp.array([seq]), jnp.arange(length)[None], jnp.ones((1, length), jnp.int32))
    mask = C.allowed_mask(state, jnp.array([length]), VOCAB, N, len(prompt) + max_new)
    token = int(jnp.argmax(jnp.where(mask, logits[:, -1], -jnp.inf)))
    state = C.update(state, jnp.array([token]), VOCAB, N)
    out.append(token)
    seq.append(token)
    if bool(state.done_B[0]):
      break
  return out


def test_greedy_sampling_matches_the_uncached_reference_with_ragged_prompts(model):
  prompts = [_text(1, VOCAB.text_start + 5, VOCAB.text_start + 9), _text(1, VOCAB.text_start + 7)]
  spec = SamplerSpec(max_new_tokens=8, tokens_per_image=N)
  out, _ = generate(model, VOCAB, [prompts], spec, make_knobs(2, temperature=0.0),
                    jax.random.key(0))
  for row, prompt in zip(out, prompts):
    ref = _reference_greedy(model, prompt, 8)
    assert row[:len(ref)].tolist() == ref[:len(ref)]


def test_cache_windows_split_the_new_tokens_evenly_and_end_at_the_full_cache():
  # 1,025 new tokens after a 32-token prompt, windows of ~256 steps: 4 windows of 256-257.
  assert cache_windows(32, 1025, 256) == [32 + 257, 32 + 513, 32 + 769, 32 + 1025]
  assert cache_windows(5, 12, 4) == [9, 13, 17]
  assert cache_windows(32, 1025, 0) == [1057]  # 0: one window, the whole cache every step
  assert cache_windows(5, 10, 256) == [15]     # fewer new tokens than one window


def test_windowed_cache_samples_what_one_full_cache_samples(model):
  """Attending a shorter cache in the early windows changes nothing: same seed, same tokens."""
  pr = [P.text_to_image(VOCAB, np.array(c)) for c in ((40, 41, 42), (50, 51))]
  streams = [[p.cond for p in pr], [p.uncond for p in pr]]
  knobs = make_knobs(2, temperature=5.0, cfg_weight=2.0)  # hot: many distinct tokens
  outs = []
  for window in (0, 3, 5):  # one window; 6 windows of ~3 steps; 3 of ~5-6
    spec = SamplerSpec(num_streams=2, max_new_tokens=N + 1, tokens_per_image=N,
                       stop_after_image=True, cache_window=window)
    outs.append(generate(model, VOCAB, streams, spec, knobs, jax.random.key(4))[0])
  np.testing.assert_array_equal(outs[1], outs[0])
  np.testing.assert_array_equal(outs[2], outs[0])
  assert len(set(outs[0].ravel().tolist())) > 4


def test_step_logits_multiply_only_the_image_rows_while_every_row_is_inside_an_image(model):
  x_R1D = jax.random.normal(jax.random.key(1), (3, 1, model.cfg.d_model))
  w_VD = model.head_weight()
  w_image_ID = w_VD[VOCAB.image_start:VOCAB.image_end]
  full_RV = model.logits(x_R1D)[:, 0]
  state = lambda left, done=(False, False, False): C.ModalityState(
      jnp.array(left, jnp.int32), jnp.full((3,), VOCAB.break_id), jnp.array(done))
  inside = step_logits(model, x_R1D, state([5, 1, 16]), w_VD, w_image_ID, VOCAB)
  image = slice(VOCAB.image_start, VOCAB.image_end)
  np.testing.assert_allclose(inside[:, image], full_RV[:, image], rtol=1e-5, atol=1e-5)
  assert np.isneginf(np.asarray(inside[:, :VOCAB.image_start])).all()
  assert np.isneginf(np.asarray(inside[:, VOCAB.image_end:])).all()
  # One row in text (-1), closing its image (0) or done: the whole head for every row.
  for other in (state([5, -1, 16]), state([5, 0, 16]), state([5, 1, 16], (False, True, False))):
    np.testing.assert_array_equal(step_logits(model, x_R1D, other, w_VD, w_image_ID, VOCAB),
                                  full_RV)
  np.testing.assert_array_equal(step_logits(model, x_R1D, state([5, 1, 16]), w_VD, None, VOCAB),
                                full_RV)


@pytest.mark.parametrize("top_p,top_k", [(1.0, 0), (0.8, 0), (0.9, 20)])
def test_image_only_head_samples_what_the_whole_head_samples(model, top_p, top_k):
  """The image-only head and the image-only top-k / top-p (while every row is in an image) keep
  the same tokens as the whole head and vocabulary: the same samples, draw for draw."""
  pr = [P.text_to_image(VOCAB, np.array(c)) for c in ((40, 41, 42), (50, 51))]
  streams = [[p.cond for p in pr], [p.uncond for p in pr]]
  knobs = make_knobs(2, temperature=5.0, cfg_weight=2.0, use_cdk=[True, False], top_p=top_p)
  outs = [generate(model, VOCAB, streams, SamplerSpec(
      num_streams=2, max_new_tokens=N + 1, tokens_per_image=N, stop_after_image=True,
      top_k=top_k, image_head=image_head), knobs, jax.random.key(4))[0]
      for image_head in (True, False)]
  np.testing.assert_array_equal(outs[0], outs[1])
  assert len(set(outs[0].ravel().tolist())) > 4


def _t2i(model, weight, seed=0, use_cdk=False, captions=((40, 41, 42), (50, 51)), temperature=1.0):
  pr = [P.text_to_image(VOCAB, np.array(c)) for c in captions]
  spec = SamplerSpec(num_streams=2, max_new_tokens=N + 1, tokens_per_image=N, stop_after_image=True)
  knobs = make_knobs(len(pr), temperature=temperature, cfg_weight=weight, use_cdk=use_cdk)
  return generate(model, VOCAB, [[p.cond for p in pr], [p.uncond for p in pr]], spec, knobs,
                  jax.random.key(seed))[0]


def _plain(model, prompts_, seed=0):
  spec = SamplerSpec(num_streams=1, max_new_tokens=N + 1, tokens_per_image=N, stop_after_image=True)
  return generate(model, VOCAB, [prompts_], spec, make_knobs(len(prompts_), temperature=1.0),
                  jax.random.key(seed))[0]


def test_guidance_weight_one_is_conditional_and_zero_is_unconditional(model):
  pr = [P.text_to_image(VOCAB, np.array(c)) for c in ((40, 41, 42), (50, 51))]
  np.testing.assert_array_equal(_t2i(model, 1.0), _plain(model, [p.cond for p in pr]))
  np.testing.assert_array_equal(_t2i(model, 0.0), _plain(model, [p.uncond for p in pr]))


def test_guidance_regression_unconditional_stream_really_differs(model):
  """Fails if the unconditional prompt silently equals the conditional one (CFG a no-op)."""
  prompt = P.text_to_image(VOCAB, np.array([40, 41, 42]))
  assert not np.array_equal(prompt.cond, prompt.uncond)
  assert VOCAB.sentinel_id(0) in prompt.uncond and not VOCAB.is_text(prompt.uncond).any()
  assert not np.array_equal(_t2i(model, 3.0), _t2i(model, 1.0))


def test_cdk_k1_alpha1_is_greedy_on_the_expert(model):
  pr = [P.text_to_image(VOCAB, np.array([40, 41, 42]))]
  spec = SamplerSpec(num_streams=2, max_new_tokens=N + 1, tokens_per_image=N, cdk_k=1,
                     stop_after_image=True)
  knobs = make_knobs(1, temperature=1.0, use_cdk=True, cdk_alpha=1.0)
  cdk, _ = generate(model, VOCAB, [[pr[0].cond], [pr[0].uncond]], spec, knobs, jax.random.key(5))
  greedy, _ = generate(model, VOCAB, [[pr[0].cond]], SamplerSpec(
      max_new_tokens=N + 1, tokens_per_image=N, stop_after_image=True),
      make_knobs(1, temperature=0.0), jax.random.key(9))
  np.testing.assert_array_equal(cdk, greedy)


def test_text_to_image_writes_exactly_n_image_tokens_then_break(model):
  for use_cdk in (False, True, [True, False]):
    out = _t2i(model, 3.0, use_cdk=use_cdk)
    assert VOCAB.is_image(out[:, :N]).all()
    assert (out[:, N] == VOCAB.break_id).all()


def test_fixed_seed_reproduces_and_other_seeds_differ(model):
  hot = dict(temperature=5.0)  # flatten the random model's peaked distributions
  np.testing.assert_array_equal(_t2i(model, 3.0, seed=7, **hot), _t2i(model, 3.0, seed=7, **hot))
  assert not np.array_equal(_t2i(model, 3.0, seed=7, **hot), _t2i(model, 3.0, seed=8, **hot))


def test_mixed_tasks_in_one_batch_respect_their_modalities(model):
  codes = np.arange(N) % VOCAB.image_size
  caption = P.image_to_text(VOCAB, codes, N)
  t2i = P.text_to_image(VOCAB, np.array([40, 41]))
  text = P.continuation(VOCAB, [P.TextSegment(np.array([60, 61]))])
  spec = SamplerSpec(max_new_tokens=40, tokens_per_image=N)
  out, done = generate(model, VOCAB, [[caption.cond, t2i.cond, text.cond]], spec,
                       make_knobs(3, temperature=1.0), jax.random.key(1))
  # Row 0 continues after a closed image (text mode); row 1 must finish its open image first.
  assert VOCAB.is_image(out[1, :N]).all() and out[1, N] == VOCAB.break_id
  for row in out:
    body = row[:np.flatnonzero(row == VOCAB.eos_id)[0]] if (row == VOCAB.eos_id).any() else row
    assert not VOCAB.is_sentinel(body).any() and VOCAB.infill_id not in body


def test_image_infilling_writes_exactly_the_missing_tokens(model):
  codes = np.arange(N) % VOCAB.image_size
  region = np.zeros(N, bool)
  region[4:8] = True
  prompt = P.image_infill(VOCAB, np.array([40, 41]), codes, region, N)
  assert prompt.image_span == 4
  state = C.initial_state(VOCAB, prompt.cond[None], np.array([len(prompt.cond)]), N,
                          span_lens_B=np.array([4]), span_close=VOCAB.eos_id)
  out, done = generate(model, VOCAB, [[prompt.cond]], SamplerSpec(max_new_tokens=8,
                       tokens_per_image=N), make_knobs(1), jax.random.key(2), state=state)
  assert VOCAB.is_image(out[0, :4]).all() and out[0, 4] == VOCAB.eos_id and done[0]


@pytest.mark.parametrize("kwargs, message", [
    (dict(temperature=-1.0), "temperature"), (dict(top_p=0.0), "top_p"), (dict(top_p=1.5), "top_p"),
    (dict(cfg_weight=-0.5), "guidance weights"), (dict(cdk_alpha=0.0), "cdk_alpha"),
])
def test_bad_knobs_are_errors(kwargs, message):
  with pytest.raises(InputError, match=message):
    make_knobs(2, **kwargs)


def test_bad_calls_fail_before_compiling(model):
  long_prompt = np.ones(CONFIG.model.seq_len, np.int32)
  with pytest.raises(InputError, match="exceeds the model's"):
    generate(model, VOCAB, [[long_prompt]], SamplerSpec(max_new_tokens=4, tokens_per_image=N),
             make_knobs(1), jax.random.key(0))
  prompt = P.text_to_image(VOCAB, np.array([40]))
  with pytest.raises(InputError, match="cdk_k=0"):
    generate(model, VOCAB, [[prompt.cond], [prompt.uncond]],
             SamplerSpec(num_streams=2, cdk_k=0, tokens_per_image=N), make_knobs(1),
             jax.random.key(0))
  with pytest.raises(InputError, match="cache_window=-1"):
    generate(model, VOCAB, [[prompt.cond]], SamplerSpec(cache_window=-1, tokens_per_image=N),
             make_knobs(1), jax.random.key(0))
  with pytest.raises(InputError, match="exactly 16 codes"):
    P.image_to_text(VOCAB, np.zeros(15, int), N)

"""`model.image_positions`: a learned embedding of each image token's raster index."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from cm3leon_jax import configs
from cm3leon_jax.decode import constraints as C
from cm3leon_jax.decode.sampler import SamplerSpec, generate, make_knobs
from cm3leon_jax.model.decoder import Decoder, DecoderConfig, param_count
from cm3leon_jax.tokenizers.vocab import Vocab

CONFIG = configs.load("tiny", ["model.image_positions=True"])
VOCAB = Vocab.from_config(CONFIG)
N = 16  # tiny preset: 16 px images, 4x downsampling -> 4x4 codes


@pytest.fixture(scope="module")
def model():
  m = Decoder(DecoderConfig.from_config(CONFIG), rngs=nnx.Rngs(0))
  # Give every weight scale so the logits depend on the context (see test_sampler.py), and the
  # image-position table enough to change the greedy choice.
  m.embed[...] = jax.random.normal(jax.random.key(10), m.embed.shape)
  m.image_pos_embed[...] = 3.0 * jax.random.normal(jax.random.key(11), m.image_pos_embed.shape)
  for i, name in enumerate(("wq", "wk", "wv", "wo", "w_in", "w_out")):
    p = getattr(m.layers, name)
    p[...] = jax.random.normal(jax.random.key(i), p.shape) / np.sqrt(p.shape[1])
  return m


def test_image_index_counts_inside_each_run_of_image_tokens(model):
  img, txt = VOCAB.image_start, VOCAB.text_start
  ids = [VOCAB.eos_id, txt, VOCAB.break_id, img, img + 5, img + 1, VOCAB.break_id,
         VOCAB.sentinel_id(0), img + 2, img + 3, VOCAB.eos_id]
  expected = [-1, -1, -1, 0, 1, 2, -1, -1, 0, 1, -1]
  assert model.image_index(jnp.array([ids])).tolist() == [expected]


def test_off_by_default_and_counted_when_on():
  off = DecoderConfig.from_config(configs.load("tiny"))
  on = DecoderConfig.from_config(CONFIG)
  assert off.tokens_per_image == 0 and on.tokens_per_image == N
  assert not hasattr(Decoder(off, rngs=nnx.Rngs(0)), "image_pos_embed")
  assert param_count(on) - param_count(off) == N * on.d_model


def test_text_only_sequences_ignore_the_table(model):
  ids = jnp.array([[VOCAB.eos_id, VOCAB.text_start + 3, VOCAB.text_start + 7]])
  pos, seg = jnp.arange(3)[None], jnp.ones((1, 3), jnp.int32)
  before = model(ids, pos, seg)
  saved = model.image_pos_embed[...]
  model.image_pos_embed[...] = jnp.zeros_like(saved)
  try:
    np.testing.assert_array_equal(model(ids, pos, seg), before)
  finally:
    model.image_pos_embed[...] = saved


def test_image_logits_depend_on_the_raster_index(model):
  img = VOCAB.image_start
  ids = jnp.array([[VOCAB.eos_id, VOCAB.text_start, VOCAB.break_id, img, img, img]])
  pos, seg = jnp.arange(6)[None], jnp.ones((1, 6), jnp.int32)
  before = model(ids, pos, seg)
  saved = model.image_pos_embed[...]
  model.image_pos_embed[...] = saved.at[2].set(0.0)  # only the third image token's row
  try:
    after = model(ids, pos, seg)
  finally:
    model.image_pos_embed[...] = saved
  np.testing.assert_array_equal(after[:, :5], before[:, :5])
  assert not np.allclose(after[:, 5], before[:, 5])


def _reference_greedy(model, prompt, max_new):
  """Greedy decoding by re-running the full forward (which computes the image indices)."""
  width = len(prompt) + max_new  # one compiled shape: padding after a causal prefix is inert
  forward = nnx.jit(lambda m, ids, seg: m(ids, jnp.arange(width)[None], seg))
  seq = list(prompt)
  state = C.initial_state(VOCAB, np.array([prompt]), np.array([len(prompt)]), N)
  out = []
  for _ in range(max_new):
    length = len(seq)
    ids = np.zeros((1, width), np.int32)
    ids[0, :length] = seq
    logits = forward(model, jnp.asarray(ids), jnp.asarray(ids != 0, jnp.int32)
                     )[:, length - 1:length]
    mask = C.allowed_mask(state, jnp.array([length]), VOCAB, N, len(prompt) + max_new)
    token = int(jnp.argmax(jnp.where(mask, logits[:, -1], -jnp.inf)))
    state = C.update(state, jnp.array([token]), VOCAB, N, stop_after_image=True)
    out.append(token)
    seq.append(token)
    if bool(state.done_B[0]):
      break
  return out


def test_cached_sampler_tracks_the_index_like_the_full_forward(model):
  img = VOCAB.image_start
  prompts = [
      # text-to-image: the image starts in the loop
      np.array([VOCAB.eos_id, VOCAB.text_start + 5, VOCAB.break_id], np.int32),
      # an image already 3 tokens in: the loop continues at index 3
      np.array([VOCAB.eos_id, VOCAB.break_id, img + 1, img + 2, img + 3], np.int32)]
  spec = SamplerSpec(max_new_tokens=N + 1, tokens_per_image=N, stop_after_image=True)
  out, _ = generate(model, VOCAB, [prompts], spec, make_knobs(2, temperature=0.0),
                    jax.random.key(0))
  for row, prompt in zip(out, prompts):
    ref = _reference_greedy(model, prompt, N + 1)
    assert row[:len(ref)].tolist() == ref


def test_infilling_writes_the_span_at_its_raster_places(model):
  # The prompt `<eos> caption <break> I_0..I_5 <mask:0> I_10..I_15 <break> <eos> <infill> <mask:0>`
  # moves codes away from their places: the cached sampler must give the span's codes indices
  # 6..9 (not 0..3, what counting from the sentinel gives), as a full forward with the
  # explicit index does.
  from cm3leon_jax.decode import prompts as P
  codes = np.arange(N) % 7
  region = np.zeros(N, bool)
  region[6:10] = True
  prompt = P.image_infill(VOCAB, np.array([3, 4]), codes, region, N)
  assert prompt.image_span == 4
  is_image = VOCAB.is_image(prompt.cond)
  np.testing.assert_array_equal(prompt.image_index[is_image], [0, 1, 2, 3, 4, 5] + list(range(10, 16)))
  assert prompt.image_index[-1] == 5  # the final sentinel: the index before the span
  state = C.initial_state(VOCAB, np.zeros((1, 1), np.int32), np.ones(1, np.int32), N,
                          span_lens_B=np.array([4]), span_close=VOCAB.eos_id)
  spec = SamplerSpec(max_new_tokens=5, tokens_per_image=N)
  out, _ = generate(model, VOCAB, [[prompt.cond]], spec, make_knobs(1, temperature=0.0),
                    jax.random.key(0), state=state, image_index=[[prompt.image_index]])
  seq, index = list(prompt.cond), list(prompt.image_index)
  lo, hi = VOCAB.image_start, VOCAB.image_start + VOCAB.image_size
  for j in range(4):  # greedy over image ids with the full forward and the explicit index
    ids = jnp.array([seq])
    logits = model(ids, jnp.arange(len(seq))[None], jnp.ones_like(ids), jnp.array([index]))
    token = lo + int(jnp.argmax(logits[0, -1, lo:hi]))
    assert int(out[0, j]) == token
    seq.append(token)
    index.append(6 + j)
  assert int(out[0, 4]) == VOCAB.eos_id
  # And the index matters: counting from the sentinel gives the span's first code other logits.
  ids = jnp.array([seq[:len(prompt.cond) + 1]])
  explicit = model(ids, jnp.arange(ids.shape[1])[None], jnp.ones_like(ids),
                   jnp.array([index[:ids.shape[1]]]))
  counted = model(ids, jnp.arange(ids.shape[1])[None], jnp.ones_like(ids))
  assert not np.allclose(explicit[0, -1], counted[0, -1])


def test_an_image_index_that_does_not_match_the_prompt_is_an_error(model):
  from cm3leon_jax.decode.sampler import pad_prompts
  from cm3leon_jax.errors import InputError
  prompt = np.array([VOCAB.eos_id, VOCAB.break_id, VOCAB.image_start], np.int32)
  with pytest.raises(InputError, match="one index per prompt token"):
    pad_prompts([[prompt]], 64, 4, image_index=[[np.array([-1, -1], np.int32)]])
  padded = pad_prompts([[prompt]], 64, 4, image_index=[[np.array([-1, -1, 0], np.int32)]])
  np.testing.assert_array_equal(padded.image_index, [[-1, -1, 0]])

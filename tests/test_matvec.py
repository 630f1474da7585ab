"""The fused decode matrix-vector kernels (model/matvec.py), run in Pallas' interpreter on CPU.

The GPU speed is measured by experiments/bench/matvec.py; these check the math and the wiring
into the cached decoder and the sampler.
"""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from cm3leon_jax import configs
from cm3leon_jax.decode import cache as KC
from cm3leon_jax.decode import prompts as P
from cm3leon_jax.decode.sampler import SamplerSpec, generate, make_knobs
from cm3leon_jax.errors import InputError
from cm3leon_jax.model import matvec as MV
from cm3leon_jax.model.decoder import Decoder, DecoderConfig
from cm3leon_jax.tokenizers.vocab import Vocab


def _operands(rows, d, n, dtype=jnp.float32, seed=0):
  k1, k2, k3 = jax.random.split(jax.random.key(seed), 3)
  x = (jax.random.normal(k1, (rows, d)) * 3 + 1).astype(dtype)
  w = (jax.random.normal(k2, (n, d)) * d ** -0.5).astype(dtype)
  r = jax.random.normal(k3, (rows, n)).astype(dtype)
  return x, w, r


def test_plain_product_is_x_times_w_transposed():
  x = jnp.array([[1.0, 2.0, 3.0, 4.0]] * 16, jnp.float32).reshape(1, 64)
  w = jnp.zeros((8, 64), jnp.float32).at[3, :4].set(1.0).at[5, 0].set(-2.0)
  y = MV.fused_matvec(x, w)
  expected = np.zeros((1, 8), np.float32)
  expected[0, 3], expected[0, 5] = 10.0, -2.0
  np.testing.assert_allclose(y, expected, atol=1e-6)


@pytest.mark.parametrize("rows", [1, 2, 3, 8])
@pytest.mark.parametrize("norm,activation,residual", [
    (True, None, False), (False, None, True), (True, "relu", False), (True, "gelu", True)])
def test_fused_kernel_matches_the_xla_reference(rows, norm, activation, residual):
  x, w, r = _operands(rows, 128, 48)
  kw = dict(norm=norm, activation=activation)
  got = MV.fused_matvec(x, w, r if residual else None, **kw)
  want = MV.reference(x, w, r if residual else None, **kw)
  assert got.shape == (rows, 48)
  np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)


def test_norm_is_the_decoders_layer_norm():
  """norm=True with w = identity returns LayerNorm(x) itself: zero mean, unit variance rows."""
  x, _, _ = _operands(2, 64, 64)
  y = np.asarray(MV.fused_matvec(x, jnp.eye(64, dtype=jnp.float32), norm=True))
  np.testing.assert_allclose(y.mean(-1), 0.0, atol=1e-5)
  np.testing.assert_allclose(y.var(-1), 1.0, rtol=1e-3)


def test_bfloat16_rounds_like_the_decoder_and_float32_output_is_kept():
  x, w, _ = _operands(1, 256, 64, jnp.bfloat16)
  got = MV.fused_matvec(x, w, norm=True, out_dtype=jnp.float32)
  assert got.dtype == jnp.float32
  np.testing.assert_allclose(got, MV.reference(x, w, norm=True, out_dtype=jnp.float32),
                             rtol=1e-5, atol=1e-5)
  assert MV.fused_matvec(x, w).dtype == jnp.bfloat16


def test_block_rows_give_enough_programs_and_divide_n():
  assert MV.block_rows(3072) == 8      # 384 programs
  assert MV.block_rows(1024) == 4      # 256
  assert MV.block_rows(8192) == 16     # 512
  assert MV.block_rows(100) == 1       # too small to split: one row per program
  assert MV.block_rows(1000) == 2      # 500 programs; 8 would give 125


@pytest.mark.parametrize("x_shape,w_shape,message", [
    ((9, 64), (8, 64), "rows 1..8"),
    ((1, 96), (8, 96), "power of 2"),
    ((1, 64), (8, 32), "64 columns, w_ND has 32"),
])
def test_unsupported_shapes_are_clear_errors(x_shape, w_shape, message):
  with pytest.raises(ValueError, match=message):
    MV.fused_matvec(jnp.ones(x_shape), jnp.ones(w_shape))


def test_unknown_activation_is_an_error():
  with pytest.raises(ValueError, match="activation 'tanh'"):
    MV.fused_matvec(jnp.ones((1, 64)), jnp.ones((8, 64)), activation="tanh")


def _model(mode, activation="relu", qk_norm=False, attention="xla"):
  cfg = DecoderConfig(vocab_size=96, num_layers=2, d_model=64, num_heads=4, head_dim=16,
                      d_ff=128, seq_len=64, activation=activation, qk_norm=qk_norm,
                      scan_layers=False, decode_matvec=mode, decode_attention=attention)
  m = Decoder(cfg, rngs=nnx.Rngs(0))
  # Fill every weight (the paper's init zeroes the residual closers, which would hide them).
  state = nnx.state(m, nnx.Param)
  leaves, tree = jax.tree.flatten(state)
  keys = jax.random.split(jax.random.key(1), len(leaves))
  nnx.update(m, jax.tree.unflatten(tree, [jax.random.normal(k, a.shape) * 0.1
                                          for a, k in zip(leaves, keys)]))
  return m


def _decode_logits(m, steps=3, slots=16):
  ids = jnp.array([[1, 5, 7, 9, 11, 13, 2], [2, 3, 4, 8, 10, 12, 6]])
  cache = KC.init_cache(m, 2, slots)
  layers = KC.layer_params(m)
  pos = jnp.broadcast_to(jnp.arange(7), (2, 7))
  # Row 1 is left-padded by two slots (segment 0), as the sampler pads shorter prompts.
  seg = jnp.ones((2, 7), jnp.int32).at[1, :2].set(0)
  logits, cache = KC.forward_cached(m, cache, ids[:, :4], pos[:, :4], seg[:, :4], jnp.int32(0),
                                    layers)
  out = [logits[:, -1]]
  for t in range(4, 4 + steps):
    logits, cache = KC.forward_cached(m, cache, ids[:, t:t + 1], pos[:, t:t + 1],
                                      jnp.ones((2, 1), jnp.int32), jnp.int32(t), layers)
    out.append(logits[:, 0])
  return np.stack(out), layers


@pytest.mark.parametrize("activation,qk_norm", [("relu", False), ("gelu", True),
                                                ("swiglu", False)])
def test_cached_decode_with_fused_kernels_equals_the_xla_path(activation, qk_norm):
  xla, layers_xla = _decode_logits(_model("xla", activation, qk_norm))
  fused, layers_fused = _decode_logits(_model("pallas", activation, qk_norm))
  assert "wqkv_ND" not in layers_xla[0] and "wqkv_ND" in layers_fused[0]
  assert np.abs(xla).max() > 0.5  # logits that depend on the weights
  np.testing.assert_allclose(fused, xla, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("slots", [16, 48])
def test_cached_decode_with_the_attention_kernel_equals_the_xla_path(slots):
  """48 slots: three splits of 16 would not tile, so 16-slot blocks in one split; the kernel
  reads only the written slots of a longer cache."""
  xla, _ = _decode_logits(_model("xla"), slots=slots)
  fused, _ = _decode_logits(_model("pallas", attention="pallas"), slots=slots)
  np.testing.assert_allclose(fused, xla, rtol=1e-5, atol=1e-5)


def test_kernel_splits_tile_the_cache():
  from cm3leon_jax.model.attention import kernel_splits
  assert kernel_splits(1280) == (16, 16)   # 80-slot spans: blocks of 16
  assert kernel_splits(4096) == (16, 256)
  assert kernel_splits(48) == (1, 16)
  assert kernel_splits(289) is None        # no multiple of 16: the XLA attention


def test_auto_is_xla_off_gpu_and_rows_limit_the_kernels():
  assert not KC.uses_matvec(_model("auto"))  # these tests run on CPU
  m = _model("pallas")
  assert KC.uses_matvec(m, 8) and not KC.uses_matvec(m, 9)
  assert not KC.uses_matvec(_model("xla"), 1)


@pytest.mark.parametrize("attention", ["xla", "pallas"])
def test_sampler_with_fused_kernels_samples_what_the_xla_path_samples(attention):
  config = configs.load("tiny")
  vocab = Vocab.from_config(config)
  cfg = DecoderConfig.from_config(config)
  n = 16  # tiny preset: 16 image tokens
  pr = [P.text_to_image(vocab, np.array([40, 41, 42]))]
  spec = SamplerSpec(num_streams=2, max_new_tokens=n + 1, tokens_per_image=n,
                     stop_after_image=True)
  outs = []
  for mode in ("xla", "pallas"):
    m = Decoder(dataclasses.replace(cfg, decode_matvec=mode, decode_attention=attention),
                rngs=nnx.Rngs(0))
    m.embed[...] = jax.random.normal(jax.random.key(10), m.embed.shape)
    for i, name in enumerate(("wq", "wk", "wv", "wo", "w_in", "w_out")):
      p = getattr(m.layers, name)
      p[...] = jax.random.normal(jax.random.key(i), p.shape) / np.sqrt(p.shape[1])
    out, done = generate(m, vocab, [[pr[0].cond], [pr[0].uncond]], spec,
                         make_knobs(1, temperature=1.0, cfg_weight=3.0), jax.random.key(4))
    assert done.all()
    outs.append(out)
  np.testing.assert_array_equal(outs[1], outs[0])
  assert vocab.is_image(outs[0][0, :n]).all() and outs[0][0, n] == vocab.break_id


@pytest.mark.parametrize("field", ["decode_matvec", "decode_attention"])
def test_bad_decode_kernel_values_are_input_errors(field):
  config = configs.load("tiny", [f"model.{field}=triton"])
  with pytest.raises(InputError, match=f"model.{field}='triton'"):
    DecoderConfig.from_config(config)


@pytest.mark.parametrize("tiling", [dict(block_n=1, chunk=16), dict(block_n=16, chunk=128),
                                    dict(block_n=4, chunk=32, num_warps=8)])
def test_every_tiling_computes_the_same_product(tiling):
  x, w, r = _operands(2, 128, 48)
  np.testing.assert_allclose(MV.fused_matvec(x, w, r, norm=True, **tiling),
                             MV.reference(x, w, r, norm=True), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("tiling", [dict(block_n=32), dict(block_n=3), dict(chunk=256),
                                    dict(chunk=48)])
def test_tilings_that_do_not_divide_the_operands_are_errors(tiling):
  with pytest.raises(ValueError, match="must be a power of 2 dividing"):
    MV.fused_matvec(jnp.ones((1, 128)), jnp.ones((48, 128)), **tiling)

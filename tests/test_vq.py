"""The VQ tokenizer: architecture shapes, quantiser maths, restarts, the public encode/decode API."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from cm3leon_jax import configs
from cm3leon_jax.configs.base import tokens_per_image
from cm3leon_jax.errors import InputError
from cm3leon_jax.tokenizers import vq


def _abstract_forward(vq_config):
  """Shapes of (reconstruction, codes) for one image, without allocating any parameters."""
  model = nnx.eval_shape(lambda: vq.VQModel(vq_config, rngs=nnx.Rngs(0)))
  graphdef, state = nnx.split(model)
  S = vq_config.image_size

  def forward(state, x):
    recon, q = nnx.merge(graphdef, state)(x)
    return recon, q.codes_BN

  return jax.eval_shape(forward, state, jax.ShapeDtypeStruct((2, S, S, 3), jnp.float32))


@pytest.mark.parametrize("preset", configs.PRESETS)
def test_every_preset_maps_images_to_its_code_grid(preset):
  c = configs.load(preset).vq
  recon, codes = _abstract_forward(c)
  side = c.image_size // c.downsample
  assert recon.shape == (2, c.image_size, c.image_size, 3)
  assert codes.shape == (2, side * side) and codes.dtype == jnp.int32
  assert tokens_per_image(configs.load(preset)) == side * side


def test_paper_preset_is_256px_32x32_grid_of_8192_codes():
  c = configs.load("cm3leon_7b").vq
  assert (c.image_size, c.image_size // c.downsample, c.codebook_size) == (256, 32, 8192)


@pytest.mark.parametrize("downsample,mult", [(4, (1, 2, 2)), (8, (1, 1, 2, 2)),
                                             (16, (1, 1, 2, 2, 4))])
def test_downsampling_4_8_16(downsample, mult):
  c = configs.load("tiny", [f"vq.image_size=32", f"vq.downsample={downsample}",
                            f"vq.channel_mult={mult}"]).vq
  recon, codes = _abstract_forward(c)
  assert recon.shape == (2, 32, 32, 3)
  assert codes.shape == (2, (32 // downsample) ** 2)


def test_channel_mult_must_match_downsample():
  c = configs.load("tiny", ["vq.downsample=8"]).vq  # tiny's channel_mult has 3 levels: 4x
  with pytest.raises(InputError, match="vq.channel_mult"):
    vq.VQModel(c, rngs=nnx.Rngs(0))


def _is_affine(fn, a, b):
  """fn(a) + fn(b) == fn(a + b) + fn(0): true of any affine map, false of a nonlinear one."""
  lhs, rhs = fn(a) + fn(b), fn(a + b) + fn(jnp.zeros_like(a))
  return bool(jnp.allclose(lhs, rhs, atol=1e-4 * float(jnp.max(jnp.abs(lhs)))))


@pytest.mark.parametrize("num_res_blocks", [0, 1])
def test_levels_are_nonlinear_with_or_without_res_blocks(num_res_blocks):
  # Without res blocks the resampling convs alone would make each side one affine map.
  c = configs.load("quickstart", [f"vq.num_res_blocks={num_res_blocks}"]).vq
  model = vq.VQModel(c, rngs=nnx.Rngs(0))
  k1, k2, k3, k4 = jax.random.split(jax.random.key(0), 4)
  S, g = c.image_size, vq.grid_size(c)
  x1, x2 = (jax.random.uniform(k, (1, S, S, 3), minval=-1, maxval=1) for k in (k1, k2))
  # The decoder's input: the code, plus the colour code's latent when codes are factorised.
  z_dim = c.code_dim + (c.colour_dim if c.colour_codes else 0)
  z1, z2 = (jax.random.normal(k, (1, g, g, z_dim)) for k in (k3, k4))
  assert not _is_affine(model.encoder.features, x1, x2)
  assert not _is_affine(model.decoder.features, z1, z2)


def test_cosine_lookup_ignores_code_norms():
  # Euclidean: z=(1, .2) is nearer to the short code (.1, .1); by angle it is nearer (10, 0).
  codebook = jnp.array([[10.0, 0.0], [0.1, 0.1]])
  z = jnp.array([[1.0, 0.2]])
  assert int(vq.nearest_codes(z, codebook, l2_normalize=False)[0]) == 1
  assert int(vq.nearest_codes(z, codebook, l2_normalize=True)[0]) == 0


def test_quantize_outputs_the_nearest_unit_code():
  codebook = jnp.array([[2.0, 0.0], [0.0, 3.0]])
  z = jnp.array([[[[5.0, 1.0], [0.5, 4.0]]]])  # B=1, h=1, w=2, D=2
  q = vq.quantize(z, codebook, l2_normalize=True)
  np.testing.assert_array_equal(q.codes_BN, [[0, 1]])
  np.testing.assert_allclose(q.zq_BhwD[0, 0], [[1.0, 0.0], [0.0, 1.0]], atol=1e-6)


def test_straight_through_gradient_is_identity():
  codebook = jax.random.normal(jax.random.key(0), (8, 4))
  z = jax.random.normal(jax.random.key(1), (1, 2, 3, 4))
  w = jax.random.normal(jax.random.key(2), (1, 2, 3, 4))
  grad = jax.jit(jax.grad(lambda z: jnp.sum(vq.quantize(z, codebook, False).zq_BhwD * w)))(z)
  np.testing.assert_allclose(grad, w, rtol=1e-6)  # d(quantised)/dz passes through unchanged


_restart = jax.jit(vq.restart_dead_codes, static_argnames="threshold")


def test_dead_codes_restart_on_the_worst_fit_encoder_output():
  K = 4
  codebook = jnp.eye(K)
  usage = jnp.array([0.3, 0.3, 0.3, 0.0])  # code 3 has had no assignments
  z = jnp.array([[1.0, 0, 0, 0], [0, 1.0, 0, 0], [0.5, 0.5, 0.5, 0.5]])
  err = jnp.array([0.0, 0.0, 4.0])  # only row 2 is badly fit
  codes = jnp.array([0, 1, 2])
  new_codebook, new_usage, restarted = _restart(
      codebook, usage, z, err, codes, jax.random.key(0), threshold=0.1)
  assert int(restarted) == 1
  np.testing.assert_allclose(new_codebook[3], [0.5, 0.5, 0.5, 0.5])
  np.testing.assert_allclose(new_codebook[:3], codebook[:3])  # live codes untouched
  assert float(new_usage[3]) == pytest.approx(1 / K)


def test_restarts_draw_encoder_outputs_in_proportion_to_their_error():
  K = 4000  # all dead but code 0 (this batch's only assignment): codes 1.. are redrawn
  z = jnp.array([[1.0, 0.0], [0.0, 1.0], [1.0, 1.0]])
  err = jnp.array([1.0, 3.0, 0.0])
  new_codebook, _, restarted = _restart(jnp.zeros((K, 2)), jnp.zeros((K,)), z, err,
                                        jnp.zeros((3,), jnp.int32), jax.random.key(0), 0.1)
  assert int(restarted) == K - 1
  picked_row1 = float(jnp.mean(new_codebook[1:, 1] == 1.0))
  assert picked_row1 == pytest.approx(0.75, abs=0.03)  # 3 / (1 + 3)
  assert not bool(jnp.any(jnp.all(new_codebook == 1.0, axis=1)))  # zero error: never drawn


def test_live_codes_are_not_restarted():
  usage = jnp.full((4,), 0.25)
  _, new_usage, restarted = _restart(
      jnp.eye(4), usage, jnp.eye(4), jnp.ones(4), jnp.arange(4), jax.random.key(0), 0.1)
  assert int(restarted) == 0
  np.testing.assert_allclose(new_usage, 0.25)  # EMA of a uniform batch stays uniform


def test_perplexity_and_histogram():
  share = vq.code_histogram(jnp.array([[0, 0, 1, 1]]), 4)
  np.testing.assert_allclose(share, [0.5, 0.5, 0, 0])
  assert float(vq.perplexity(share)) == pytest.approx(2.0)


@pytest.fixture(scope="module")
def tokenizer():
  c = configs.load("tiny").vq
  return vq.ImageTokenizer(vq.VQModel(c, rngs=nnx.Rngs(0)))


def _images(n, seed=0, size=16):
  return np.random.default_rng(seed).integers(0, 256, (n, size, size, 3), dtype=np.uint8)


def test_encode_decode_shapes_and_dtypes(tokenizer):
  codes = tokenizer.encode(_images(3))
  assert codes.shape == (3, 16) and codes.dtype == np.int32
  assert codes.min() >= 0 and codes.max() < 64
  images = tokenizer.decode(codes)
  assert images.shape == (3, 16, 16, 3) and images.dtype == np.uint8


def test_encode_decode_are_deterministic_and_batch_independent(tokenizer):
  x = _images(11)
  codes = tokenizer.encode(x)
  np.testing.assert_array_equal(codes, tokenizer.encode(x))
  np.testing.assert_array_equal(codes[:3], tokenizer.encode(x[:3]))  # other padding, same codes
  np.testing.assert_array_equal(tokenizer.decode(codes), tokenizer.decode(codes))
  np.testing.assert_array_equal(tokenizer.decode(codes)[5:6], tokenizer.decode(codes[5:6]))


@pytest.mark.parametrize("images,match", [
    (np.zeros((2, 16, 16, 3), np.float32), "dtype float32"),
    (np.zeros((2, 32, 32, 3), np.uint8), r"shape \(2, 32, 32, 3\)"),
    (np.zeros((2, 16, 16, 4), np.uint8), r"shape \(2, 16, 16, 4\)"),
    (np.zeros((16, 16, 3), np.uint8), r"shape \(16, 16, 3\)"),
    (np.zeros((0, 16, 16, 3), np.uint8), r"shape \(0, 16, 16, 3\)"),
])
def test_encode_rejects_wrong_size_or_dtype(tokenizer, images, match):
  with pytest.raises(InputError, match=match):
    tokenizer.encode(images)


@pytest.mark.parametrize("codes,match", [
    (np.full((1, 16), 64), "value 64 outside the codebook"),
    (np.full((1, 16), -1), "value -1 outside the codebook"),
    (np.zeros((1, 15), np.int32), r"shape \(1, 15\)"),
    (np.zeros((1, 16), np.float32), "dtype float32"),
])
def test_decode_rejects_bad_codes(tokenizer, codes, match):
  with pytest.raises(InputError, match=match):
    tokenizer.decode(codes)

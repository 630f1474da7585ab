"""Colour-factorised image codes (vq.colour_codes): the VQ's two encoders, the token layout, and
the decoder's factorised embedding and head."""

import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from cm3leon_jax import configs
from cm3leon_jax.errors import InputError
from cm3leon_jax.model.decoder import Decoder, DecoderConfig, param_count
from cm3leon_jax.tokenizers import colour_codes as cc
from cm3leon_jax.tokenizers import vq
from cm3leon_jax.tokenizers.vocab import Vocab

FACTORISED = ["vq.colour_codes=4", "vq.codebook_size=8", "vq.colour_dim=3"]


def _config(extra=()):
  return configs.load("tiny", [*FACTORISED, *extra])


def test_token_count_is_geometry_times_colour_codes():
  c = _config()
  assert cc.num_tokens(c.vq) == 32
  assert Vocab.from_config(c).image_size == 32
  assert cc.num_tokens(configs.load("tiny").vq) == configs.load("tiny").vq.codebook_size


def test_scramble_without_key_centres_each_image_on_its_mean_colour():
  x = jnp.stack([jnp.full((4, 4, 3), 0.5), jnp.full((4, 4, 3), -0.25)]).at[0, 0, 0, 0].set(1.0)
  out = np.asarray(cc.colour_scrambled(x))
  np.testing.assert_allclose(out.mean(axis=(1, 2)), 0.0, atol=1e-6)
  np.testing.assert_allclose(out[1], 0.0, atol=1e-6)  # a flat image has no colour left
  # Image 0 is 0.5 everywhere but one red channel at 1.0: its mean red is 0.5 + 0.5 / 16.
  np.testing.assert_allclose(out[0, 0, 0], [0.5 - 0.5 / 16, 0.0, 0.0], atol=1e-6)
  np.testing.assert_allclose(out[0, 1, 1], [-0.5 / 16, 0.0, 0.0], atol=1e-6)


def test_scramble_keeps_colour_distances_up_to_one_scale_per_image():
  """A rotation moves hues but keeps every colour difference's length, so edges stay visible;
  the one random scale per image multiplies all of them alike."""
  x = jax.random.uniform(jax.random.key(0), (2, 4, 4, 3), minval=-1, maxval=1)
  out = cc.colour_scrambled(x, jax.random.key(1))
  for b in range(2):
    before = np.asarray(x[b]).reshape(-1, 3)
    after = np.asarray(out[b]).reshape(-1, 3)
    d0 = np.linalg.norm(before[:, None] - before[None], axis=-1)
    d1 = np.linalg.norm(after[:, None] - after[None], axis=-1)
    ratio = d1[d0 > 1e-3] / d0[d0 > 1e-3]
    np.testing.assert_allclose(ratio, ratio[0], rtol=1e-4)
    assert 0.6 <= ratio[0] <= 1.4
  # ...but not the colours themselves: the hue is gone.
  assert np.abs(np.asarray(out) - np.asarray(cc.colour_scrambled(x))).max() > 0.1


def test_colour_encoder_ignores_where_in_a_cell_a_colour_lies():
  c = _config().vq
  enc = cc.ColourEncoder(c, rngs=nnx.Rngs(0))
  x = jax.random.uniform(jax.random.key(2), (1, c.image_size, c.image_size, 3), minval=-1)
  f = c.downsample
  # Reverse the pixels inside every f x f cell: same colours per cell, other places.
  cells = x.reshape(1, c.image_size // f, f, c.image_size // f, f, 3)
  flipped = cells[:, :, ::-1, :, ::-1].reshape(x.shape)
  np.testing.assert_allclose(np.asarray(enc(flipped)), np.asarray(enc(x)), atol=1e-6)
  # A different colour in one cell changes that cell's output only.
  changed = np.asarray(enc(x.at[0, 0, 0].set(1.0)))
  same = np.asarray(enc(x))
  assert np.abs(changed[0, 0, 0] - same[0, 0, 0]).max() > 0
  np.testing.assert_allclose(changed[0, 1:], same[0, 1:], atol=1e-6)


def test_tokens_pack_geometry_and_colour_codes_and_decode_back_to_their_latents():
  c = _config().vq
  model = vq.VQModel(c, rngs=nnx.Rngs(0))
  x = jax.random.uniform(jax.random.key(3), (2, c.image_size, c.image_size, 3), minval=-1)
  q = model.quantize(x)
  codes = np.asarray(q.codes_BN)
  assert codes.min() >= 0 and codes.max() < 32 and model.codebook_size == 32
  np.testing.assert_array_equal(codes % 4, np.asarray(q.colour.codes_BN))
  # The latents rebuilt from the tokens are what the decoder saw in the forward pass.
  np.testing.assert_allclose(np.asarray(model.codes_to_latents(q.codes_BN)),
                             np.asarray(q.zq_BhwD), atol=1e-6)
  assert q.zq_BhwD.shape[-1] == c.code_dim + c.colour_dim


def test_colour_dim_below_one_is_refused():
  with pytest.raises(InputError, match="vq.colour_dim"):
    vq.VQModel(_config(["vq.colour_dim=0"]).vq, rngs=nnx.Rngs(0))


def test_checkpoint_of_joint_codes_refused_for_a_factorised_config(tmp_path):
  with open(os.path.join(tmp_path, vq.CONFIG_FILE), "w") as f:
    json.dump(vq.arch_dict(configs.load("tiny").vq), f)
  with pytest.raises(InputError, match="vq.colour_codes: checkpoint 0, config 4"):
    vq.check_checkpoint_config(str(tmp_path), _config().vq)


def _decoder():
  cfg = DecoderConfig.from_config(_config())
  model = Decoder(cfg, rngs=nnx.Rngs(0))
  model.image_geo_embed[...] = jax.random.normal(jax.random.key(4), model.image_geo_embed.shape)
  model.image_colour_embed[...] = jax.random.normal(jax.random.key(5),
                                                    model.image_colour_embed.shape)
  return cfg, model


def test_an_image_token_is_embedded_as_its_geometry_plus_its_colour_vector():
  cfg, model = _decoder()
  table = np.asarray(model.token_table())
  g, col = 5, 3
  row = table[cfg.image_start + g * 4 + col]
  np.testing.assert_allclose(row, np.asarray(model.image_geo_embed[...][g]
                                             + model.image_colour_embed[...][col]), rtol=1e-6)
  # Text and special rows are the plain embedding's.
  np.testing.assert_array_equal(table[:cfg.image_start],
                                np.asarray(model.embed[...])[:cfg.image_start])
  assert table.shape == (cfg.vocab_size, cfg.d_model)


def test_factorised_head_gives_the_full_tied_head_logits():
  cfg, model = _decoder()
  x = jax.random.normal(jax.random.key(6), (2, 3, cfg.d_model))
  np.testing.assert_allclose(np.asarray(model.logits(x)),
                             np.asarray(model.logits(x, model.head_weight())), atol=1e-4)


def test_factorised_codes_need_the_tied_head():
  with pytest.raises(InputError, match="tie_embeddings"):
    DecoderConfig.from_config(_config(["model.tie_embeddings=False"]))


def test_parameter_count_includes_the_factor_tables():
  cfg, model = _decoder()
  n = sum(np.size(v) for v in jax.tree.leaves(nnx.state(model, nnx.Param)))
  assert param_count(cfg) == n


def test_flops_count_the_head_rows_actually_multiplied():
  from cm3leon_jax.train.flops import forward_flops_per_token, head_rows
  cfg = DecoderConfig.from_config(_config())
  joint = DecoderConfig.from_config(configs.load("tiny", ["vq.codebook_size=32"]))
  assert cfg.vocab_size == joint.vocab_size  # the same 32 image ids
  assert head_rows(joint) == joint.vocab_size
  assert head_rows(cfg) == cfg.vocab_size - 32 + 8 + 4
  assert (forward_flops_per_token(joint) - forward_flops_per_token(cfg)
          == 2 * cfg.d_model * (32 - 12))


def test_loss_terms_without_logits_equal_those_from_the_full_logits():
  """log Z and the target's logit from G + C image rows equal logsumexp and the gather over
  the full [B, L, V] logits, for text, image, special and padding-row targets."""
  cfg, model = _decoder()
  x = jax.random.normal(jax.random.key(7), (1, 5, cfg.d_model))
  targets = jnp.array([[1, cfg.image_start, cfg.image_start + 29, cfg.image_start - 1,
                        cfg.vocab_size - 1]])
  log_z, target_logit = model.log_z_and_target_logit(x, targets)
  logits = np.asarray(model.logits(x, model.head_weight()), np.float64)
  want_z = np.log(np.exp(logits).sum(-1))
  np.testing.assert_allclose(np.asarray(log_z), want_z, rtol=1e-5)
  np.testing.assert_allclose(np.asarray(target_logit),
                             np.take_along_axis(logits, np.asarray(targets)[..., None], -1)[..., 0],
                             rtol=1e-5, atol=1e-5)


def _sampler_model():
  """A factorised tiny decoder with scaled weights, so logits depend on the context."""
  cfg, model = _decoder()
  model.embed[...] = jax.random.normal(jax.random.key(10), model.embed.shape)
  for i, name in enumerate(("wq", "wk", "wv", "wo", "w_in", "w_out")):
    p = getattr(model.layers, name)
    p[...] = jax.random.normal(jax.random.key(i), p.shape) / np.sqrt(p.shape[1])
  return cfg, model


def _text_to_image(model, vocab, image_head, **knobs):
  from cm3leon_jax.configs.base import tokens_per_image
  from cm3leon_jax.decode import prompts as P
  from cm3leon_jax.decode.sampler import SamplerSpec, generate, make_knobs
  n = tokens_per_image(_config())
  pr = [P.text_to_image(vocab, np.array(c)) for c in ((40, 41, 42), (50, 51))]
  spec = SamplerSpec(num_streams=2, max_new_tokens=n + 1, tokens_per_image=n,
                     stop_after_image=True, image_head=image_head)
  return generate(model, vocab, [[p.cond for p in pr], [p.uncond for p in pr]], spec,
                  make_knobs(2, **knobs), jax.random.key(4))[0], n


def test_sampling_geometry_and_colour_apart_keeps_the_joint_greedy_image():
  """Inside an image the factorised sampler guides and picks g and c apart; with guidance and
  greedy picks that is the joint argmax, as the whole-vocabulary path (image_head=False)
  computes it over the G x C ids."""
  _, model = _sampler_model()
  vocab = Vocab.from_config(_config())
  apart, n = _text_to_image(model, vocab, True, temperature=0.0, cfg_weight=2.0)
  joint, _ = _text_to_image(model, vocab, False, temperature=0.0, cfg_weight=2.0)
  np.testing.assert_array_equal(apart, joint)
  assert vocab.is_image(apart[:, :n]).all() and (apart[:, n] == vocab.break_id).all()
  # (A random model's greedy image is nearly one repeated token; the rows still differ.)
  assert len(set(apart[:, :n].ravel().tolist())) > 1


def test_factorised_sampling_draws_every_image_token_and_both_factors_vary():
  _, model = _sampler_model()
  vocab = Vocab.from_config(_config())
  out, n = _text_to_image(model, vocab, True, temperature=5.0, cfg_weight=2.0, top_p=0.9,
                          use_cdk=[True, False])
  codes = out[:, :n] - vocab.image_start
  assert vocab.is_image(out[:, :n]).all() and (out[:, n] == vocab.break_id).all()
  assert len(set((codes // 4).ravel().tolist())) > 1 and len(set((codes % 4).ravel().tolist())) > 1


def test_a_joint_code_checkpoint_from_before_colour_codes_still_loads_its_config(tmp_path):
  saved = {k: v for k, v in vq.arch_dict(configs.load("tiny").vq).items()
           if k not in ("colour_codes", "colour_dim")}  # what older train-vq runs wrote
  with open(os.path.join(tmp_path, vq.CONFIG_FILE), "w") as f:
    json.dump(saved, f)
  vq.check_checkpoint_config(str(tmp_path), configs.load("tiny").vq)  # no error
  with pytest.raises(InputError, match="vq.colour_codes"):
    vq.check_checkpoint_config(str(tmp_path), _config().vq)

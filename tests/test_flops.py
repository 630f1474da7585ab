"""Analytic FLOPs and MFU (cm3leon_jax/train/flops.py) against hand-computed values and XLA."""

import jax
import jax.numpy as jnp
import pytest
from flax import nnx

from cm3leon_jax import configs
from cm3leon_jax.model.decoder import Decoder, DecoderConfig
from cm3leon_jax.train import flops


def cfg_of(preset, *overrides):
  return DecoderConfig.from_config(configs.load(preset, list(overrides)))


def test_tiny_flops_by_hand():
  cfg = cfg_of("tiny")  # 2 layers, d 64, 2x32 heads, ff 256, vocab 512, seq 128
  matmul_params = 2 * (4 * 64 * 64 + 2 * 64 * 256) + 64 * 512  # 131,072
  attention = 2 * (2 * 2 * 64 * 64)  # layers * (qk + pv) * 2 FLOPs * inner * ctx (128 / 2)
  assert flops.forward_flops_per_token(cfg) == 2 * matmul_params + attention == 294_912
  assert flops.train_flops_per_token(cfg) == 884_736
  assert flops.train_flops_per_step(cfg, global_batch=8) == 884_736 * 8 * 128


def test_bench_preset_flops_by_hand():
  cfg = cfg_of("bench")  # 8 layers, d 512, ff 2048, vocab 16384, seq 1024
  forward = 2 * (8 * (4 * 512 * 512 + 2 * 512 * 2048) + 512 * 16384) + 8 * 4 * 512 * 512
  assert forward == 75_497_472
  assert flops.train_flops_per_token(cfg) == 3 * forward


def test_swiglu_counts_a_third_mlp_matrix():
  relu, swiglu = cfg_of("tiny"), cfg_of("tiny", "model.activation=swiglu")
  assert flops.forward_flops_per_token(swiglu) - flops.forward_flops_per_token(relu) == (
      2 * 2 * 64 * 256)


def test_7b_preset_is_about_6_n_per_token():
  cfg = cfg_of("cm3leon_7b")
  per_token = flops.train_flops_per_token(cfg)
  n = 32 * 12 * 4096 ** 2 + 4096 * cfg.vocab_size  # non-embedding params + tied head
  assert per_token == pytest.approx(6 * n + 3 * 32 * 4 * 4096 * 2048)
  assert 4.0e10 < per_token < 5.0e10


def test_analytic_forward_is_within_5_percent_of_xla_cost_analysis():
  """XLA counts every op (norms, softmax too) of full, not causal, attention."""
  cfg = cfg_of("tiny", "model.scan_layers=False")  # scan bodies are counted once by XLA
  graphdef, state = nnx.split(Decoder(cfg, rngs=nnx.Rngs(0)))
  tokens_BL = jnp.zeros((2, cfg.seq_len), jnp.int32)

  def forward(state, x):
    return nnx.merge(graphdef, state)(x, jnp.zeros_like(x), jnp.ones_like(x))
  xla = jax.jit(forward).lower(state, tokens_BL).compile().cost_analysis()["flops"]
  analytic = flops.forward_flops_per_token(cfg, causal=False) * tokens_BL.size
  assert xla == pytest.approx(analytic, rel=0.05)


def test_mfu_and_peaks():
  assert flops.mfu(1e12, 2.0, 4, 250e9) == pytest.approx(0.5)
  assert flops.mfu(1e12, 2.0, 4, None) is None
  assert flops.chip_peak_flops("TPU v5 lite") == 197e12
  assert flops.chip_peak_flops("TPU v5p") == 459e12
  assert flops.chip_peak_flops("NVIDIA H100 80GB HBM3") == 989e12
  assert flops.chip_peak_flops("NVIDIA H100 PCIe") == 756e12
  assert flops.chip_peak_flops("something new") is None

"""Analytic training FLOPs of the decoder, chip peaks, and model FLOPs utilisation (MFU).

Per token, forward (multiply-add = 2 FLOPs):
  matmuls    2 * (num_layers * (4 * d_model * heads * head_dim + m * d_model * d_ff)
                  + d_model * head_rows)           m = 2 (relu / gelu) or 3 (swiglu)
             head_rows = vocab, or with colour-factorised image codes (G x C ids) vocab - G x C
             + G + C (the head scores geometry and colour codes apart, model/decoder.py)
  attention  num_layers * 2 * 2 * heads * head_dim * ctx    (q.k and p.v over ctx keys)
             with ctx = seq_len / 2 for causal attention (the average visible prefix, what a
             block-skipping kernel computes), seq_len without the causal discount.
Training = 3 x forward (backward = 2 x forward). Rematerialisation's extra forward is not
counted: MFU measures useful model FLOPs (the PaLM definition). Embedding lookups, norms and
softmax are left out as usual.

MFU = FLOPs per step / (step seconds * devices * peak FLOP/s per device). The peak comes from
PEAK_FLOPS (bf16 dense, per chip) or, on CPU, from a float32 matmul measured on this machine.
"""

from __future__ import annotations

import functools
import time

import jax
import jax.numpy as jnp
import numpy as np

from cm3leon_jax.model.decoder import DecoderConfig

# bf16 dense peak FLOP/s per chip, matched against `device.device_kind` (lowercase substring,
# first match wins, so more specific names come first).
PEAK_FLOPS = (
    ("v6 lite", 918e12), ("v6e", 918e12),
    ("v5 lite", 197e12), ("v5e", 197e12), ("v5p", 459e12), ("tpu v5", 459e12),
    ("v4", 275e12),
    ("h100 pcie", 756e12), ("h100", 989e12), ("h200", 989e12), ("h800", 989e12),
    ("gh200", 989e12), ("b200", 2250e12),
    ("a100", 312e12), ("l4", 121e12), ("a10g", 125e12),
)


def head_rows(cfg: DecoderConfig) -> int:
  """Rows of the LM head's product: the vocabulary, less G x C + G + C when image codes are
  colour-factorised (G x C ids scored from G + C rows)."""
  if not cfg.image_colour_codes:
    return cfg.vocab_size
  image = cfg.image_end - cfg.image_start
  return cfg.vocab_size - image + image // cfg.image_colour_codes + cfg.image_colour_codes


def forward_flops_per_token(cfg: DecoderConfig, causal: bool = True) -> float:
  inner = cfg.num_heads * cfg.head_dim
  mlp_mats = 3 if cfg.activation == "swiglu" else 2
  matmul = 2 * (cfg.num_layers * (4 * cfg.d_model * inner + mlp_mats * cfg.d_model * cfg.d_ff)
                + cfg.d_model * head_rows(cfg))
  ctx = cfg.seq_len / 2 if causal else cfg.seq_len
  attention = cfg.num_layers * 2 * 2 * inner * ctx
  return float(matmul + attention)


def train_flops_per_token(cfg: DecoderConfig, causal: bool = True) -> float:
  return 3.0 * forward_flops_per_token(cfg, causal)


def train_flops_per_step(cfg: DecoderConfig, global_batch: int) -> float:
  """Model FLOPs of one optimizer step over `global_batch` sequences of `seq_len` tokens."""
  return train_flops_per_token(cfg) * global_batch * cfg.seq_len


def chip_peak_flops(device_kind: str) -> float | None:
  """bf16 dense peak of a chip from PEAK_FLOPS; None if unknown."""
  kind = device_kind.lower()
  for key, peak in PEAK_FLOPS:
    if key in kind:
      return peak
  return None


@functools.lru_cache(maxsize=None)
def measure_matmul_peak(n: int = 2048, dtype: str = "float32", repeats: int = 5) -> float:
  """Median FLOP/s of an n x n x n jitted matmul on the default device (what a CPU can do)."""
  key1, key2 = jax.random.split(jax.random.key(0))
  a = jax.random.normal(key1, (n, n), dtype)
  b = jax.random.normal(key2, (n, n), dtype)
  f = jax.jit(jnp.dot)
  f(a, b).block_until_ready()
  times = []
  for _ in range(repeats):
    t = time.perf_counter()
    f(a, b).block_until_ready()
    times.append(time.perf_counter() - t)
  return 2.0 * n ** 3 / float(np.median(times))


def peak_flops_per_device(device=None, measure_cpu: bool = True) -> tuple[float | None, str]:
  """(peak FLOP/s, where it came from) for `device` (default: the first device)."""
  device = device or jax.devices()[0]
  if device.platform == "cpu":
    if not measure_cpu:
      return None, "cpu (not measured)"
    # Fake CPU devices share the same cores: the measured peak is for all of them together.
    return measure_matmul_peak() / len(jax.devices("cpu")), "measured float32 matmul"
  peak = chip_peak_flops(device.device_kind)
  return peak, (f"{device.device_kind} bf16 table" if peak else f"{device.device_kind} unknown")


def mfu(flops_per_step: float, step_seconds: float, num_devices: int,
        peak_per_device: float | None) -> float | None:
  """Model FLOPs utilisation in [0, 1] (None without a peak)."""
  if not peak_per_device or step_seconds <= 0:
    return None
  return flops_per_step / (step_seconds * num_devices * peak_per_device)

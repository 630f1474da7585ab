"""The decoding benchmark script runs end to end on a tiny shape (so it cannot rot)."""

import importlib.util
import os
import sys

import pytest

SCRIPT = os.path.join(os.path.dirname(__file__), "..", "experiments", "bench", "decode.py")


def _load_script():
  spec = importlib.util.spec_from_file_location("bench_decode", SCRIPT)
  module = importlib.util.module_from_spec(spec)
  sys.modules[spec.name] = module  # dataclasses look their module up there
  spec.loader.exec_module(module)
  return module


@pytest.mark.slow
def test_decode_benchmark_runs_on_the_tiny_preset(capsys):
  bench = _load_script()
  argv = ["--config", "tiny", "--batches", "1", "--repeats", "1", "--bandwidth",
          "--bandwidth-config", "tiny"]
  if not bench._torch_available():
    argv.append("--no-torch")
  result = bench.main(argv)
  vocab, n = result["vocab"], result["tokens_per_image"]
  assert n == 16
  rows = result["rows"]
  assert [(r.batch, r.guided) for r in rows] == [(1, False), (1, True)]
  for row in rows:
    # Each timed run wrote one whole image (N image ids) and its closing <break>.
    assert row.tokens.shape == (1, n + 1)
    assert vocab.is_image(row.tokens[:, :n]).all()
    assert (row.tokens[:, n] == vocab.break_id).all()
    assert row.jax_tok_s > 0 and row.jax_compile_s > 0
    assert (row.torch_s is None) == (not bench._torch_available())
  assert result["bandwidth"]["ms_per_token"] > 0
  out = capsys.readouterr().out
  assert "JAX tok/s" in out and "Bandwidth check" in out


def test_bandwidth_table_knows_the_hopper_chips():
  bench = _load_script()
  assert bench.bandwidth_of("NVIDIA H100 80GB HBM3") == 3.35e12
  assert bench.bandwidth_of("NVIDIA H200") == 4.8e12
  assert bench.bandwidth_of("NVIDIA H100 PCIe") == 2.0e12
  assert bench.bandwidth_of("cpu") is None


def test_seq_len_is_raised_only_when_prompt_and_image_do_not_fit():
  bench = _load_script()
  from cm3leon_jax import configs
  config = configs.load("bench")  # seq 1024: 32 + 1025 tokens need 1088
  assert bench._seq_len_for(config, 32, 1025) == ["model.seq_len=1088"]
  assert bench._seq_len_for(config, 32, 992) == []

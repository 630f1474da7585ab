"""The fused-kernel benchmark's decode part runs end to end on the tiny preset (cannot rot)."""

import importlib.util
import os
import sys

import pytest

SCRIPT = os.path.join(os.path.dirname(__file__), "..", "experiments", "bench", "matvec.py")


def _load_script():
  spec = importlib.util.spec_from_file_location("bench_matvec", SCRIPT)
  module = importlib.util.module_from_spec(spec)
  sys.modules[spec.name] = module
  spec.loader.exec_module(module)
  return module


@pytest.mark.slow
def test_matvec_benchmark_decode_part_runs_on_the_tiny_preset(capsys):
  bench = _load_script()
  from cm3leon_jax.model import matvec as MV
  result = bench.main(["--parts", "decode", "--config", "tiny", "--check-config", "tiny",
                       "--decode-repeats", "1", "--modes", "xla", "pallas+attention",
                       "--tilings", "512:8:256"])
  decode = result["decode"]
  # bf16 rounding only (the same math)
  assert set(decode["logit_diff"]) == {"pallas+attention"}
  assert decode["logit_diff"]["pallas+attention"] < 0.05
  assert decode["xla"]["ms_per_token"] > 0 and decode["pallas 512:8:256"]["ms_per_token"] > 0
  assert decode["pallas+attention"]["ms_per_token"] > 0
  # The sweep leaves the kernels' default tiling as it found it.
  assert (MV.TARGET_PROGRAMS, MV.NUM_WARPS, MV.CHUNK_ELEMENTS) == bench.DEFAULT_TILING
  out = capsys.readouterr().out
  assert "tiling 512:8:256" in out and "max |logit xla - logit pallas+attention|" in out

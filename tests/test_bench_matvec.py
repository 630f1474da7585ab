"""The fused-kernel benchmark's decode part runs end to end on the tiny preset (cannot rot)."""

import pytest

from cm3leon_jax.model import matvec as MV
from experiments.bench import matvec as bench


@pytest.mark.slow
def test_matvec_benchmark_decode_part_runs_on_the_tiny_preset(capsys):
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

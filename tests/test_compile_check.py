"""tpu/compile_check.py: the real train step of cm3leon_350m compiles ahead of time for a
16-chip TPU v5e slice (libtpu's compiler on this CPU host) and fits the chip's 16 GiB."""

import os
import re
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def chosen_350m_row(*flags: str) -> list[str]:
  """The cells of the last cm3leon_350m row compile_check prints for these flags."""
  pytest.importorskip("libtpu", reason="pip install libtpu (requirements-dev) for AOT compiles")
  env = {k: v for k, v in os.environ.items() if k not in ("JAX_PLATFORMS", "XLA_FLAGS")}
  out = subprocess.run(
      [sys.executable, "tpu/compile_check.py", "--config", "cm3leon_350m", "--topology",
       "v5e:4x4", "--micro-batch", "1", "--remat", "dots_saveable", *flags],
      cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
  assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-3000:]
  rows = [line for line in out.stdout.splitlines() if line.startswith("| cm3leon_350m")]
  return [c.strip() for c in rows[-1].strip("|").split("|")]


@pytest.mark.slow
def test_350m_train_step_compiles_for_v5e_and_fits_hbm():
  cells = chosen_350m_row()
  assert cells[1:5] == ["v5e:4x4", "16", "(1, 16, 1)", "1 x 128"]
  memory, hbm, fits = float(cells[6]), float(cells[7]), cells[8]
  assert 1.0 < memory < 0.9 * hbm and fits == "yes"
  assert float(cells[9]) > 0  # XLA counted FLOPs
  assert re.fullmatch(r"[\d.]+", cells[10])


@pytest.mark.slow
def test_350m_train_step_compiles_for_two_v5e_slices_with_data_across_slices():
  cells = chosen_350m_row("--num-slices", "2")
  # 32 chips; data = 2 (one row per slice), fsdp = 16 inside each slice; the batch of 2,048
  # sequences is 32 shards x microbatches of 1 x 64 accumulation steps.
  assert cells[1:5] == ["2 x v5e:4x4", "32", "(2, 16, 1)", "1 x 64"]
  assert 1.0 < float(cells[6]) < 0.9 * float(cells[7]) and cells[8] == "yes"


def _compile_check_module():
  sys.path.insert(0, os.path.join(ROOT, "tpu"))
  try:
    import compile_check
  finally:
    sys.path.pop(0)
  return compile_check


def test_override_reaches_the_compiled_config_beside_the_plan(monkeypatch):
  """`--override model.scan_layers=true` changes the config the train step is built from; the
  plan's own fields (attention, remat, accumulation) still apply. Stopped before compiling."""
  cc = _compile_check_module()
  import jax
  from jax.sharding import Mesh
  import numpy as np
  seen = {}
  monkeypatch.setattr(cc, "tpu_mesh", lambda topology, mesh_config, num_slices=1: Mesh(
      np.array(jax.devices()[:1]).reshape(1, 1, 1), cc.MESH_AXES))

  def stop(config, mesh):
    seen["config"] = config
    raise RuntimeError("stop before compiling")

  monkeypatch.setattr(cc, "abstract_train_state", stop)
  with pytest.raises(RuntimeError, match="stop before compiling"):
    cc.compile_one("cm3leon_350m", "v5e:4x4", 1, "dots_saveable",
                   overrides=["model.scan_layers=true"])
  config = seen["config"]
  assert config.model.scan_layers is True
  assert (config.model.attention, config.model.remat_policy) == ("splash", "dots_saveable")
  assert config.train.grad_accum == 2048  # one device: the whole batch in microbatches of 1


def test_a_bad_override_is_named_before_anything_compiles():
  cc = _compile_check_module()
  from cm3leon_jax.errors import InputError
  with pytest.raises(InputError, match="no_such_field"):
    cc.main(["--config", "cm3leon_350m", "--topology", "v5e:4x4",
             "--override", "model.no_such_field=1"])

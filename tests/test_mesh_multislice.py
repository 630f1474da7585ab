"""Multislice meshes (train/mesh.py): across TPU slices the data axis is split over the slices
(DCN) and fsdp / tensor stay inside one slice (ICI); off TPU, processes stand in for slices.

The TPU cases use libtpu's compile-only devices of two v5e 4x4 slices (32 chips, each with
its `slice_index`), built in a subprocess so libtpu never loads into the test process."""

import json
import os
import subprocess
import sys

import jax
import pytest

from cm3leon_jax import configs
from cm3leon_jax.errors import InputError
from cm3leon_jax.train import trainer
from cm3leon_jax.train.mesh import make_mesh

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

LAYOUTS = r"""
import json, os, sys
import numpy as np
from jax.experimental import topologies
from cm3leon_jax import configs
from cm3leon_jax.errors import InputError
from cm3leon_jax.train.mesh import make_mesh
topo = topologies.get_topology_desc("v5e:4x4", "tpu", num_slices=2)
out = {}
for overrides in json.loads(sys.argv[1]):
  try:
    mesh = make_mesh(configs.load("tiny", overrides).mesh, topo.devices)
  except InputError as e:
    out[" ".join(overrides)] = {"error": str(e)}
    continue
  slices = np.vectorize(lambda d: d.slice_index)(mesh.devices)
  out[" ".join(overrides)] = {"shape": list(mesh.devices.shape),
                              "slices": slices.reshape(slices.shape[0], -1).tolist()}
print(json.dumps(out))
"""


@pytest.fixture(scope="module")
def layouts():
  pytest.importorskip("libtpu", reason="pip install libtpu (requirements-dev) for TPU topologies")
  cases = [["mesh.data=2", "mesh.fsdp=-1"], ["mesh.data=4", "mesh.fsdp=-1", "mesh.tensor=2"],
           ["mesh.data=1", "mesh.fsdp=-1"], ["mesh.num_slices=4"]]
  env = {k: v for k, v in os.environ.items() if k not in ("JAX_PLATFORMS", "XLA_FLAGS")}
  env.update(ALLOW_MULTIPLE_LIBTPU_LOAD="1", PYTHONPATH=ROOT)
  out = subprocess.run([sys.executable, "-c", LAYOUTS, json.dumps(cases)], cwd=ROOT, env=env,
                       capture_output=True, text=True, timeout=300)
  assert out.returncode == 0, out.stderr[-3000:]
  return json.loads(out.stdout.strip().splitlines()[-1])


def test_two_slices_split_the_data_axis_and_keep_fsdp_inside_a_slice(layouts):
  two = layouts["mesh.data=2 mesh.fsdp=-1"]
  assert two["shape"] == [2, 16, 1]
  assert two["slices"] == [[0] * 16, [1] * 16]  # data row i: all 16 fsdp devices in slice i


def test_four_data_rows_over_two_slices_take_two_rows_per_slice(layouts):
  four = layouts["mesh.data=4 mesh.fsdp=-1 mesh.tensor=2"]
  assert four["shape"] == [4, 4, 2]
  assert four["slices"] == [[0] * 8, [0] * 8, [1] * 8, [1] * 8]


def test_a_data_axis_smaller_than_the_slice_count_is_an_input_error(layouts):
  assert "data=1 must be a multiple of the 2 slices" in layouts["mesh.data=1 mesh.fsdp=-1"]["error"]


def test_a_slice_count_the_devices_contradict_is_an_input_error(layouts):
  assert "num_slices=4, but the devices belong to 2 TPU slices" in (
      layouts["mesh.num_slices=4"]["error"])


def test_without_slices_num_slices_must_match_the_process_count():
  with pytest.raises(InputError, match="num_slices=2: without TPU slices the processes"):
    make_mesh(configs.load("tiny", ["mesh.num_slices=2"]).mesh)
  with pytest.raises(InputError, match="num_slices=-1"):
    make_mesh(configs.load("tiny", ["mesh.num_slices=-1"]).mesh)
  assert make_mesh(configs.load("tiny", ["mesh.num_slices=1"]).mesh).shape["data"] == 8


@pytest.mark.parametrize("env, called", [
    ({}, False),
    ({"TPU_WORKER_HOSTNAMES": "10.0.0.2"}, False),  # one TPU VM: nothing to join
    ({"TPU_WORKER_HOSTNAMES": "10.0.0.2,10.0.0.3"}, True),  # a pod slice of two workers
    ({"MEGASCALE_NUM_SLICES": "2"}, True),  # multislice, even of single-host slices
    ({"CM3LEON_DISTRIBUTED": "1"}, True),  # tpu/pod.py: the worker list may be in metadata
    ({"SLURM_NTASKS": "4"}, True),
])
def test_distributed_initialize_runs_when_the_environment_has_several_processes(
    monkeypatch, env, called):
  for key in ("JAX_COORDINATOR_ADDRESS", "TPU_WORKER_HOSTNAMES", "MEGASCALE_NUM_SLICES",
              "CM3LEON_DISTRIBUTED", "SLURM_NTASKS"):
    monkeypatch.delenv(key, raising=False)
  for key, value in env.items():
    monkeypatch.setenv(key, value)
  calls = []
  monkeypatch.setattr(jax.distributed, "initialize", lambda **kw: calls.append(kw))
  monkeypatch.setattr(jax.config, "update", lambda *a: None)
  trainer.maybe_initialize_distributed()
  assert calls == ([{}] if called else [])

"""Two real JAX processes on this machine (gloo CPU collectives, 2 CPU devices each) run
`cm3leon train` on the project's data together: one 4-device mesh, each process feeding its
own half of the global batch, one shared Orbax checkpoint that a single process restores.
The training run treats the processes as the mesh's slices (`mesh.num_slices=2`: the data
axis across processes, fsdp inside each), the multislice layout of train/mesh.py."""

import json
import os
import socket
import subprocess
import sys

import jax
import numpy as np
import pytest
from flax import nnx

from cm3leon_jax import configs
from cm3leon_jax.train.checkpoint import Checkpointer
from cm3leon_jax.train.mesh import make_mesh
from cm3leon_jax.train.state import abstract_train_state
from tests.test_trainer import OVERRIDES, write_project_data

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def free_port() -> int:
  with socket.socket() as s:
    s.bind(("localhost", 0))
    return s.getsockname()[1]


def run_two_processes(args: list[str], env: dict,
                      extra: tuple[list[str], list[str]] = ([], [])) -> list[str]:
  """Run `args extra[i] --process-id i` for i = 0, 1 side by side; both must exit 0. Their
  outputs."""
  procs = [subprocess.Popen(args + extra[i] + ["--process-id", str(i)], env=env, cwd=ROOT,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
           for i in range(2)]
  outputs = []
  for p in procs:
    try:
      outputs.append(p.communicate(timeout=300)[0])
    except subprocess.TimeoutExpired:
      for q in procs:
        q.kill()
      raise
  for p, out in zip(procs, outputs):
    assert p.returncode == 0, out[-3000:]
  return outputs


ENV = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONPATH=ROOT,
           XLA_FLAGS="--xla_force_host_platform_device_count=2")


def train_args(workdir: str, port: int, *overrides: str) -> list[str]:
  """`cm3leon train` of the tiny preset on two processes, the data axis across them."""
  return [sys.executable, "-m", "cm3leon_jax", "train", "--config", "tiny",
          f"--config.workdir={workdir}", *OVERRIDES, *overrides,
          "--config.mesh.data=2", "--config.mesh.fsdp=-1", "--config.mesh.num_slices=2",
          "--no-progress", "--coordinator", f"localhost:{port}", "--num-processes", "2"]


@pytest.mark.slow
def test_two_processes_train_and_checkpoint(tmp_path):
  workdir = str(tmp_path / "run")
  write_project_data(workdir)
  outputs = run_two_processes(train_args(workdir, free_port(), "--config.train.steps=3"), ENV)
  assert "train: step 3/3" in outputs[0]  # process 0 reports; process 1 stays quiet
  assert "train: step" not in outputs[1]

  with open(os.path.join(workdir, "decoder", "metrics.jsonl")) as f:
    records = [json.loads(line) for line in f]
  assert [r["step"] for r in records] == [1, 2, 3]
  assert all(np.isfinite(r["loss"]) and r["tokens"] > 0 for r in records)

  # The checkpoint written by both processes restores in this single process (8 devices).
  config = configs.load("tiny", [f"workdir={workdir}", *(o[9:] for o in OVERRIDES),
                                 "train.steps=3"])
  ckpt = Checkpointer(os.path.join(workdir, "decoder", "checkpoints"), config)
  assert ckpt.all_steps() == [2, 3]
  state = ckpt.restore(abstract_train_state(config, make_mesh(config.mesh)))
  ckpt.close()
  assert int(state[1]["step"][...]) == 3
  assert all(np.isfinite(np.asarray(x)).all() for x in jax.tree.leaves(nnx.to_pure_dict(state)))
  data_files = os.listdir(os.path.join(workdir, "decoder", "checkpoints", "3", "data"))
  assert len([f for f in data_files if f.startswith("process_")]) == 2  # one iterator per host


@pytest.mark.slow
def test_two_processes_export_one_bundle_that_one_process_loads(tmp_path):
  """`cm3leon export` on a 2-host mesh: each process reads and writes its parameter shards;
  the bundle equals the checkpoint's parameters when loaded by a single process."""
  from cm3leon_jax import cli, export
  from cm3leon_jax.train.checkpoint import Checkpointer as C
  from cm3leon_jax.train.state import abstract_model
  workdir = str(tmp_path / "run")
  write_project_data(workdir)
  common = ["--config", "tiny", f"--config.workdir={workdir}", *OVERRIDES,
            "--config.data.num_train=32", "--config.vq.steps=1", "--config.train.steps=2"]
  for argv in (["train", "--no-progress"], ["data", "build", "shapes"], ["train-text-tokenizer"],
               ["train-vq"]):
    assert cli.main([argv[0], *common, *argv[1:]]) == 0, argv
  out = str(tmp_path / "bundle")
  port = free_port()
  args = [sys.executable, "-m", "cm3leon_jax", "export", *common, "--config.mesh.data=1",
          "--config.mesh.fsdp=-1", "--no-retrieval", "--out", out,
          "--coordinator", f"localhost:{port}", "--num-processes", "2"]
  outputs = run_two_processes(args, ENV)
  assert "export: decoder step 2" in outputs[0] and "export:" not in outputs[1]

  export.verify(out, checksums=True)
  loaded = nnx.to_pure_dict(nnx.state(export.load_model(export.load_config(out))))
  config = configs.load("tiny", [f"workdir={workdir}", *(o[9:] for o in common[3:])])
  ckpt = C(os.path.join(workdir, "decoder", "checkpoints"), config)
  saved = nnx.to_pure_dict(ckpt.restore_params(abstract_model(config, make_mesh(config.mesh))[1]))
  ckpt.close()
  for a, b in zip(jax.tree.leaves(loaded), jax.tree.leaves(saved)):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


@pytest.mark.slow
def test_two_processes_take_process_0s_time_budget(tmp_path):
  """`train.time_budget_s`: the run's length is process 0's decision on every process. Here
  process 0's budget is spent (its run ends at the calibration's step 51) while process 1's
  would allow all 1,000 steps; both must stop at 51 together, or the collectives would hang."""
  workdir = str(tmp_path / "run")
  write_project_data(workdir)
  args = train_args(workdir, free_port(), "--config.train.steps=1000",
                    "--config.train.checkpoint_every=1000", "--config.train.log_every=50")
  outputs = run_two_processes(args, ENV, extra=(["--config.train.time_budget_s=1"],
                                                ["--config.train.time_budget_s=3600"]))
  assert "train: step 51/51 (time budget 1 s: 51 of train.steps=1000)" in outputs[0]
  with open(os.path.join(workdir, "decoder", "time_budget.json")) as f:
    assert json.load(f)["steps"] == 51
  config = configs.load("tiny", [f"workdir={workdir}", *(o[9:] for o in OVERRIDES),
                                 "train.steps=51"])
  ckpt = Checkpointer(os.path.join(workdir, "decoder", "checkpoints"), config)
  assert ckpt.all_steps() == [51]
  ckpt.close()


ENCODER_WORKER = """
import json, sys
from cm3leon_jax.train.trainer import maybe_initialize_distributed
maybe_initialize_distributed(sys.argv[1], 2, int(sys.argv[4]))
from cm3leon_jax import configs
from cm3leon_jax.retrieval import train_encoder
from tests.test_encoder import COLOURS, CORNERS, Quadrants
from cm3leon_jax.tokenizers.text import TextTokenizer
tokenizer = TextTokenizer.train([f"a {c} square at the {k}" for c in COLOURS for k in CORNERS] * 4,
                                vocab_size=300, min_frequency=1)
config = configs.load("tiny", ["retrieval.hard_negatives=1.0", "train.checkpoint_every=1000",
                               "retrieval.swap_groups=('red green blue yellow',)",
                               f"retrieval.pack_text={sys.argv[3]}"])
last = train_encoder.train(config, Quadrants(256), tokenizer, sys.argv[2], steps=3,
                           progress=False, log_every=1)
print("LAST " + json.dumps(last))
"""


@pytest.mark.slow
def test_two_processes_train_the_encoder_on_packed_texts_as_on_unpacked(tmp_path):
  """Each process packs its own captions and hard negatives (owners in the global batch's
  order, rows padded to the larger count): the same loss as one text per row."""
  losses = {}
  for packed in (True, False):
    args = [sys.executable, "-c", ENCODER_WORKER, f"localhost:{free_port()}",
            str(tmp_path / f"packed-{packed}"), str(packed)]
    outputs = run_two_processes(args, ENV, extra=(["0"], ["1"]))
    last = [json.loads(o.split("LAST ")[-1].splitlines()[0]) for o in outputs]
    assert last[0]["step"] == last[1]["step"] == 3
    assert last[0]["loss"] == last[1]["loss"]  # one global step, seen alike by both
    losses[packed] = last[0]["loss"]
  assert losses[True] == pytest.approx(losses[False], rel=1e-5)

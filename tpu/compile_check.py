"""AOT-compile the real train step of the paper presets for real TPU topologies, on this CPU host.

    pip install libtpu==0.0.42.1        # (requirements-dev.txt) the TPU compiler, no TPU needed
    python tpu/compile_check.py                                    # every preset x topology
    python tpu/compile_check.py --config cm3leon_7b --topology v5p:4x4x8
    python tpu/compile_check.py --config cm3leon_350m --topology v5e:4x4 --micro-batch 4 --remat none
    python tpu/compile_check.py --config cm3leon_350m --topology v5e:4x4 --num-slices 2
    python tpu/compile_check.py --config cm3leon_350m --override model.scan_layers=true

For each (preset, topology) it builds the ('data', 'fsdp', 'tensor') mesh over the topology's
devices, the abstract sharded train state (no parameters are allocated), and lowers and
compiles `make_train_step` (AdamW, gradient accumulation, splash attention as the real TPU
kernel) with `jax.jit(...).lower(...).compile()`. It prints per-device memory from
`memory_analysis()` against the chip's HBM, the compiled FLOPs per device from
`cost_analysis()` next to the analytic model FLOPs of the whole step, and the plan it chose.
XLA's cost analysis counts a loop body once: its number is one microbatch of one scanned layer
plus the embedding / LM head / optimizer (the splash kernel, a custom call, counts 0), not
the step; the analytic column is the whole step per device (flops.py).

Multislice (`--num-slices N`): N copies of the topology joined over DCN, the devices' slice
indices set by libtpu; the mesh comes from the trainer's own `make_mesh` (train/mesh.py): the
data axis is split across the slices (data = N), fsdp spans each slice.

The plan: the paper's global batch (train.batch_size sequences of seq_len tokens) is kept; it
is split into microbatches of `micro_batch` sequences per data x fsdp shard by gradient
accumulation. Without explicit flags, plans are tried from fastest to leanest (larger
microbatches and less rematerialisation first) until one fits in HBM_FRACTION of the chip.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import re
import sys
import time
from typing import Sequence

sys.path.insert(0, os.path.abspath(os.path.join(os.path.dirname(__file__), "..")))

# Several processes on one host may load libtpu to compile (no TPU is opened).
os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")

import jax  # noqa: E402
from jax.experimental import topologies  # noqa: E402
from jax.sharding import Mesh  # noqa: E402

from cm3leon_jax import configs  # noqa: E402
from cm3leon_jax.errors import InputError  # noqa: E402
from cm3leon_jax.model.attention import compiling_for_tpu  # noqa: E402
from cm3leon_jax.model.decoder import DecoderConfig  # noqa: E402
from cm3leon_jax.train import flops  # noqa: E402
from cm3leon_jax.train.mesh import MESH_AXES, make_mesh, mesh_shape  # noqa: E402
from cm3leon_jax.train.state import abstract_train_state  # noqa: E402
from cm3leon_jax.train.step import BATCH_DTYPES, make_train_step  # noqa: E402

GIB = 1024 ** 3
HBM_GIB = {"v4": 32, "v5e": 16, "v5p": 95, "v6e": 32}
HBM_FRACTION = 0.9  # leave room for the runtime and fragmentation
PRESETS = ("cm3leon_350m", "cm3leon_760m", "cm3leon_7b")
# Two slices per preset; 7B's fp32 params + AdamW moments (84 GB) need 64 v5e chips.
DEFAULT_TOPOLOGIES = {"cm3leon_350m": ("v5p:2x2x2", "v5e:4x4"),
                      "cm3leon_760m": ("v5p:2x2x2", "v5e:4x4"),
                      "cm3leon_7b": ("v5p:2x2x2", "v5e:8x8")}
# Plans tried in order, fastest first: (microbatch sequences per batch shard, remat policy).
PLANS = ((4, "dots_saveable"), (1, "dots_saveable"), (1, "nothing_saveable"))


@dataclasses.dataclass
class Result:
  preset: str
  topology: str
  devices: int
  mesh: tuple
  micro_batch: int
  grad_accum: int
  remat: str
  memory_gib: float
  hbm_gib: float
  compiled_tflops: float
  analytic_tflops: float
  compile_s: float

  @property
  def fits(self) -> bool:
    return self.memory_gib <= HBM_FRACTION * self.hbm_gib


def chip_of(topology: str) -> str:
  return topology.split(":")[0].split("_")[0].split("=")[0]


def tpu_mesh(topology: str, mesh_config, num_slices: int = 1) -> Mesh:
  if num_slices > 1:  # the trainer's hybrid (ICI x DCN) mesh over the slices' devices
    topo = topologies.get_topology_desc(topology_name=topology, platform="tpu",
                                        num_slices=num_slices)
    return make_mesh(mesh_config, topo.devices)
  topo = topologies.get_topology_desc(topology_name=topology, platform="tpu")
  shape = mesh_shape(mesh_config, len(topo.devices))
  physical = topologies.make_mesh(topo, shape, MESH_AXES)
  return Mesh(physical.devices, MESH_AXES, axis_types=(jax.sharding.AxisType.Auto,) * 3)


def compile_one(preset: str, topology: str, micro_batch: int, remat: str,
                num_slices: int = 1, overrides: Sequence[str] = ()) -> Result:
  mesh_overrides = (*overrides, f"mesh.data={num_slices}", "mesh.fsdp=-1", "mesh.tensor=1")
  base = configs.load(preset, list(mesh_overrides))
  mesh = tpu_mesh(topology, base.mesh, num_slices)
  label = f"{num_slices} x {topology}" if num_slices > 1 else topology  # the table's column
  shards = mesh.shape["data"] * mesh.shape["fsdp"]
  batch = base.train.batch_size
  if batch % (shards * micro_batch):
    raise InputError(f"{preset}: train.batch_size={batch} does not split into {shards} shards x "
                     f"microbatches of {micro_batch}")
  accum = batch // (shards * micro_batch)
  config = configs.load(preset, [*mesh_overrides, f"train.grad_accum={accum}",
                                 f"model.remat_policy={remat}", "model.attention=splash"])
  ts = abstract_train_state(config, mesh)
  step = make_train_step(config, ts, mesh)
  batch_sharding = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec(("data", "fsdp")))
  batch_spec = {k: jax.ShapeDtypeStruct((batch, config.model.seq_len), dtype,
                                        sharding=batch_sharding)
                for k, dtype in BATCH_DTYPES.items()}
  t = time.perf_counter()
  cfg = DecoderConfig.from_config(config)
  analytic = flops.train_flops_per_step(cfg, batch) / mesh.devices.size
  hbm = HBM_GIB.get(chip_of(topology), float("nan"))
  try:
    with jax.set_mesh(mesh), compiling_for_tpu():
      compiled = step.lower(ts.state, batch_spec).compile()
  except jax.errors.JaxRuntimeError as e:
    if "RESOURCE_EXHAUSTED" not in str(e):
      raise
    # The TPU compiler itself refuses programs whose temporaries exceed HBM.
    needed = re.search(r"required for HLO temporaries \(([\d.]+)G\)", str(e))
    return Result(preset, label, mesh.devices.size, tuple(mesh.shape.values()), micro_batch,
                  accum, remat, float(needed.group(1)) if needed else float("inf"), hbm,
                  float("nan"), analytic / 1e12, time.perf_counter() - t)
  compile_s = time.perf_counter() - t
  mem = compiled.memory_analysis()
  per_device = (mem.argument_size_in_bytes + mem.output_size_in_bytes
                - mem.alias_size_in_bytes + mem.temp_size_in_bytes)
  cost = compiled.cost_analysis()
  cost = cost[0] if isinstance(cost, (list, tuple)) else cost
  return Result(preset, label, mesh.devices.size, tuple(mesh.shape.values()), micro_batch,
                accum, remat, per_device / GIB, hbm, float(cost.get("flops", 0.0)) / 1e12,
                analytic / 1e12, compile_s)


def fit(preset: str, topology: str, plans=PLANS, num_slices: int = 1,
        overrides: Sequence[str] = ()) -> Result:
  """The first plan (fastest first) whose per-device memory fits the chip's HBM."""
  result = None
  for micro_batch, remat in plans:
    result = compile_one(preset, topology, micro_batch, remat, num_slices, overrides)
    print(format_row(result), flush=True)
    if result.fits:
      return result
  return result


HEADER = ("| preset | topology | chips | mesh (data, fsdp, tensor) | micro-batch x accum | remat "
          "| memory / device GiB | HBM GiB | fits | XLA TFLOP / device (loop bodies once) "
          "| analytic TFLOP / device / step | compile s |")


def format_row(r: Result) -> str:
  return (f"| {r.preset} | {r.topology} | {r.devices} | {r.mesh} | {r.micro_batch} x "
          f"{r.grad_accum} | {r.remat} | {r.memory_gib:.2f} | {r.hbm_gib:.0f} | "
          f"{'yes' if r.fits else 'NO'} | {r.compiled_tflops:.1f} | {r.analytic_tflops:.1f} | "
          f"{r.compile_s:.0f} |")


def main(argv=None) -> int:
  p = argparse.ArgumentParser(description=__doc__,
                              formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--config", nargs="*", default=list(PRESETS))
  p.add_argument("--topology", nargs="*", default=None,
                 help="TPU topologies, e.g. v5p:4x4x8 v5e:16x16 (default: two per preset)")
  p.add_argument("--num-slices", type=int, default=1,
                 help="multislice: this many copies of each topology over DCN (data axis split)")
  p.add_argument("--micro-batch", type=int, default=None)
  p.add_argument("--remat", default=None, choices=("none", "dots_saveable", "nothing_saveable"))
  p.add_argument("--override", action="append", default=[],
                 help="a config override for every preset, e.g. model.scan_layers=false "
                      "(repeatable; the mesh and the plan's fields are set by the plan)")
  args = p.parse_args(argv)
  if args.num_slices < 1:
    p.error(f"--num-slices {args.num_slices}: must be >= 1")
  plans = PLANS
  if args.micro_batch or args.remat:
    plans = ((args.micro_batch or 1, args.remat or "nothing_saveable"),)
  print(f"jax {jax.__version__}; HBM budget {HBM_FRACTION:.0%} of each chip's HBM")
  print(HEADER)
  print("|" + "---|" * (HEADER.count("|") - 1))
  chosen = []
  for preset in args.config:
    for topology in args.topology or DEFAULT_TOPOLOGIES.get(preset, ("v5p:2x2x2",)):
      chosen.append(fit(preset, topology, plans, args.num_slices, args.override))
  print("\nchosen plans:")
  print(HEADER)
  print("|" + "---|" * (HEADER.count("|") - 1))
  for r in chosen:
    print(format_row(r))
  return 0 if all(r.fits for r in chosen) else 1


if __name__ == "__main__":
  sys.exit(main())

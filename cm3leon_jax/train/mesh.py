"""The device mesh ('data', 'fsdp', 'tensor') and logical-axis sharding, from the config.

Every job that runs on devices (decoder training, VQ training, encoding, embedding) builds its
mesh here, so one `config.mesh` section decides the layout everywhere. Axes are `Auto`
(GSPMD propagation, as MaxText runs), see JAX_NOTES.md.

Multislice (several TPU slices joined by the data-centre network, DCN): the `data` axis is
split across the slices and `fsdp` / `tensor` stay inside one slice, so only the gradient
all-reduce of data parallelism crosses the slow network while parameter gathers (fsdp) and
tensor parallelism run over each slice's ICI links. `mesh.num_slices`: 0 = the slices the
devices report (TPU `slice_index`; one elsewhere); N > 1 on platforms without slices treats
the processes as the DCN units (multi-host GPU / CPU: N must equal the process count). The
device order comes from `jax.experimental.mesh_utils.create_hybrid_device_mesh`.
"""

from __future__ import annotations

import math
from typing import Sequence

import jax
import numpy as np
import flax.linen as nn
from jax.experimental import mesh_utils
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from cm3leon_jax.errors import InputError

MESH_AXES = ("data", "fsdp", "tensor")
BATCH_AXES = ("data", "fsdp")  # the batch dimension is split over both


def mesh_shape(mesh_config, num_devices: int) -> tuple[int, int, int]:
  """Resolve -1 entries of (data, fsdp, tensor) so the product is `num_devices`."""
  shape = [int(mesh_config[a]) for a in MESH_AXES]
  if sum(s == -1 for s in shape) > 1:
    raise InputError(f"--config.mesh: at most one axis may be -1, got {dict(zip(MESH_AXES, shape))}")
  if any(s == 0 or s < -1 for s in shape):
    raise InputError(f"--config.mesh: axis sizes must be positive or -1, got "
                     f"{dict(zip(MESH_AXES, shape))}")
  known = math.prod(s for s in shape if s != -1)
  if -1 in shape:
    if num_devices % known:
      raise InputError(f"--config.mesh: {dict(zip(MESH_AXES, shape))} does not divide "
                       f"{num_devices} devices")
    shape[shape.index(-1)] = num_devices // known
  if math.prod(shape) != num_devices:
    raise InputError(f"--config.mesh: {dict(zip(MESH_AXES, shape))} needs {math.prod(shape)} "
                     f"devices, {num_devices} are available")
  return tuple(shape)


def num_slices(mesh_config, devices: Sequence[jax.Device]) -> tuple[int, bool]:
  """(slices the data axis is split over, whether processes stand in for slices)."""
  found = len({getattr(d, "slice_index", 0) for d in devices})
  wanted = int(mesh_config.get("num_slices", 0))
  if wanted < 0:
    raise InputError(f"--config.mesh.num_slices={wanted}: must be >= 0 (0 = as the devices say)")
  if wanted in (0, found):
    return found, False
  if found > 1:
    raise InputError(f"--config.mesh.num_slices={wanted}, but the devices belong to {found} "
                     "TPU slices")
  processes = len({d.process_index for d in devices})
  if wanted != processes:
    raise InputError(f"--config.mesh.num_slices={wanted}: without TPU slices the processes are "
                     f"the DCN units, and these devices belong to {processes} processes")
  return wanted, True


def make_mesh(mesh_config, devices: Sequence[jax.Device] | None = None) -> Mesh:
  """A ('data', 'fsdp', 'tensor') mesh over `devices` (default: all devices); across slices
  (multislice) a hybrid ICI x DCN mesh with `data` split over the slices."""
  devices = list(jax.devices() if devices is None else devices)
  shape = mesh_shape(mesh_config, len(devices))
  auto = (jax.sharding.AxisType.Auto,) * len(MESH_AXES)
  slices, processes_are_slices = num_slices(mesh_config, devices)
  if slices > 1:
    if shape[0] % slices:
      raise InputError(f"--config.mesh: data={shape[0]} must be a multiple of the {slices} "
                       "slices (multislice jobs split the data axis across slices)")
    per_slice = (shape[0] // slices, shape[1], shape[2])
    # As jax.make_mesh (which refuses multislice): v5e slices may split physical axes.
    split = devices[0].device_kind in ("TPU v5 lite", "TPU v5e")
    try:
      grid = mesh_utils.create_hybrid_device_mesh(
          per_slice, (slices, 1, 1), devices, process_is_granule=processes_are_slices,
          allow_split_physical_axes=split)
    except (ValueError, NotImplementedError) as e:
      raise InputError(f"--config.mesh: {dict(zip(MESH_AXES, per_slice))} per slice does not "
                       f"map onto each slice's devices ({e})") from None
    return Mesh(grid, MESH_AXES, axis_types=auto)
  if len(devices) == len(jax.devices()):
    return jax.make_mesh(shape, MESH_AXES, axis_types=auto, devices=devices)
  return Mesh(np.asarray(devices).reshape(shape), MESH_AXES, axis_types=auto)


def axis_rules(config) -> tuple[tuple[str, object], ...]:
  """Logical axis rules as the tuple-of-pairs NNX and `nnx.logical_axis_rules` expect."""
  return tuple((name, tuple(mesh) if isinstance(mesh, list) else mesh)
               for name, mesh in config.mesh.axis_rules)


def logical_sharding(mesh: Mesh, config, logical_axes: Sequence[str | None]) -> NamedSharding:
  """NamedSharding for an array whose dimensions carry these logical names."""
  spec = nn.logical_to_mesh_axes(tuple(logical_axes), axis_rules(config))
  return NamedSharding(mesh, spec)


def batch_sharding(mesh: Mesh, ndim: int = 2) -> NamedSharding:
  """Leading (batch) dimension over data x fsdp, the rest replicated."""
  return NamedSharding(mesh, P(BATCH_AXES, *([None] * (ndim - 1))))


def batch_divisor(mesh: Mesh) -> int:
  return mesh.shape["data"] * mesh.shape["fsdp"]


def check_batch(global_batch: int, mesh: Mesh, field: str = "train.batch_size") -> None:
  if global_batch % batch_divisor(mesh):
    raise InputError(f"--config.{field}={global_batch} is not divisible by the data x fsdp "
                     f"mesh axes ({mesh.shape['data']} x {mesh.shape['fsdp']})")


def global_batch(local_batch: dict, mesh: Mesh) -> dict:
  """Each process's local numpy batch -> global jax.Arrays sharded over the batch axes."""
  return {k: jax.make_array_from_process_local_data(batch_sharding(mesh, np.ndim(v)), np.asarray(v))
          for k, v in local_batch.items()}

"""The train state (decoder + AdamW) created directly in its sharded layout.

    ts = init_train_state(config, mesh)       # TrainState(graphdef, state, shardings)
    model, optimizer = nnx.merge(ts.graphdef, ts.state)

Nothing is materialised on one device first: the module is traced abstractly
(`nnx.eval_shape`), its logical axis names are resolved to `NamedSharding`s through
`config.mesh.axis_rules`, and one jitted init with those `out_shardings` writes each shard
where it lives (JAX_NOTES.md "NNX sharded init"). The optimizer's moments inherit the
parameters' axis names, so they are sharded the same way.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable

import jax
from flax import nnx
from jax.sharding import Mesh

from cm3leon_jax.errors import InputError
from cm3leon_jax.model.decoder import Decoder, DecoderConfig
from cm3leon_jax.train.mesh import axis_rules
from cm3leon_jax.train.optimizer import make_optimizer, refit_of


@dataclasses.dataclass
class TrainState:
  graphdef: Any           # nnx graph definition of (Decoder, nnx.Optimizer)
  state: Any              # nnx.State of (Decoder, nnx.Optimizer): params, moments, step
  shardings: Any          # the same tree of NamedSharding

  @property
  def step(self) -> int:
    return int(self.state[1]["step"][...])


def check_model_fits_mesh(cfg: DecoderConfig, mesh: Mesh) -> None:
  """Clear errors, before compiling, for model dims that the mesh axes cannot split evenly."""
  tensor, fsdp = mesh.shape["tensor"], mesh.shape["fsdp"]
  for field, value, axis, size in (("model.num_heads", cfg.num_heads, "tensor", tensor),
                                   ("model.d_ff", cfg.d_ff, "tensor", tensor),
                                   ("model.d_model", cfg.d_model, "fsdp", fsdp)):
    if value % size:
      raise InputError(f"--config.{field}={value} is not divisible by the {axis} mesh axis "
                       f"({size})")


def sharded_init(make: Callable[[], Any], mesh: Mesh, rules) -> tuple[Any, Any, Any]:
  """(graphdef, state, shardings) of the NNX object `make()` built sharded on `mesh`."""
  with jax.set_mesh(mesh), nnx.logical_axis_rules(rules):
    abstract = nnx.eval_shape(make)
    graphdef, abstract_state = nnx.split(abstract)
    shardings = nnx.get_named_sharding(abstract_state, mesh)
    state = jax.jit(lambda: nnx.state(make()), out_shardings=shardings)()
  return graphdef, state, shardings


def state_shardings(abstract_state, mesh: Mesh, config):
  """NamedShardings of an (abstract) state tree on `mesh` under the config's axis rules."""
  with nnx.logical_axis_rules(axis_rules(config)):
    return nnx.get_named_sharding(abstract_state, mesh)


def make_model_and_optimizer(config, seed: int | None = None):
  """A zero-argument constructor of (Decoder, nnx.Optimizer) for `sharded_init`/`eval_shape`."""
  cfg = DecoderConfig.from_config(config)
  tx = make_optimizer(config.optimizer, config.train.steps, refit_of(config.train))
  seed = config.train.seed if seed is None else seed

  def make():
    model = Decoder(cfg, rngs=nnx.Rngs(params=seed))
    return model, nnx.Optimizer(model, tx, wrt=nnx.Param)
  return make


def init_train_state(config, mesh: Mesh, seed: int | None = None) -> TrainState:
  cfg = DecoderConfig.from_config(config)
  check_model_fits_mesh(cfg, mesh)
  graphdef, state, shardings = sharded_init(make_model_and_optimizer(config, seed), mesh,
                                            axis_rules(config))
  return TrainState(graphdef, state, shardings)


def abstract_model(config, mesh: Mesh) -> tuple[Any, Any]:
  """(graphdef, abstract state) of the decoder alone: parameter shapes, dtypes and shardings
  on `mesh`, no optimizer (inference restores and exports read only these)."""
  cfg = DecoderConfig.from_config(config)
  check_model_fits_mesh(cfg, mesh)
  with jax.set_mesh(mesh), nnx.logical_axis_rules(axis_rules(config)):
    graphdef, abstract_state = nnx.split(nnx.eval_shape(
        lambda: Decoder(cfg, rngs=nnx.Rngs(params=0))))
    shardings = nnx.get_named_sharding(abstract_state, mesh)
  return graphdef, jax.tree.map(
      lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), abstract_state, shardings)


def abstract_train_state(config, mesh: Mesh) -> TrainState:
  """Shapes, dtypes and shardings of the train state, without allocating it (for restore/AOT)."""
  cfg = DecoderConfig.from_config(config)
  check_model_fits_mesh(cfg, mesh)
  with jax.set_mesh(mesh), nnx.logical_axis_rules(axis_rules(config)):
    graphdef, abstract_state = nnx.split(nnx.eval_shape(make_model_and_optimizer(config)))
    shardings = nnx.get_named_sharding(abstract_state, mesh)
  abstract_state = jax.tree.map(
      lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), abstract_state,
      shardings)
  return TrainState(graphdef, abstract_state, shardings)

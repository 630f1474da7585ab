"""Checkpoints: one Orbax CheckpointManager per run holding the train state, the Grain
iterator's state and the config, saved asynchronously, keeping the last N.

    ckpt = Checkpointer(artifacts(config).decoder + "/checkpoints", config)
    ckpt.save(step, ts.state, data_iter)                 # async; returns at once
    state = ckpt.restore(abstract_train_state(config, mesh), data_iter)   # latest step

Restoring reads each array straight into the target's sharding, so a run can resume on a
different mesh (or a different number of devices). The saved config is compared with the
current one first: a checkpoint written for another model shape is a clear InputError
naming the fields, not an Orbax shape error deep in a restore.

Preemption: on TPU pods `jax.distributed` runs a preemption service that turns the
scheduler's SIGTERM into a sync point every host reaches at the same step
(`CheckpointManager.reached_preemption`); on a single process we catch SIGTERM ourselves.
The trainer saves and exits cleanly at that step either way.
"""

from __future__ import annotations

import copy
import json
import logging
import os
import signal
import threading
from typing import Any

import grain
import jax
import orbax.checkpoint as ocp
from flax import nnx

from cm3leon_jax.errors import InputError
from cm3leon_jax.tokenizers.vocab import Vocab

log = logging.getLogger(__name__)

# Fields that decide the shapes and dtypes of the train state: they must match to restore.
STATE_FIELDS = ("model.num_layers", "model.d_model", "model.num_heads", "model.head_dim",
                "model.d_ff", "model.seq_len", "model.activation", "model.tie_embeddings",
                "model.param_dtype", "vocab_size")


def state_signature(config) -> dict:
  """The values of STATE_FIELDS for `config` (vocab_size from the shared Vocab)."""
  out = {}
  for field in STATE_FIELDS:
    if field == "vocab_size":
      out[field] = Vocab.from_config(config).size
    else:
      section, name = field.split(".")
      out[field] = config[section][name]
  return out


def _to_pure(state) -> dict:
  return nnx.to_pure_dict(state)


class Checkpointer:
  """An Orbax CheckpointManager with items 'state', 'data' (Grain) and 'config' (JSON)."""

  def __init__(self, directory: str, config, *, max_to_keep: int | None = None,
               async_save: bool = True):
    self.directory = os.path.abspath(directory)
    self.config = config
    options = ocp.CheckpointManagerOptions(
        max_to_keep=max_to_keep or int(config.train.keep_checkpoints),
        enable_async_checkpointing=async_save, create=True)
    self.manager = ocp.CheckpointManager(
        self.directory, options=options, item_names=("state", "data", "config"),
        item_handlers={"state": ocp.StandardCheckpointHandler(),
                       "data": grain.checkpoint.CheckpointHandler(),
                       "config": ocp.JsonCheckpointHandler()})
    if jax.process_count() == 1:  # multi-host: the jax.distributed preemption service
      _install_sigterm_handler()

  # --- preemption ------------------------------------------------------------------------
  def reached_preemption(self, step: int) -> bool:
    """True when this step must be saved because the job is being preempted."""
    return SIGTERM_RECEIVED.is_set() or self.manager.reached_preemption(step)

  # --- save / restore ----------------------------------------------------------------------
  def latest_step(self) -> int | None:
    return self.manager.latest_step()

  def all_steps(self) -> list[int]:
    return list(self.manager.all_steps())

  def save(self, step: int, state, data_iter=None, *, force: bool = False) -> bool:
    """Start an async save of (state, iterator state, config) at `step`."""
    saved_config = json.loads(self.config.to_json_best_effort())
    saved_config["vocab_size"] = Vocab.from_config(self.config).size
    items = dict(state=ocp.args.StandardSave(_to_pure(state)),
                 config=ocp.args.JsonSave(saved_config))
    if data_iter is not None:
      items["data"] = grain.checkpoint.CheckpointSave(data_iter)
    return self.manager.save(step, args=ocp.args.Composite(**items), force=force)

  def saved_config(self, step: int) -> dict:
    """The config saved with `step` (JSON, as written by `save`)."""
    saved = self.manager.restore(step, args=ocp.args.Composite(config=ocp.args.JsonRestore()))
    return saved["config"]

  def check_compatible(self, step: int) -> None:
    """InputError naming every state-shaping field that differs from the checkpoint's."""
    saved_config = self.saved_config(step)
    current = state_signature(self.config)
    diffs = []
    for field, value in current.items():
      old = _lookup(saved_config, field)
      if old is not None and old != value and not (isinstance(value, tuple) and list(value) == old):
        diffs.append(f"{field}: checkpoint {old!r}, config {value!r}")
    if diffs:
      raise InputError(f"{self.directory}/{step}: checkpoint is incompatible with this config ("
                       + "; ".join(diffs) + "); use a new workdir or matching --config fields")

  def restore(self, abstract_ts, data_iter=None, step: int | None = None):
    """The train state of `step` (default: latest) laid out like `abstract_ts.state`.

    `abstract_ts` comes from `abstract_train_state(config, mesh)` for the mesh to restore
    onto; `data_iter` (if given) is moved to the saved position in place.
    """
    step = self.latest_step() if step is None else step
    if step is None:
      raise InputError(f"{self.directory}: no checkpoint to restore")
    self.check_compatible(step)
    target = _to_pure(abstract_ts.state)
    items = dict(state=ocp.args.StandardRestore(target))
    if data_iter is not None and self._has_item(step, "data"):
      items["data"] = grain.checkpoint.CheckpointRestore(data_iter)
    try:
      restored = self.manager.restore(step, args=ocp.args.Composite(**items))
    except (ValueError, KeyError) as e:
      raise InputError(f"{self.directory}/{step}: cannot restore the train state into this "
                       f"config's layout ({e})") from None
    state = jax.tree.map(lambda x: x, abstract_ts.state)  # a fresh State tree to fill
    nnx.replace_by_pure_dict(state, restored["state"])
    return state

  def restore_params(self, abstract_params, step: int | None = None, dtype=None):
    """Only the decoder's parameters of `step` (default: latest), laid out like
    `abstract_params` (`state.abstract_model`): a partial restore that never reads the
    optimizer's moments (two thirds of an AdamW train state's bytes). `dtype` casts every
    array while it is read (e.g. bfloat16 for an inference export)."""
    step = self.latest_step() if step is None else step
    if step is None:
      raise InputError(f"{self.directory}: no checkpoint to restore")
    if step not in self.all_steps():
      raise InputError(f"{self.directory}: no checkpoint at step {step} (saved steps: "
                       f"{self.all_steps()})")
    self.check_compatible(step)
    # The train state is saved as the pure dict of (Decoder, Optimizer): {0: params, 1: ...}.
    target = {0: _to_pure(abstract_params)}
    restore_args = jax.tree.map(
        lambda x: ocp.ArrayRestoreArgs(sharding=x.sharding, dtype=dtype or x.dtype), target)
    # The manager's "state" handler takes whole-tree restores only: read the item directly.
    item = os.path.join(self.directory, str(step), "state")
    try:
      with ocp.PyTreeCheckpointer() as reader:
        restored = reader.restore(item, args=ocp.args.PyTreeRestore(
            item=target, restore_args=restore_args, partial_restore=True))
    except (ValueError, KeyError) as e:
      raise InputError(f"{item}: cannot restore the parameters into this config's layout "
                       f"({str(e).splitlines()[0][:300]})") from None
    params = jax.tree.map(lambda x: x, abstract_params)  # a fresh State tree to fill
    nnx.replace_by_pure_dict(params, restored[0])
    return params

  def _has_item(self, step: int, name: str) -> bool:
    return os.path.isdir(os.path.join(self.directory, str(step), name))

  def wait(self) -> None:
    self.manager.wait_until_finished()

  def close(self) -> None:
    self.manager.wait_until_finished()
    self.manager.close()


SIGTERM_RECEIVED = threading.Event()
_HANDLER_INSTALLED = [False]


def _saved_config(config, directory: str, step: int | None = None,
                  item: str | None = None) -> tuple[int | None, dict | None]:
  """(step, the config saved with it) of the checkpoint `step` (default: the latest) in
  `directory`; (step, None) where there is none, or it holds no `item`."""
  if not os.path.isdir(directory):
    return step, None
  ckpt = Checkpointer(directory, config, async_save=False)
  try:
    step = ckpt.latest_step() if step is None else step
    if step is None or step not in ckpt.all_steps() or (item and not ckpt._has_item(step, item)):
      return step, None
    return step, ckpt.saved_config(step)
  finally:
    ckpt.close()


def adopt_budget_depth(config, directory: str, step: int | None = None):
  """`config`, or a copy with the decoder depth of the checkpoint in `directory` (default: its
  latest step) where the trainer chose that depth for a time budget in place of `config`'s
  (train/time_budget.py: the saved `train.time_budget_depth_from` equals `config`'s
  `model.num_layers`). So `cm3leon eval --config quickstart` loads the 4-layer decoder a slow
  machine's quickstart trained, while a depth set by hand that differs from a checkpoint's is
  still the clear "incompatible" error of `check_compatible`."""
  step, saved = _saved_config(config, directory, step)
  if saved is None:
    return config
  layers = _lookup(saved, "model.num_layers")
  origin = _lookup(saved, "train.time_budget_depth_from")
  current = int(config.model.num_layers)
  if not origin or layers is None or int(layers) == current or int(origin) != current:
    return config
  log.info("%s/%d: a %d-layer decoder (its time budget's choice in place of %d layers); "
           "loading it so", directory, step, layers, origin)
  return with_layers(config, int(layers), depth_from=int(origin))


def adopt_saved_workers(config, directory: str):
  """`config`, or a copy with the `data.num_workers` of the latest checkpoint in `directory`
  where that differs: the input pipeline's saved position restores only into a pipeline with
  the same worker processes (data/pipeline.py: a run is a function of config, data and
  num_workers), so a run resumes with the count it started with (e.g. a quickstart decoder
  started before its preset moved to in-process reading)."""
  step, saved = _saved_config(config, directory, item="data")
  workers = _lookup(saved, "data.num_workers") if saved is not None else None
  if workers is None or int(workers) == int(config.data.num_workers):
    return config
  log.warning("%s/%d: its input pipeline ran with data.num_workers=%d; resuming with that, "
              "not %d", directory, step, workers, config.data.num_workers)
  c = copy.deepcopy(config)
  c.data.num_workers = int(workers)
  return c


def with_layers(config, layers: int, depth_from: int):
  """A copy of `config` with `layers` decoder layers, recorded as chosen in place of
  `depth_from` (train.time_budget_depth_from)."""
  c = copy.deepcopy(config)
  c.model.num_layers = int(layers)
  c.train.time_budget_depth_from = int(depth_from)
  return c


def _install_sigterm_handler() -> None:
  """Once per process: SIGTERM sets SIGTERM_RECEIVED (then runs any earlier Python handler);
  a second SIGTERM terminates as usual."""
  if _HANDLER_INSTALLED[0]:
    return
  try:
    previous = signal.getsignal(signal.SIGTERM)

    def handler(signum, frame):
      if SIGTERM_RECEIVED.is_set():  # a second SIGTERM: stop now, the default way
        signal.signal(signal.SIGTERM, signal.SIG_DFL)
        os.kill(os.getpid(), signal.SIGTERM)
        return
      SIGTERM_RECEIVED.set()
      log.warning("SIGTERM: saving a checkpoint at the next step, then stopping")
      if callable(previous):
        previous(signum, frame)
    signal.signal(signal.SIGTERM, handler)
    _HANDLER_INSTALLED[0] = True
  except ValueError:  # not the main thread (e.g. a notebook worker): rely on Orbax's check
    pass


def _lookup(saved: dict, field: str) -> Any:
  node = saved
  for key in field.split("."):
    if not isinstance(node, dict) or key not in node:
      return None
    node = node[key]
  return node


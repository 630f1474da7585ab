"""Checkpoints (cm3leon_jax/train/checkpoint.py): state + Grain iterator in one Orbax manager,
restore onto another mesh, keep-N, incompatible configs, preemption."""

import os
import signal

import jax
import numpy as np
import pytest
from flax import nnx

from cm3leon_jax import configs
from cm3leon_jax.errors import InputError
from cm3leon_jax.train import checkpoint
from cm3leon_jax.train.checkpoint import Checkpointer
from cm3leon_jax.train.mesh import make_mesh
from cm3leon_jax.train.state import abstract_train_state, init_train_state
from cm3leon_jax.train.synthetic import synthetic_dataset


def tiny(*overrides):
  return configs.load("tiny", list(overrides))


def as_numpy(state):
  return jax.tree.map(np.asarray, nnx.to_pure_dict(state))


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
  """A train state on a 1x8x1 mesh saved at step 7 with an iterator 3 batches in."""
  directory = str(tmp_path_factory.mktemp("ckpt"))
  config = tiny("mesh.data=1", "mesh.fsdp=8")
  ts = init_train_state(config, make_mesh(config.mesh), seed=3)
  it = iter(synthetic_dataset(config, 2, seed=5))
  for _ in range(3):
    next(it)
  ckpt = Checkpointer(directory, config)
  ckpt.save(7, ts.state, it)
  ckpt.close()
  upcoming = [next(it)["inputs"] for _ in range(2)]
  return directory, as_numpy(ts.state), upcoming


def test_restore_onto_a_different_mesh_gives_identical_params(saved):
  directory, expected, _ = saved
  config = tiny("mesh.data=2", "mesh.fsdp=2", "mesh.tensor=2")
  mesh = make_mesh(config.mesh)
  ckpt = Checkpointer(directory, config)
  state = ckpt.restore(abstract_train_state(config, mesh))
  embed = state[0]["embed"][...]
  assert embed.sharding.mesh.shape == {"data": 2, "fsdp": 2, "tensor": 2}
  assert embed.sharding.spec == jax.sharding.PartitionSpec("tensor", "fsdp")
  got = as_numpy(state)
  jax.tree.map(np.testing.assert_array_equal, got, expected)  # params and AdamW moments
  ckpt.close()


def test_restored_iterator_continues_where_the_saved_one_was(saved):
  directory, _, upcoming = saved
  config = tiny("mesh.data=8")
  it = iter(synthetic_dataset(config, 2, seed=5))  # a fresh iterator at position 0
  ckpt = Checkpointer(directory, config)
  ckpt.restore(abstract_train_state(config, make_mesh(config.mesh)), it)
  for want in upcoming:
    np.testing.assert_array_equal(next(it)["inputs"], want)
  ckpt.close()


def test_incompatible_config_is_a_clear_error(saved):
  directory = saved[0]
  config = tiny("model.d_model=128", "model.head_dim=64", "mesh.data=8")
  ckpt = Checkpointer(directory, config)
  with pytest.raises(InputError, match=r"model.d_model: checkpoint 64, config 128"):
    ckpt.restore(abstract_train_state(config, make_mesh(config.mesh)))
  ckpt.close()


def test_a_resumed_run_takes_the_worker_count_its_saved_pipeline_position_needs(saved):
  directory = saved[0]  # saved by a config with data.num_workers=0 (tiny), with its iterator
  config = tiny("mesh.data=8", "data.num_workers=2")
  adopted = checkpoint.adopt_saved_workers(config, directory)
  assert adopted.data.num_workers == 0
  assert config.data.num_workers == 2  # a copy; the caller's config is untouched
  assert adopted.model.to_dict() == config.model.to_dict()
  same = tiny("mesh.data=8")
  assert checkpoint.adopt_saved_workers(same, directory) is same


def test_worker_counts_are_kept_where_no_pipeline_position_was_saved(tmp_path):
  config = tiny("mesh.data=8", "data.num_workers=2")
  assert checkpoint.adopt_saved_workers(config, str(tmp_path / "none")) is config
  saved_by = tiny("mesh.data=8")  # num_workers 0, and no iterator saved
  ckpt = Checkpointer(str(tmp_path / "ckpt"), saved_by)
  ckpt.save(1, init_train_state(saved_by, make_mesh(saved_by.mesh), seed=0).state)
  ckpt.close()
  assert checkpoint.adopt_saved_workers(config, str(tmp_path / "ckpt")) is config


def test_restore_without_a_checkpoint_is_an_input_error(tmp_path):
  config = tiny("mesh.data=8")
  ckpt = Checkpointer(str(tmp_path / "empty"), config)
  with pytest.raises(InputError, match="no checkpoint"):
    ckpt.restore(abstract_train_state(config, make_mesh(config.mesh)))
  ckpt.close()


def test_keeps_the_last_n_checkpoints(tmp_path):
  config = tiny("mesh.data=1", "mesh.fsdp=1", "train.keep_checkpoints=2")
  mesh = make_mesh(config.mesh, jax.devices()[:1])
  ts = init_train_state(config, mesh)
  ckpt = Checkpointer(str(tmp_path), config)
  for step in (10, 20, 30):
    ckpt.save(step, ts.state)
  ckpt.close()
  assert Checkpointer(str(tmp_path), config).all_steps() == [20, 30]
  assert sorted(os.listdir(tmp_path)) == ["20", "30"]


def test_sigterm_marks_the_next_step_for_a_preemption_save(tmp_path):
  ckpt = Checkpointer(str(tmp_path), tiny())
  try:
    assert not ckpt.reached_preemption(5)
    os.kill(os.getpid(), signal.SIGTERM)
    assert ckpt.reached_preemption(6)
  finally:
    checkpoint.SIGTERM_RECEIVED.clear()
    ckpt.close()

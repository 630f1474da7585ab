"""Two real JAX processes on this machine (gloo CPU collectives) share the input pipeline:
each reads its own disjoint shard, and their local batches form the expected global batch.

The test writes the data, then runs this file as a script once per process.
"""

import os
import subprocess
import sys

import numpy as np
import pytest

NUM_PROCESSES = 2
DEVICES_PER_PROCESS = 2
GLOBAL_BATCH = 8
NUM_DOCS = 32


def overrides():
  return ["data.num_workers=0", f"train.batch_size={GLOBAL_BATCH}", "data.cm3_max_spans=0",
          "data.image_first_rate=0.0", "data.packing=False"]


def query_ids(batch, vocab):
  """Doc id (first token of the query document) of every row; rows hold one sequence here."""
  out = []
  for inputs, targets, seg in zip(batch["inputs"], batch["targets"], batch["segment_ids"]):
    seq = np.append(inputs[seg > 0], targets[seg > 0][-1])
    out.append(int(vocab.ids_to_documents(seq)[-1][0].tokens[0]))
  return out


def worker(process_id: int, port: int, root: str) -> None:
  import jax
  jax.config.update("jax_cpu_collectives_implementation", "gloo")
  jax.distributed.initialize(coordinator_address=f"localhost:{port}",
                             num_processes=NUM_PROCESSES, process_id=process_id)
  from jax.experimental import multihost_utils

  from cm3leon_jax import configs
  from cm3leon_jax.data import pipeline
  from cm3leon_jax.tokenizers.vocab import Vocab
  from cm3leon_jax.train import mesh as mesh_lib

  assert jax.process_index() == process_id and jax.process_count() == NUM_PROCESSES
  config = configs.load("tiny", overrides())
  vocab = Vocab.from_config(config)
  task = pipeline.Task("t", f"{root}/tokens", f"{root}/neighbours")
  steps = 2

  # What this process reads, with the process index taken from jax itself.
  it = pipeline.make_iterator(config, [task])
  local = [next(it) for _ in range(steps)]
  assert local[0]["inputs"].shape == (GLOBAL_BATCH // NUM_PROCESSES, config.model.seq_len)

  # The global batch through the mesh, gathered back to every host.
  mesh = mesh_lib.make_mesh(config.mesh)
  assert mesh.devices.size == NUM_PROCESSES * DEVICES_PER_PROCESS
  gathered = [{k: np.asarray(multihost_utils.process_allgather(v, tiled=True))
               for k, v in mesh_lib.global_batch(b, mesh).items()} for b in local]

  # Expected: every process's shard computed here, stacked in process order.
  shards = [[next(i) for _ in range(steps)] for i in (
      pipeline.make_iterator(config, [task], process_index=p, process_count=NUM_PROCESSES)
      for p in range(NUM_PROCESSES))]
  for step in range(steps):
    for k in local[step]:
      np.testing.assert_array_equal(local[step][k], shards[process_id][step][k])
      np.testing.assert_array_equal(gathered[step][k],
                                    np.concatenate([s[step][k] for s in shards]))
  ids = [set(sum((query_ids(b, vocab) for b in s), [])) for s in shards]
  assert not ids[0] & ids[1], f"shards overlap: {ids[0] & ids[1]}"
  assert len(ids[0]) == len(ids[1]) == steps * GLOBAL_BATCH // NUM_PROCESSES
  # Every host's view of the global batch is identical (gathered across hosts).
  mine = np.asarray(gathered[0]["inputs"])
  both = multihost_utils.process_allgather(mine)
  np.testing.assert_array_equal(both[0], both[1])
  print(f"process {process_id}: ok, read docs {sorted(ids[process_id])}", flush=True)


@pytest.mark.slow
def test_two_processes_read_disjoint_shards_forming_the_global_batch(tmp_path):
  import portpicker

  from cm3leon_jax import configs
  from cm3leon_jax.configs.base import tokens_per_image
  from cm3leon_jax.data import synthetic
  from cm3leon_jax.tokenizers.vocab import ImageSegment, TextSegment, Vocab

  config = configs.load("tiny", overrides())
  vocab = Vocab.from_config(config)
  rng = np.random.default_rng(0)
  docs = [[TextSegment(np.array([i, *rng.integers(0, 384, 4)])),
           ImageSegment(rng.integers(0, vocab.image_size, tokens_per_image(config)))]
          for i in range(NUM_DOCS)]
  synthetic.write_token_documents(f"{tmp_path}/tokens", vocab, docs)
  synthetic.write_neighbours(f"{tmp_path}/neighbours",
                             synthetic.random_neighbours(NUM_DOCS, 3, rng))

  port = portpicker.pick_unused_port()
  env = dict(os.environ, JAX_PLATFORMS="cpu",
             XLA_FLAGS=f"--xla_force_host_platform_device_count={DEVICES_PER_PROCESS}",
             PYTHONPATH=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
  procs = [subprocess.Popen([sys.executable, __file__, str(i), str(port), str(tmp_path)],
                            env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
           for i in range(NUM_PROCESSES)]
  outputs = []
  try:
    for p in procs:
      outputs.append(p.communicate(timeout=150)[0])
  finally:
    for p in procs:
      if p.poll() is None:
        p.kill()
  for i, (p, out) in enumerate(zip(procs, outputs)):
    assert p.returncode == 0, f"process {i} failed:\n{out[-3000:]}"
    assert f"process {i}: ok" in out


if __name__ == "__main__":
  worker(int(sys.argv[1]), int(sys.argv[2]), sys.argv[3])

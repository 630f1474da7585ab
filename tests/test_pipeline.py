"""The Grain pipeline (cm3leon_jax/data/pipeline.py): the batch contract, determinism,
checkpoint resume (in process, with worker processes, through Orbax), sharding, mixtures and
bad input. Data: random documents in the real record formats (data/synthetic.py)."""

import logging

import grain
import numpy as np
import orbax.checkpoint as ocp
import pytest

from cm3leon_jax import configs
from cm3leon_jax.configs.base import tokens_per_image
from cm3leon_jax.data import cm3, pipeline, records, synthetic
from cm3leon_jax.data.assembly import Assembler
from cm3leon_jax.errors import InputError
from cm3leon_jax.tokenizers.vocab import ImageSegment, TextSegment, Vocab

CONTRACT = {"inputs": np.int32, "targets": np.int32, "weights": np.float32,
            "image_index": np.int32, "segment_ids": np.int32, "positions": np.int32}


def load(*overrides):
  return configs.load("tiny", ["data.num_workers=0", "train.batch_size=4", *overrides])


VOCAB = Vocab.from_config(load())
N = tokens_per_image(load())


def tagged_docs(n, rng, first=0):
  """Documents whose first text token is `first + doc id`, so a sequence names its query."""
  return [[TextSegment(np.array([first + i, *rng.integers(0, 384, int(rng.integers(0, 8)))])),
           ImageSegment(rng.integers(0, VOCAB.image_size, N))] for i in range(n)]


def write(root, docs, neighbours=None, name="t", weight=1.0):
  synthetic.write_token_documents(f"{root}/{name}-tokens", VOCAB, docs)
  if neighbours is None:
    return pipeline.Task(name, f"{root}/{name}-tokens", weight=weight)
  synthetic.write_neighbours(f"{root}/{name}-neighbours", neighbours)
  return pipeline.Task(name, f"{root}/{name}-tokens", f"{root}/{name}-neighbours", weight=weight)


@pytest.fixture(scope="module")
def task(tmp_path_factory):
  rng = np.random.default_rng(0)
  return write(tmp_path_factory.mktemp("data"), tagged_docs(48, rng),
               synthetic.random_neighbours(48, 4, rng))


def batches(config, tasks, n, **kwargs):
  it = pipeline.make_iterator(config, tasks, process_index=kwargs.pop("process_index", 0),
                              process_count=kwargs.pop("process_count", 1), **kwargs)
  try:
    return [next(it) for _ in range(n)]
  finally:
    if hasattr(it, "close"):
      it.close()


def segments(batch):
  """Every packed sequence of a batch: (inputs, targets, weights, positions) per segment."""
  for r in range(batch["inputs"].shape[0]):
    for s in np.unique(batch["segment_ids"][r]):
      if s > 0:
        at = batch["segment_ids"][r] == s
        yield tuple(batch[k][r][at] for k in ("inputs", "targets", "weights", "positions"))


def query_ids(batch):
  """Doc id of every sequence's query (its last document's first token; needs no masking)."""
  ids = []
  for inputs, targets, _, _ in segments(batch):
    docs = VOCAB.ids_to_documents(np.append(inputs, targets[-1]))
    ids.append(int(docs[-1][0].tokens[0]))
  return ids


def assert_equal_batches(a, b):
  assert len(a) == len(b)
  for x, y in zip(a, b):
    for k in CONTRACT:
      np.testing.assert_array_equal(x[k], y[k])


def test_batches_follow_the_contract(task):
  config = load("retrieval.num_train_docs=1")
  multi_segment_rows = 0
  for batch in batches(config, [task], 4):
    assert set(batch) == set(CONTRACT)
    for k, dtype in CONTRACT.items():
      assert batch[k].shape == (4, config.model.seq_len) and batch[k].dtype == dtype
    pad = batch["segment_ids"] == 0
    assert (batch["inputs"][pad] == VOCAB.pad_id).all() and (batch["weights"][pad] == 0).all()
    zero = VOCAB.is_sentinel(batch["targets"]) | pad
    np.testing.assert_array_equal(batch["weights"] == 0, zero)
    multi_segment_rows += int((batch["segment_ids"].max(axis=1) > 1).sum())
    for inputs, targets, weights, positions in segments(batch):
      np.testing.assert_array_equal(positions, np.arange(len(inputs)))
      np.testing.assert_array_equal(targets[:-1], inputs[1:])  # shifted within the segment
      assert inputs[0] == VOCAB.eos_id and targets[-1] == VOCAB.eos_id
      docs = VOCAB.ids_to_documents(cm3.unmask(np.append(inputs, targets[-1]), VOCAB))
      assert 1 <= len(docs) <= 2  # the query and at most num_train_docs=1 retrieved
  assert multi_segment_rows > 0, "packing never put two sequences in one row"


def test_padding_mode_puts_one_sequence_per_row(task):
  for batch in batches(load("data.packing=False"), [task], 2):
    assert set(np.unique(batch["segment_ids"])) <= {0, 1}
    lengths = batch["segment_ids"].sum(axis=1)
    np.testing.assert_array_equal(batch["positions"][:, :3], np.tile(np.arange(3), (4, 1)))
    assert ((batch["segment_ids"] == 1) == (np.arange(128) < lengths[:, None])).all()


def test_same_seed_gives_the_same_batches_and_another_seed_does_not(task):
  a = batches(load(), [task], 3)
  assert_equal_batches(a, batches(load(), [task], 3))
  b = batches(load("data.shuffle_seed=1"), [task], 3)
  assert any(not np.array_equal(x["inputs"], y["inputs"]) for x, y in zip(a, b))


def test_restore_from_every_checkpoint_gives_the_remaining_batches(task):
  ds = pipeline.make_dataset(load(), [task], process_index=0, process_count=1, num_epochs=1)
  grain.experimental.assert_equal_output_after_checkpoint(ds)


def test_restore_with_worker_processes_gives_the_remaining_batches(task):
  config = load("data.num_workers=2")
  it = pipeline.make_iterator(config, [task], process_index=0, process_count=1)
  for _ in range(3):
    next(it)
  state = it.get_state()
  expected = [next(it) for _ in range(3)]
  it.close()
  restored = pipeline.make_iterator(config, [task], process_index=0, process_count=1)
  restored.set_state(state)
  assert_equal_batches([next(restored) for _ in range(3)], expected)
  restored.close()


def test_orbax_checkpoint_manager_saves_and_restores_the_iterator(task, tmp_path):
  it = pipeline.make_iterator(load(), [task], process_index=0, process_count=1)
  next(it), next(it)
  manager = ocp.CheckpointManager(tmp_path / "ckpt", item_names=("data",),
                                  item_handlers={"data": grain.checkpoint.CheckpointHandler()})
  manager.save(2, args=ocp.args.Composite(data=grain.checkpoint.CheckpointSave(it)))
  manager.wait_until_finished()
  expected = [next(it) for _ in range(2)]
  fresh = pipeline.make_iterator(load(), [task], process_index=0, process_count=1)
  manager.restore(2, args=ocp.args.Composite(data=grain.checkpoint.CheckpointRestore(fresh)))
  assert_equal_batches([next(fresh) for _ in range(2)], expected)
  manager.close()


def test_processes_read_disjoint_shards_that_cover_the_data(task):
  config = load("data.cm3_max_spans=0", "data.image_first_rate=0.0", "data.packing=False")
  # Each process gets train.batch_size / 2 = 2 rows per batch: 12 batches = its 24 documents.
  shards = [sum((query_ids(b) for b in batches(config, [task], 12, process_index=p,
                                                process_count=2)), []) for p in (0, 1)]
  assert len(set(shards[0])) == len(set(shards[1])) == 24
  assert not set(shards[0]) & set(shards[1])
  assert set(shards[0]) | set(shards[1]) == set(range(48))


def test_task_mixture_follows_the_weights(tmp_path):
  rng = np.random.default_rng(0)
  a = write(tmp_path, tagged_docs(40, rng, first=0), name="a", weight=3.0)
  b = write(tmp_path, tagged_docs(40, rng, first=200), name="b", weight=1.0)
  config = load("data.cm3_max_spans=0", "data.image_first_rate=0.0", "data.packing=False")
  ids = sum((query_ids(x) for x in batches(config, [a, b], 16)), [])
  assert sum(i < 200 for i in ids) == 48 and sum(i >= 200 for i in ids) == 16


def test_no_retrieval_rate_sends_that_fraction_of_examples_without_neighbours(task):
  def retrieved_counts(rate):
    join = pipeline.Join(task, Assembler.from_config(load()), 2, 0.5, no_retrieval_rate=rate)
    out = []
    for doc_id in range(48):
      example = join(read(task, doc_id), np.random.default_rng(doc_id))
      seq = cm3.unmask(np.append(example["inputs"], example["targets"][-1]), VOCAB)
      out.append(len(VOCAB.ids_to_documents(seq)) - 1)  # documents before the query
    return np.array(out)

  assert (retrieved_counts(0.0) == 2).all()  # every query with both of its neighbours
  assert (retrieved_counts(1.0) == 0).all()  # the query alone
  half = retrieved_counts(0.5)
  assert set(half.tolist()) == {0, 2}
  assert 14 <= (half == 0).sum() <= 34  # 48 draws at p = 0.5: mean 24, sd 3.5


def test_a_no_retrieval_rate_outside_0_1_is_an_input_error(task):
  with pytest.raises(InputError, match="retrieval.no_retrieval_rate=1.5"):
    pipeline.Join(task, Assembler.from_config(load()), 2, 0.5, no_retrieval_rate=1.5)


# --- bad input ---------------------------------------------------------------------------------

def join_for(task, *overrides):
  config = load(*overrides)
  return pipeline.Join(task, Assembler.from_config(config), config.retrieval.num_train_docs,
                       config.data.max_skipped_fraction)


def read(task, doc_id):
  return grain.sources.ArrayRecordDataSource(records.shard_paths(task.tokens_dir))[doc_id]


def test_a_document_longer_than_seq_len_is_cut_at_a_segment_boundary_and_counted(tmp_path, caplog):
  rng = np.random.default_rng(0)
  long_doc = [TextSegment(np.arange(50)), ImageSegment(np.zeros(N, int)),
              TextSegment(np.arange(40)), ImageSegment(np.ones(N, int))]  # 50+18+40+18+1 = 127
  task = write(tmp_path, [long_doc] + tagged_docs(3, rng, first=1))
  join = join_for(task, "data.cm3_max_spans=0", "model.seq_len=100")
  with caplog.at_level(logging.WARNING):
    example = join(read(task, 0), np.random.default_rng(0))
  assert join.counts["cut"] == 1 and "cut at a segment boundary" in caplog.text
  # 100 tokens allowed: the cut falls before the second text (it ends at 108, the image
  # after it at 126), leaving the first text and the first image whole, then <eos>.
  seq = np.append(example["inputs"], example["targets"][-1])
  np.testing.assert_array_equal(seq, VOCAB.documents_to_ids([long_doc[:2]]))


def test_neighbour_ids_that_do_not_exist_are_dropped_and_counted(tmp_path):
  rng = np.random.default_rng(0)
  neighbours = [np.array([(i + 1) % 8, 999, -1, i]) for i in range(8)]  # 1 good, 3 bad each
  task = write(tmp_path, tagged_docs(8, rng), neighbours)
  join = join_for(task, "data.cm3_max_spans=0", "data.image_first_rate=0.0",
                  "data.max_skipped_fraction=0.9")
  example = join(read(task, 0), np.random.default_rng(0))
  docs = VOCAB.ids_to_documents(np.append(example["inputs"], example["targets"][-1]))
  assert [int(d[0].tokens[0]) for d in docs] == [1, 0]  # the one good neighbour, then the query
  assert join.counts["bad_neighbours"] == 3 and join.counts["neighbours"] == 4


def test_mostly_bad_neighbour_ids_stop_the_pipeline_naming_the_directory(tmp_path):
  rng = np.random.default_rng(0)
  task = write(tmp_path, tagged_docs(8, rng), [np.array([999, 1000])] * 8)
  with pytest.raises(InputError, match="t-neighbours.*name no document"):
    batches(load(), [task], 40)


def test_empty_documents_are_skipped_and_counted(tmp_path):
  rng = np.random.default_rng(0)
  docs = [np.zeros(0, np.int32), np.array([VOCAB.eos_id], np.int32)]
  docs += [VOCAB.document_to_ids(d) for d in tagged_docs(6, rng, first=2)]
  task = write(tmp_path, docs)
  join = join_for(task)
  assert join(read(task, 0), np.random.default_rng(0)) is None
  assert join(read(task, 1), np.random.default_rng(0)) is None
  assert join.counts["skipped"] == 2 and join.counts["empty document"] == 2
  config = load("data.cm3_max_spans=0", "data.image_first_rate=0.0", "data.packing=False",
                "data.max_skipped_fraction=0.5")
  ids = query_ids(batches(config, [task], 3)[0]) + query_ids(batches(config, [task], 3)[2])
  assert min(ids) >= 2  # the pipeline goes on without them


def test_too_many_empty_documents_stop_the_pipeline_naming_the_directory(tmp_path):
  rng = np.random.default_rng(0)
  docs = [np.zeros(0, np.int32)] * 4 + [VOCAB.document_to_ids(d) for d in tagged_docs(4, rng)]
  task = write(tmp_path, docs)
  with pytest.raises(InputError, match="t-tokens: .* documents skipped"):
    batches(load(), [task], 40)


def test_directory_problems_are_input_errors(task, tmp_path):
  rng = np.random.default_rng(0)
  short = write(tmp_path, tagged_docs(4, rng), synthetic.random_neighbours(3, 2, rng))
  with pytest.raises(InputError, match="3 neighbour records for 4 documents"):
    pipeline.make_dataset(load(), [short], process_index=0, process_count=1)
  with pytest.raises(InputError, match="missing/meta.json: missing"):
    pipeline.make_dataset(load(), [pipeline.Task("x", str(tmp_path / "missing"))],
                          process_index=0, process_count=1)
  with pytest.raises(InputError, match="train.batch_size=4 is not divisible by 3"):
    pipeline.make_dataset(load(), [task], process_index=0, process_count=3)

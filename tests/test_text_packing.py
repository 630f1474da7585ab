"""Packed captions for the encoder's text tower (cm3leon_jax/retrieval/text_packing.py): the
packing rule on hand-computed cases, and the specification that matters: packed and unpacked
texts give the same embeddings, the same loss and the same update."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from cm3leon_jax import configs
from cm3leon_jax.errors import InputError
from cm3leon_jax.retrieval import text_packing, train_encoder
from cm3leon_jax.train.mesh import global_batch, make_mesh
from tests.test_encoder import Quadrants


def left_aligned(lengths, width):
  """ids 1.. in order (text i's tokens are 100 * i + 1, 100 * i + 2, ...) and their mask."""
  mask = np.arange(width)[None] < np.asarray(lengths)[:, None]
  ids = np.where(mask, 100 * np.arange(len(lengths))[:, None] + np.arange(1, width + 1), 0)
  return ids.astype(np.int32), mask


def test_best_fit_decreasing_on_a_hand_computed_case():
  # rows of 6: 5 -> row 0 (1 left); 4 -> row 1 (2 left); 3 -> row 2 (3 left); 2 -> row 1, the
  # fullest row with room (0 left); the empty text owns no row
  assert text_packing.rows_needed([3, 5, 2, 4, 0], 6).tolist() == [2, 0, 1, 1, -1]


def test_packed_rows_hold_each_text_with_its_segment_position_and_owner():
  ids, mask = left_aligned([3, 5, 2, 4], 6)
  out = text_packing.pack(ids, mask, owners_N=np.array([10, 11, 12, 13]), num_texts=20)
  assert out["ids"].shape == (8, 6)  # 3 rows used, rounded up to 8
  # row 1 holds texts 2 and 3, in the order of the batch
  assert out["ids"][1].tolist() == [201, 202, 301, 302, 303, 304]
  assert out["segments"][1].tolist() == [1, 1, 2, 2, 2, 2]
  assert out["positions"][1].tolist() == [0, 1, 0, 1, 2, 3]
  assert out["owners"][1].tolist() == [12, 12, 13, 13, 13, 13]
  # row 2: text 0 and three padding slots (segment 0, owner = num_texts)
  assert out["ids"][2].tolist() == [1, 2, 3, 0, 0, 0]
  assert out["segments"][2].tolist() == [1, 1, 1, 0, 0, 0]
  assert out["owners"][2].tolist() == [10, 10, 10, 20, 20, 20]
  assert (out["owners"][3:] == 20).all() and (out["segments"][3:] == 0).all()


@pytest.mark.parametrize("used,devices,rows", [(0, 1, 8), (3, 1, 8), (9, 1, 16), (100, 1, 104),
                                               (293, 1, 320), (600, 1, 640), (3, 16, 16),
                                               (100, 16, 112)])
def test_row_counts_come_in_few_shapes_that_split_over_the_devices(used, devices, rows):
  assert text_packing.round_rows(used, devices) == rows


def test_texts_that_do_not_start_their_row_or_overflow_it_are_clear_errors():
  ids, mask = left_aligned([2, 3], 4)
  with pytest.raises(InputError, match="left-aligned"):
    text_packing.pack(ids, mask[:, ::-1], np.arange(2), 2)
  with pytest.raises(InputError, match="does not fit rows of 4"):
    text_packing.rows_needed([5], 4)


@pytest.mark.parametrize("rows", [[slice(8, 12), slice(12, 16)], [slice(12, 16), slice(8, 12)],
                                  [slice(8, 16)]])
def test_a_process_whose_devices_hold_its_own_block_of_rows_may_pack(rows):
  # process 1 of 2, 16 rows: its packed owners are 8..15, whatever the order of its devices
  train_encoder.check_row_block(rows, process=1, processes=2, global_batch=16)


@pytest.mark.parametrize("rows,held", [([slice(0, 4), slice(4, 8)], "0..8"),
                                       ([slice(8, 12), slice(0, 4)], "0..12"),
                                       ([slice(8, 12), slice(14, 16)], "8..16")])
def test_a_mesh_that_interleaves_processes_rows_is_a_clear_error_before_packing(rows, held):
  # process 1 of 2 must hold rows 8..15: the first batch's rows, a gap, a hole are each refused
  with pytest.raises(InputError, match=f"rows {held}, not one block 8..16.*pack_text=False"):
    train_encoder.check_row_block(rows, process=1, processes=2, global_batch=16)


@pytest.mark.parametrize("shape", [(1, 8, 1), (2, 4, 1), (2, 2, 2), (8, 1, 1)])
def test_every_mesh_of_one_process_may_pack(shape):
  config = configs.load("tiny")
  config.mesh.data, config.mesh.fsdp, config.mesh.tensor = shape
  train_encoder._check_process_rows(make_mesh(config.mesh), 16)


def test_pad_rows_appends_empty_rows_owned_by_no_text():
  ids, mask = left_aligned([3, 2], 4)
  out = text_packing.pad_rows(text_packing.pack(ids, mask, np.arange(2), 2), 16, 2)
  assert out["ids"].shape == (16, 4)
  assert (out["owners"][8:] == 2).all() and (out["ids"][8:] == 0).all()


@pytest.fixture(scope="module")
def config():
  return configs.load("tiny", ["retrieval.hard_negatives=1.0",
                               "retrieval.swap_groups=('red green blue yellow',)"])


@pytest.fixture(scope="module")
def tokenizer():
  from tests.test_encoder import COLOURS, CORNERS
  from cm3leon_jax.tokenizers.text import TextTokenizer
  texts = [f"a {c} square at the {k}" for c in COLOURS for k in CORNERS] * 4
  return TextTokenizer.train(texts, vocab_size=300, min_frequency=1)


def batches(config, tokenizer, n=16):
  """The same first batch of the pipeline, unpacked and packed."""
  plain = configs.load("tiny", [])
  plain.retrieval = config.retrieval.copy_and_resolve_references()
  plain.retrieval.pack_text = False
  get = lambda c: next(iter(train_encoder.pair_dataset(Quadrants(n), tokenizer, c, n, seed=0)))
  return get(plain), get(config)


def test_the_packed_pipeline_holds_every_caption_and_hard_negative(config, tokenizer):
  unpacked, packed = batches(config, tokenizer)
  assert "ids" not in packed and packed["text_ids"].shape[0] < unpacked["ids"].shape[0]
  np.testing.assert_array_equal(packed["neg_valid"], unpacked["neg_mask"].any(1))
  texts = list(unpacked["ids"]) + list(unpacked["neg_ids"])
  masks = list(unpacked["mask"]) + list(unpacked["neg_mask"])
  for owner, (ids, mask) in enumerate(zip(texts, masks)):
    at = packed["text_owners"] == owner
    order = np.argsort(packed["text_positions"][at])
    assert packed["text_ids"][at][order].tolist() == ids[mask].tolist()


def test_packed_and_unpacked_texts_give_the_same_embeddings_loss_and_update(config, tokenizer):
  mesh = make_mesh(config.mesh)
  model, optimizer = train_encoder.init_sharded(config, mesh, steps=10)
  graphdef, state = nnx.split((model, optimizer))
  shardings = jax.tree.map(lambda x: x.sharding, state)
  unpacked, packed = batches(config, tokenizer)
  n = unpacked["ids"].shape[0]
  a = model.embed_text(jnp.asarray(np.concatenate([unpacked["ids"], unpacked["neg_ids"]])),
                       jnp.asarray(np.concatenate([unpacked["mask"], unpacked["neg_mask"]])))
  b = model.embed_packed_text(*(jnp.asarray(packed[f"text_{k}"])
                                for k in ("ids", "positions", "segments", "owners")), 2 * n)
  np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=2e-6)
  results = []
  for is_packed, batch in ((False, unpacked), (True, packed)):
    step = train_encoder.make_train_step(graphdef, shardings, mesh, hard_negatives=True,
                                         packed=is_packed)
    copy = jax.tree.map(jnp.copy, state)  # the step donates its state
    with jax.set_mesh(mesh):
      new_state, metrics = step(copy, global_batch(batch, mesh))
    results.append((float(metrics["loss"]), jax.tree.leaves(new_state)))
  assert results[0][0] == pytest.approx(results[1][0], rel=1e-5)
  for x, y in zip(results[0][1], results[1][1]):
    np.testing.assert_allclose(np.asarray(x), np.asarray(y), rtol=1e-4, atol=1e-6)

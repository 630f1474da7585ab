"""CM3Leon's retrieval rules: relevance, modality, diversity, query dropout, training-time choice."""

import numpy as np
import pytest

from cm3leon_jax.errors import InputError
from cm3leon_jax.retrieval.index import Index, Settings
from cm3leon_jax.retrieval.strategy import (choose_for_training, neighbours_for_batch,
                                            query_dropout, select_neighbours, unit_rows)


def unit(*v):
  v = np.asarray(v, np.float32)
  return v / np.linalg.norm(v)


# A bank of 2-D document embeddings at known angles from the query (doc 0, at 0 degrees).
ANGLES = [0, 10, 30, 40, 50, 60, 70, 80]  # cos: 1, .985, .866, .766, .643, .5, .342, .174
BANK = np.stack([unit(np.cos(np.radians(a)), np.sin(np.radians(a))) for a in ANGLES])


def ranked(ids):
  ids = np.asarray(ids)
  return ids, BANK[ids] @ BANK[0]


def test_query_is_never_its_own_neighbour():
  order, _ = select_neighbours(0, [ranked([0, 2, 3])], BANK, None, k_per_modality=2,
                               max_score=1.1)
  assert order == [2, 3]


def test_near_duplicate_above_max_score_is_skipped():
  # doc 1 has cosine 0.985 with the query's document: a near duplicate; doc 2 (0.866) is kept.
  order, _ = select_neighbours(0, [ranked([1, 2, 3])], BANK, BANK[0], k_per_modality=2,
                               max_score=0.9)
  assert order == [2, 3]


def test_relevance_order_is_kept_within_a_modality():
  order, _ = select_neighbours(0, [ranked([3, 2, 4])], BANK, BANK[0], k_per_modality=3,
                               max_score=0.9)
  assert order == [3, 2, 4]


def test_a_document_retrieved_by_text_is_not_retrieved_again_by_image():
  by_text, by_image = ranked([2, 3, 4]), ranked([2, 3, 5, 6])
  order, counts = select_neighbours(0, [by_text, by_image], BANK, BANK[0], k_per_modality=2,
                                    max_score=0.9)
  assert counts == [2, 2]
  assert order == [2, 5, 3, 6]  # interleaved: text 1, image 1, text 2, image 2


def test_k_per_modality_from_each_modality():
  order, counts = select_neighbours(0, [ranked([2, 3, 4, 5]), ranked([7, 6, 5, 4])], BANK, None,
                                    k_per_modality=1, max_score=0.9)
  assert order == [2, 7] and counts == [1, 1]


def test_empty_slots_are_ignored():
  order, counts = select_neighbours(0, [ranked([2, -1, -1])], BANK, None, 2, 0.9)
  assert order == [2] and counts == [1]


def test_query_dropout_removes_exactly_the_configured_fraction_of_valid_tokens():
  mask = np.zeros((3, 16), bool)
  mask[0, :10] = True  # 10 valid -> 2 dropped
  mask[1, :] = True    # 16 valid -> round(3.2) = 3 dropped
  mask[2, :5] = True   # 5 valid -> 1 dropped
  out = query_dropout(mask, 0.2, np.random.default_rng(0))
  assert out.sum(axis=1).tolist() == [8, 13, 4]
  assert not (out & ~mask).any()  # only present tokens are removed


def test_query_dropout_rate_is_honoured_over_many_queries():
  mask = np.ones((2000, 20), bool)
  out = query_dropout(mask, 0.2, np.random.default_rng(0))
  assert 1 - out.mean() == pytest.approx(0.2)
  # Which tokens go is random: every position is dropped about 20% of the time.
  assert np.all(np.abs((1 - out.mean(axis=0)) - 0.2) < 0.04)


def test_query_dropout_keeps_at_least_one_token():
  mask = np.zeros((1, 8), bool)
  mask[0, 3] = True
  assert query_dropout(mask, 0.9, np.random.default_rng(0)).sum() == 1


def test_query_dropout_rejects_a_rate_of_one():
  with pytest.raises(InputError, match="query_dropout=1.0"):
    query_dropout(np.ones((1, 4), bool), 1.0, np.random.default_rng(0))


def test_choose_for_training_is_a_seeded_subset_in_stored_order():
  ids = np.array([10, 11, 12, 13])
  a = choose_for_training(ids, 3, seed=0, doc_id=5)
  assert len(a) == 3 and set(a) <= set(ids) and list(a) == sorted(a)
  np.testing.assert_array_equal(a, choose_for_training(ids, 3, seed=0, doc_id=5))
  draws = {tuple(choose_for_training(ids, 3, seed=0, doc_id=d)) for d in range(50)}
  assert len(draws) == 4  # all four 3-subsets occur across documents
  np.testing.assert_array_equal(choose_for_training(ids[:2], 3, 0, 5), ids[:2])


def test_neighbours_for_batch_searches_further_when_duplicates_fill_the_candidates():
  # 40 exact copies of doc 0's direction, then 20 distinct documents further away: the first
  # fetch (16 candidates) holds only near-duplicates, so the search must widen.
  rng = np.random.default_rng(0)
  dups = np.tile(unit(1, 0, 0, 0), (40, 1))
  others = unit_rows(np.array([1, 1, 0, 0]) + 0.3 * rng.normal(size=(20, 4)))
  bank = np.concatenate([dups, others]).astype(np.float32)
  index = Index.build(bank, Settings(brute_force=True))
  out = neighbours_for_batch(index, unit_rows(bank), np.array([0]), [bank[:1], bank[:1]],
                             k_per_modality=2, max_score=0.9)
  assert len(out[0]) == 4
  assert all(i >= 40 for i in out[0])  # no duplicate of the query, and not the query


def test_neighbours_for_batch_returns_fewer_when_the_bank_runs_out():
  bank = np.tile(unit(1, 0), (5, 1))  # everything is a duplicate of the query
  index = Index.build(bank, Settings(brute_force=True))
  out = neighbours_for_batch(index, unit_rows(bank), np.array([0, 3]), [bank[[0, 3]]], 2, 0.9)
  assert [len(o) for o in out] == [0, 0]

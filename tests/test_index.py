"""The memory-bank index: ScaNN search against exact search, persistence, sharding, bad input."""

import json

import numpy as np
import pytest

from cm3leon_jax import configs
from cm3leon_jax.errors import InputError
from cm3leon_jax.retrieval import index as index_lib
from cm3leon_jax.retrieval.index import Index, Settings, choose_settings, exact_search


def clustered(n, d, clusters=64, seed=0):
  """Unit vectors around `clusters` random centres: the structure real embeddings have."""
  rng = np.random.default_rng(seed)
  centres = rng.normal(size=(clusters, d))
  x = centres[rng.integers(0, clusters, n)] + 0.5 * rng.normal(size=(n, d))
  return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)


def recall(ids_a, ids_b):
  return np.mean([len(set(a) & set(b)) / len(a) for a, b in zip(ids_a, ids_b)])


TREE = Settings(brute_force=False, num_leaves=100, leaves_to_search=10, reorder=100,
                training_sample_size=10000)


@pytest.fixture(scope="module")
def bank():
  return clustered(10000, 32)


@pytest.fixture(scope="module")
def queries():
  return clustered(200, 32, seed=1)


@pytest.fixture(scope="module")
def tree_index(bank):
  return Index.build(bank, TREE)


def test_exact_search_is_argsort_of_inner_products():
  bank = np.array([[1, 0], [0, 1], [0.6, 0.8], [-1, 0]], np.float32)
  ids, scores = exact_search(bank, np.array([[1.0, 0.0]]), k=3)
  assert ids.tolist() == [[0, 2, 1]]
  np.testing.assert_allclose(scores, [[1.0, 0.6, 0.0]])


def test_settings_brute_force_below_threshold_tree_with_sqrt_leaves_above():
  assert choose_settings(19999, brute_force_below=20000).brute_force
  s = choose_settings(1_000_000, brute_force_below=20000)
  assert not s.brute_force and s.num_leaves == 1000 and 1 <= s.leaves_to_search < 1000


def test_brute_force_index_equals_exact(bank, queries):
  index = Index.build(bank, choose_settings(len(bank)))
  assert index.settings[0].brute_force
  ids, scores = index.search(queries, 10)
  exact_ids, exact_scores = exact_search(bank, queries, 10)
  np.testing.assert_array_equal(ids, exact_ids)
  np.testing.assert_allclose(scores, exact_scores, rtol=1e-5, atol=1e-5)


def test_tree_ah_index_recall_at_10_vs_exact(tree_index, bank, queries):
  ids, _ = tree_index.search(queries, 10)
  exact_ids, _ = exact_search(bank, queries, 10)
  assert recall(ids, exact_ids) >= 0.9


def test_save_load_round_trip_gives_identical_results(tree_index, bank, queries, tmp_path):
  tree_index.save(str(tmp_path / "index"), embeddings_ND=bank)
  loaded = Index.load(str(tmp_path / "index"))
  ids, scores = tree_index.search(queries, 10)
  ids2, scores2 = loaded.search(queries, 10)
  np.testing.assert_array_equal(ids, ids2)
  np.testing.assert_array_equal(scores, scores2)
  np.testing.assert_array_equal(index_lib.load_embeddings(str(tmp_path / "index")), bank)
  assert not list(tmp_path.glob("*.tmp-*"))  # atomic: no temp dir left behind


def test_spilled_spherical_tree_recalls_without_duplicate_hits(bank, queries, tmp_path):
  """SOAR stores each vector in two leaves; a query searching both still gets it once."""
  soar = Settings(brute_force=False, num_leaves=100, leaves_to_search=10, reorder=100,
                  training_sample_size=10000, spherical=True, soar_lambda=1.0)
  index = Index.build(bank, soar)
  ids, scores = index.search(queries, 10)
  exact_ids, _ = exact_search(bank, queries, 10)
  assert recall(ids, exact_ids) >= 0.9
  assert all(len(set(row)) == 10 for row in ids.tolist())
  index.save(str(tmp_path / "soar"))
  ids2, scores2 = Index.load(str(tmp_path / "soar")).search(queries, 10)
  np.testing.assert_array_equal(ids, ids2)
  np.testing.assert_array_equal(scores, scores2)


def test_default_tree_settings_spill_and_a_negative_soar_lambda_is_an_error():
  s = choose_settings(100_000)
  assert s.spherical and s.soar_lambda == 1.0
  assert choose_settings(100_000, soar_lambda=0.0).soar_lambda == 0.0
  with pytest.raises(InputError, match="soar_lambda"):
    choose_settings(100_000, soar_lambda=-1.0)
  assert s.soar_overretrieve == 1.01
  for bad in (0.5, 1.0, 2.5):  # 1.0: ScaNN saves a SOAR index it cannot load
    with pytest.raises(InputError, match=rf"retrieval.soar_overretrieve={bad}: must lie in"):
      choose_settings(100_000, soar_overretrieve=bad)


def test_an_index_with_the_config_defaults_saves_and_loads(tmp_path):
  """The quickstart's path: a bank above brute_force_below gets the config's tree + SOAR
  settings, and `save` + `load` give the same neighbours (ScaNN 1.4.2 saved an index it could not
  load at soar_overretrieve 1.0, the config's default of one session)."""
  config = configs.load("quickstart")
  rng = np.random.default_rng(3)
  n = config.retrieval.brute_force_below + 1000
  bank = rng.normal(size=(n, 16)).astype(np.float32)
  bank /= np.linalg.norm(bank, axis=1, keepdims=True)
  index = Index.build(bank, retrieval_config=config.retrieval)
  assert not index.settings[0].brute_force and index.settings[0].soar_lambda > 0
  index.save(str(tmp_path / "index"))
  loaded = Index.load(str(tmp_path / "index"))
  ids, scores = index.search(bank[:20], 10)
  ids2, scores2 = loaded.search(bank[:20], 10)
  np.testing.assert_array_equal(ids, ids2)
  # The reloaded SOAR searcher rescores in another summation order: scores may differ in the
  # last float32 bit (seen: 0.7402810 vs 0.7402811), never in the ranking.
  np.testing.assert_allclose(scores, scores2, rtol=1e-6, atol=0)


def test_a_searcher_scann_cannot_load_back_fails_the_save_and_writes_nothing(bank, tmp_path):
  index = Index.build(bank[:2000], Settings(brute_force=False, num_leaves=20, leaves_to_search=5,
                                            training_sample_size=2000, spherical=True,
                                            soar_lambda=1.0, soar_overretrieve=1.0))
  with pytest.raises(RuntimeError, match="ScaNN cannot load the index it just saved"):
    index.save(str(tmp_path / "broken"))
  assert not list(tmp_path.iterdir())  # no index, no temp dir left behind


def test_an_index_saved_before_soar_overretrieve_loads_with_scanns_default(bank, tmp_path):
  index = Index.build(bank[:2000], Settings(brute_force=False, num_leaves=20, leaves_to_search=5,
                                            training_sample_size=2000, spherical=True,
                                            soar_lambda=1.0, soar_overretrieve=2.0))
  index.save(str(tmp_path / "old"))
  meta_path = tmp_path / "old" / "index.json"
  meta = json.loads(meta_path.read_text())
  for s in meta["settings"]:
    del s["soar_overretrieve"]  # the index.json of an older version
  meta_path.write_text(json.dumps(meta))
  loaded = Index.load(str(tmp_path / "old"))
  assert loaded.settings[0].soar_overretrieve == 2.0
  np.testing.assert_array_equal(loaded.search(bank[:5], 3)[0], index.search(bank[:5], 3)[0])


def test_sharded_index_equals_single_index(bank, queries):
  exact = Settings(brute_force=True)
  single = Index.build(bank, exact)
  sharded = Index.build(bank, exact, num_shards=3)
  assert sharded.sizes == [3333, 3334, 3333] and sharded.offsets == [0, 3333, 6667]
  ids, scores = single.search(queries, 10)
  ids3, scores3 = sharded.search(queries, 10)
  np.testing.assert_array_equal(ids, ids3)
  np.testing.assert_allclose(scores, scores3, rtol=1e-6)


def test_sharded_search_returns_global_ids_from_every_shard():
  bank = np.eye(4, dtype=np.float32)
  index = Index.build(bank, Settings(brute_force=True), num_shards=4)
  ids, _ = index.search(bank, 1)
  assert ids[:, 0].tolist() == [0, 1, 2, 3]


def test_merge_topk_orders_by_score_then_id():
  ids, scores = index_lib.merge_topk([np.array([[5, 1]]), np.array([[7, 2]])],
                                     [np.array([[0.9, 0.5]]), np.array([[0.9, 0.7]])], k=3)
  assert ids.tolist() == [[5, 7, 2]]
  np.testing.assert_allclose(scores, [[0.9, 0.9, 0.7]])


# --- bad input --------------------------------------------------------------------------------
def test_empty_bank_is_a_clear_error():
  with pytest.raises(InputError, match="empty"):
    Index.build(np.zeros((0, 8), np.float32))


def test_query_dimension_mismatch_is_a_clear_error(bank):
  index = Index.build(bank[:100], Settings(brute_force=True))
  with pytest.raises(InputError, match="dimension mismatch: queries have dim 16, the index has dim 32"):
    index.search(np.ones((2, 16), np.float32), 5)


def test_nan_bank_embedding_is_a_clear_error(bank):
  x = bank[:100].copy()
  x[7, 3] = np.nan
  with pytest.raises(InputError, match=r"NaN or inf \(first rows: \[7\]\)"):
    Index.build(x)


def test_nan_query_is_a_clear_error(bank):
  index = Index.build(bank[:100], Settings(brute_force=True))
  q = bank[:2].copy()
  q[1, 0] = np.inf
  with pytest.raises(InputError, match="queries: 1 embedding"):
    index.search(q, 5)


def test_k_larger_than_bank_is_a_clear_error(bank):
  index = Index.build(bank[:50], Settings(brute_force=True), num_shards=2)
  with pytest.raises(InputError, match="k=51 is larger than the memory bank \\(50 documents\\)"):
    index.search(bank[:2], 51)
  with pytest.raises(InputError, match="k=51"):
    exact_search(bank[:50], bank[:2], 51)


def test_k_equal_to_bank_returns_every_document(bank):
  index = Index.build(bank[:50], Settings(brute_force=True), num_shards=2)
  ids, _ = index.search(bank[:2], 50)
  assert sorted(ids[0].tolist()) == list(range(50))


def test_loading_a_directory_without_an_index_is_a_clear_error(tmp_path):
  with pytest.raises(InputError, match="not an index directory"):
    Index.load(str(tmp_path))


def test_parallel_batch_size_gives_every_core_equal_batches_up_to_the_cap():
  from cm3leon_jax.retrieval.index import parallel_batch_size
  assert parallel_batch_size(5000, threads=2) == 2500      # one task per core
  assert parallel_batch_size(7, threads=2) == 4
  assert parallel_batch_size(1, threads=8) == 1
  # 50,000 queries per core in 13 rounds of at most 4,096: 3,847 each (13 x 3,847 >= 50,000).
  assert parallel_batch_size(100_000, threads=2) == 3847
  assert parallel_batch_size(10_000, threads=2, cap=1000) == 1000

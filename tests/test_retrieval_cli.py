"""`cm3leon train-retriever`, `index`, `retrieve` end to end on a tiny Shapes dataset, plus
inference-time retrieval and the jobs' bad-input handling. The end-to-end tests share one
module fixture (build data, train 4 steps, index, retrieve) and are marked slow."""

import os

import grain
import numpy as np
import pytest

from cm3leon_jax import cli, configs
from cm3leon_jax.data import build, records
from cm3leon_jax.data.sources import image_text_source
from cm3leon_jax.paths import artifacts
from cm3leon_jax.retrieval import embed, retrieve
from cm3leon_jax.retrieval.index import Index, load_embeddings
from cm3leon_jax.retrieval.strategy import Retriever
from cm3leon_jax.retrieval.train_encoder import load_embedder
from cm3leon_jax.tokenizers.text import TextTokenizer

OVERRIDES = ["data.num_train=96", "data.num_eval=16", "data.num_heldout=16",
             "retrieval.steps=4", "retrieval.batch_size=16", "train.checkpoint_every=4"]


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
  """A built tiny Shapes dataset + text tokenizer; the CLI jobs run in this workdir."""
  root = tmp_path_factory.mktemp("retrieval")
  config = configs.load("tiny", [f"workdir={root}"] + OVERRIDES)
  build.build(config, "shapes")
  texts = [x["text"] for x in image_text_source(config, "train")]
  TextTokenizer.train(texts, config.vocab.text_size).save(artifacts(config).text_tokenizer)
  return root


def args(workdir, *extra):
  return ["--config", "tiny", f"--config.workdir={workdir}",
          *[f"--config.{o}" for o in OVERRIDES], *extra]


@pytest.fixture(scope="module")
def pipeline_done(workdir):
  """train-retriever -> index -> retrieve through the CLI, as a user runs them."""
  assert cli.main(["train-retriever", *args(workdir, "--eval-pairs", "16")]) == 0
  assert cli.main(["index", *args(workdir)]) == 0
  assert cli.main(["retrieve", *args(workdir, "--chunk-size", "40")]) == 0
  return configs.load("tiny", [f"workdir={workdir}"] + OVERRIDES)


@pytest.mark.slow
def test_retrieve_writes_neighbours_for_every_train_document(pipeline_done):
  paths = artifacts(pipeline_done)
  meta = records.read_meta(paths.neighbours)
  assert meta["num_records"] == 96 and meta["split"] == "train"
  data = grain.sources.ArrayRecordDataSource(records.shard_paths(paths.neighbours))
  bank_unit = load_embeddings(paths.index)
  bank_unit = bank_unit / np.linalg.norm(bank_unit, axis=1, keepdims=True)
  counts = []
  for doc_id in range(96):
    owner, ids = records.decode_neighbours(data[doc_id])
    assert owner == doc_id
    assert len(ids) <= 4 and len(set(ids.tolist())) == len(ids)
    assert doc_id not in ids and np.all((ids >= 0) & (ids < 96))
    assert np.all(bank_unit[ids] @ bank_unit[doc_id] <= 0.9 + 1e-6)  # no near-duplicates
    counts.append(len(ids))
  # A 4-step encoder sees many scenes as near-duplicates (cosine > 0.9), so some documents
  # keep fewer than 2 x k_per_modality neighbours; most keep some.
  assert np.mean(counts) > 1
  assert not os.path.exists(f"{paths.neighbours}.partial")  # chunks removed once written
  assert not os.path.exists(f"{paths.index}.partial")


@pytest.mark.slow
def test_index_holds_the_train_split_with_brute_force_settings(pipeline_done):
  index = Index.load(artifacts(pipeline_done).index)
  assert index.num_vectors == 96 and index.dim == 32 and index.settings[0].brute_force


@pytest.mark.slow
def test_retrieve_resumes_from_finished_chunks_with_identical_results(pipeline_done, tmp_path):
  config = pipeline_done
  paths = artifacts(config)
  index, bank = Index.load(paths.index), load_embeddings(paths.index)
  embedder = load_embedder(config)
  source = image_text_source(config, "train")
  full = retrieve.compute_neighbours(config, embedder, index, bank, source,
                                     str(tmp_path / "a"), chunk_size=40, progress=False)
  # Simulate a crash after the first chunk: keep only chunk 0, then rerun.
  work = tmp_path / "b"
  retrieve.compute_neighbours(config, embedder, index, bank, source, str(work), chunk_size=40,
                              progress=False)
  for path in sorted(work.glob("chunk-*.npz"))[1:]:
    path.unlink()
  resumed = retrieve.compute_neighbours(config, embedder, index, bank, source, str(work),
                                        chunk_size=40, progress=False)
  assert all(np.array_equal(a, b) for a, b in zip(full, resumed))
  embed.cleanup(str(work))
  assert not work.exists()


@pytest.mark.slow
def test_retrieve_for_prompt_returns_k_distinct_bank_documents(pipeline_done):
  retriever = Retriever.load(pipeline_done)
  source = image_text_source(pipeline_done, "eval")
  ids = retriever.retrieve_for_prompt(source[0]["text"], k=2)
  assert len(ids) == 2 and len(set(ids.tolist())) == 2 and ids.max() < 96
  both = retriever.retrieve_for_prompt(source[0]["text"], image=source[0]["image"], k=3)
  assert len(both) == 3 and len(set(both.tolist())) == 3


@pytest.mark.slow
def test_retrieve_for_prompt_bad_input(pipeline_done):
  from cm3leon_jax.errors import InputError

  retriever = Retriever.load(pipeline_done)
  with pytest.raises(InputError, match="k=97 is larger than the memory bank"):
    retriever.retrieve_for_prompt("a red circle", k=97)
  with pytest.raises(InputError, match="neither text nor an image"):
    retriever.retrieve_for_prompt("", k=1)


def test_retrieve_without_an_index_is_one_error_line(tmp_path, capsys):
  code = cli.main(["retrieve", "--config", "tiny", f"--config.workdir={tmp_path}"])
  err = capsys.readouterr().err
  assert code == 2 and err.startswith("error: ") and "not an index directory" in err


def test_index_without_a_trained_retriever_is_one_error_line(tmp_path, capsys):
  code = cli.main(["index", "--config", "tiny", f"--config.workdir={tmp_path}"])
  err = capsys.readouterr().err
  assert code == 2 and "run `cm3leon train-retriever`" in err


@pytest.mark.slow
def test_index_with_a_negative_soar_lambda_fails_before_embedding(pipeline_done, tmp_path, capsys):
  out = str(tmp_path / "index")
  code = cli.main(["index", *args(pipeline_done.workdir, "--output", out,
                                  "--config.retrieval.soar_lambda=-1.0")])
  err = capsys.readouterr().err
  assert code == 2 and err.startswith("error: ") and "retrieval.soar_lambda=-1.0" in err
  assert not os.path.exists(out) and not os.path.exists(out + ".partial")

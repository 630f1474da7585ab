"""The retrieval benchmark's encoder mode: Shapes embeddings from the project's own encoder."""

import importlib.util
import os
import sys

import numpy as np
import pytest

from cm3leon_jax.data import shapes
from experiments.bench import encoder_docs

SCRIPT = os.path.join(os.path.dirname(__file__), "..", "experiments", "bench", "retrieval.py")


def _load_script():
  spec = importlib.util.spec_from_file_location("bench_retrieval", SCRIPT)
  module = importlib.util.module_from_spec(spec)
  sys.modules[spec.name] = module
  spec.loader.exec_module(module)
  return module


def test_scene_keys_are_equal_exactly_for_equal_scenes():
  scenes = [shapes.scene_at(0, i, "train", 3) for i in range(3000)]
  keys = [encoder_docs.scene_key(s) for s in scenes]
  by_key = {}
  for key, scene in zip(keys, scenes):
    assert by_key.setdefault(key, scene) == scene
  assert len(set(keys)) == len(set(scenes))


@pytest.mark.slow
def test_encoder_mode_embeds_builder_documents_and_benchmarks_them(tmp_path, capsys):
  pytest.importorskip("faiss")
  from cm3leon_jax.retrieval import pairs
  from cm3leon_jax.retrieval.encoder import document_embedding
  from cm3leon_jax.retrieval.train_encoder import load_embedder

  workdir = str(tmp_path / "enc")
  argv = ["--sizes", "", "--queries", "50", "--encoder-docs", "2000", "--encoder-workdir",
          workdir, "--encoder-dim", "32", "--encoder-preset", "tiny"]
  _load_script().main(argv)
  out = capsys.readouterr().out
  name = "encoder Shapes 2k x 32"
  for method in ("exact", "ScaNN", "FAISS IVF-PQ", "FAISS HNSW"):
    assert f"| {name} | {method}" in out
  assert f"{name}: encoder step 20, " in out and "distinct scenes among 2,000 documents" in out

  # cached under the encoder's step: another encoder checkpoint never reuses these
  bank = np.load(os.path.join(workdir, "bench_docs", "encoder-20", "train-2000.npy"))
  assert bank.shape == (2000, 32) and bank.dtype == np.float32
  # Bank document i is record i of the built dataset, embedded as the index job embeds it.
  config = encoder_docs.pipeline_config(workdir, 32, "tiny")
  images, texts = pairs.take(pairs.open_pairs(config, "train"), 16)
  embedder = load_embedder(config)
  expected = document_embedding(embedder.embed_texts(texts), embedder.embed_images(images))
  np.testing.assert_allclose(bank[:16], expected, atol=1e-5)

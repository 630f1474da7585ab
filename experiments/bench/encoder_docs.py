"""Benchmark data: document embeddings of N rendered Shapes scenes from the project's own encoder.

    bank_ND, queries_QD, stats = encoder_docs.embeddings(workdir, n=100_000, num_queries=1000)

`workdir` is a quickstart-preset pipeline whose dual encoder has `retrieval.embed_dim=dim`
(128: the issue's benchmark dimension; the quickstart's own encoder is 64-d). Stages it lacks
(Shapes data, text tokenizer, dual encoder) are run through the CLI once and then reused.

Bank document i is train-split scene i exactly as the Shapes builder makes it (scene_at(seed,
i, 'train'), caption from the builder's stream [seed, 7, split, i], rendered at the preset's
size) for any i, not only the 20k the builder stored: the training corpus, extended. Queries are
eval-split scenes 0..Q-1 (same distribution, another random stream: no query document is a bank
document, though its scene composition may recur there, as in real data). A document's
embedding is the encoder's document embedding (mean of the L2-normalised text and image
embeddings), computed in resumable 10k-document chunks (retrieval/embed.py run_chunks) under
`<workdir>/bench_docs/encoder-<step>/<split>/`; the finished [N, dim] float32 array is cached
as `<workdir>/bench_docs/encoder-<step>/<split>-<N>.npy` and reused on a re-run. The cache is
keyed by the encoder checkpoint's step (`step`: default the latest), so embeddings of one
encoder are never served for another (a preset that trains the encoder longer resumes it to a
new step).

Shapes has finitely many compositions, so scenes repeat; each chunk also stores a scene key
(background and every object's shape, colour, size and cell as one integer), from which
`stats` counts the distinct scenes among the N and the queries whose scene occurs in the bank.
"""

from __future__ import annotations

import os

import numpy as np

from cm3leon_jax import cli, configs
from cm3leon_jax.data import shapes
from cm3leon_jax.paths import artifacts
from cm3leon_jax.retrieval.embed import run_chunks
from cm3leon_jax.retrieval.encoder import document_embedding

CHUNK = 10_000  # divides 100k and 1M: the 1M run reuses the 100k run's chunks


def pipeline_config(workdir: str, dim: int = 128, preset: str = "quickstart"):
  return configs.load(preset, [f"workdir={workdir}", f"retrieval.embed_dim={dim}"])


def ensure_encoder(workdir: str, dim: int = 128, preset: str = "quickstart") -> None:
  """Run the pipeline stages the encoder needs that `workdir` does not hold yet."""
  config = pipeline_config(workdir, dim, preset)
  paths = artifacts(config)
  overrides = ["--config", preset, f"--config.workdir={workdir}",
               f"--config.retrieval.embed_dim={dim}"]
  steps = [int(n) for n in os.listdir(paths.retriever) if n.isdigit()] if os.path.isdir(
      paths.retriever) else []
  stages = [(["data", "build", "shapes"], os.path.isdir(paths.data_dir)),
            (["train-text-tokenizer"], os.path.isfile(paths.text_tokenizer)),
            # An interrupted training run has early checkpoints: train-retriever resumes it.
            (["train-retriever"], max(steps, default=-1) >= config.retrieval.steps)]
  for argv, done in stages:
    if done:
      continue
    print(f"encoder_docs: cm3leon {' '.join(argv + overrides)}", flush=True)
    if cli.main(argv + overrides) != 0:
      raise RuntimeError(f"cm3leon {argv[0]} failed for {workdir}")


def scene_key(scene: shapes.Scene) -> int:
  """One integer per distinct scene: background, then each object's (shape, colour, size, cell)."""
  key = shapes.BACKGROUND_NAMES.index(scene.background)
  per_object = len(shapes.SHAPES) * len(shapes.COLOUR_NAMES) * len(shapes.SIZE_NAMES) * 9
  for o in scene.objects:  # objects are in reading order, so equal scenes give equal keys
    code = (((shapes.SHAPES.index(o.shape) * len(shapes.COLOUR_NAMES)
              + shapes.COLOUR_NAMES.index(o.colour)) * len(shapes.SIZE_NAMES)
             + shapes.SIZE_NAMES.index(o.size)) * 9 + o.cell)
    key = key * (per_object + 1) + code + 1
  return key


def scene_docs(config, split: str, start: int, stop: int):
  """(images uint8 [n, S, S, 3], captions, scene keys int64 [n]) of scenes [start, stop), as the
  Shapes builder (data/builders/shapes.py) makes record i of `split`."""
  d, size = config.data, config.vq.image_size
  images, texts, keys = [], [], []
  for i in range(start, stop):
    scene = shapes.scene_at(d.seed, i, split, d.max_objects)
    texts.append(shapes.caption(scene, np.random.default_rng([d.seed, 7,
                                                               shapes.SPLITS.index(split), i])))
    images.append(shapes.render(scene, size))
    keys.append(scene_key(scene))
  return np.stack(images), texts, np.asarray(keys, np.int64)


def embed_scenes(config, embedder, split: str, n: int, root: str, progress: bool = True) -> dict:
  """{'doc': [n, E] float32, 'key': [n] int64} for scenes 0..n-1 of `split`, cached."""
  cache = os.path.join(root, f"{split}-{n}")
  if os.path.isfile(cache + ".npy") and os.path.isfile(cache + "-keys.npy"):
    return {"doc": np.load(cache + ".npy"), "key": np.load(cache + "-keys.npy")}

  def compute(c, start, stop):
    images, texts, keys = scene_docs(config, split, start, stop)
    doc = document_embedding(embedder.embed_texts(texts), embedder.embed_images(images))
    return {"doc": doc.astype(np.float32), "key": keys}

  out = run_chunks(n, CHUNK, os.path.join(root, split), compute, f"embed {split} scenes",
                   progress)
  for name, suffix in (("doc", ".npy"), ("key", "-keys.npy")):
    tmp = f"{cache}.tmp-{os.getpid()}{suffix}"
    np.save(tmp, out[name])
    os.replace(tmp, cache + suffix)
  return out


def embeddings(workdir: str, n: int, num_queries: int, dim: int = 128,
               preset: str = "quickstart", progress: bool = True, step: int | None = None):
  """(bank [n, dim], queries [num_queries, dim], stats) from the encoder in `workdir` (its
  checkpoint at `step`, default the latest)."""
  from cm3leon_jax.retrieval.train_encoder import load_embedder

  ensure_encoder(workdir, dim, preset)
  config = pipeline_config(workdir, dim, preset)
  saved = sorted(int(d) for d in os.listdir(artifacts(config).retriever) if d.isdigit())
  step = saved[-1] if step is None else step
  if step not in saved:
    raise ValueError(f"{artifacts(config).retriever}: no encoder checkpoint at step {step} "
                     f"(saved: {saved})")
  root = os.path.join(workdir, "bench_docs", f"encoder-{step}")
  embedder = None

  def get(split, count):
    nonlocal embedder
    cache = os.path.join(root, f"{split}-{count}")
    if embedder is None and not os.path.isfile(cache + ".npy"):
      embedder = load_embedder(config, step=step, batch_size=1024)
    return embed_scenes(config, embedder, split, count, root, progress)

  bank, queries = get("train", n), get("eval", num_queries)
  stats = {"encoder_step": step, "distinct_scenes": int(len(np.unique(bank["key"]))),
           "queries_in_bank": int(np.isin(queries["key"], bank["key"]).sum())}
  return bank["doc"], queries["doc"], stats

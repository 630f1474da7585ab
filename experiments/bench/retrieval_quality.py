"""Retrieval quality on Shapes, measured with the scenes' ground truth (issue 5's "Must show").

    python experiments/bench/retrieval_quality.py --config quickstart --config.workdir=DIR

Needs a workdir where `cm3leon data build shapes`, `train-text-tokenizer`, `train-retriever`,
`index` and `retrieve` have run. Prints:
1. text-to-image recall@1 of the trained encoder on held-out (eval split) pairs, strict (the
   query's own image) and by scene (an image whose objects equal the caption's objects);
2. how often the static neighbours share attributes with their query document, against
   chance (the same number of bank documents drawn uniformly at random).
"""

from __future__ import annotations

import argparse
import os
import sys

import numpy as np

sys.path.insert(0, os.path.abspath(os.path.join(os.path.dirname(__file__), "..", "..")))

from cm3leon_jax import configs  # noqa: E402
from cm3leon_jax.cli import _split_overrides  # noqa: E402
from cm3leon_jax.data import records  # noqa: E402
from cm3leon_jax.data.sources import image_text_source  # noqa: E402
from cm3leon_jax.paths import artifacts  # noqa: E402
from cm3leon_jax.retrieval.pairs import take  # noqa: E402
from cm3leon_jax.retrieval.train_encoder import load_embedder  # noqa: E402


def objects(scene):
  return {(o.shape, o.colour, o.size, o.row, o.col) for o in scene.objects}


RELATIONS = {
    "shares a (colour, shape) object": lambda a, b: bool(
        {(o.colour, o.shape) for o in a.objects} & {(o.colour, o.shape) for o in b.objects}),
    "shares a colour": lambda a, b: bool({o.colour for o in a.objects} &
                                         {o.colour for o in b.objects}),
    "shares a shape": lambda a, b: bool({o.shape for o in a.objects} &
                                        {o.shape for o in b.objects}),
    "same object count": lambda a, b: len(a.objects) == len(b.objects),
    "shares an identical object (shape, colour, size, cell)":
        lambda a, b: bool(objects(a) & objects(b)),
}


def main(argv=None):
  argv = list(sys.argv[1:] if argv is None else argv)
  overrides, rest = _split_overrides(argv)
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument("--config", default="quickstart")
  p.add_argument("--eval-pairs", type=int, default=1000)
  p.add_argument("--queries", type=int, default=2000, help="train documents to score")
  args = p.parse_args(rest)
  config = configs.load(args.config, overrides)
  paths = artifacts(config)

  # 1. Held-out text-to-image recall@1.
  embedder = load_embedder(config)
  eval_source = image_text_source(config, "eval")
  n = min(args.eval_pairs, len(eval_source))
  images, texts = take(eval_source, n)
  scenes = [eval_source[i]["scene"] for i in range(n)]
  best = np.argmax(embedder.embed_texts(texts) @ embedder.embed_images(images).T, axis=1)
  strict = np.mean(best == np.arange(n))
  by_scene = np.mean([objects(scenes[i]) == objects(scenes[j]) for i, j in enumerate(best)])
  print(f"held-out text-to-image recall@1 over {n} eval pairs: {strict:.3f} strict, "
        f"{by_scene:.3f} by scene objects (chance {1 / n:.4f})")

  # 2. Neighbours vs chance, by ground-truth attributes.
  source = image_text_source(config, "train")
  import grain
  neighbours = grain.sources.ArrayRecordDataSource(records.shard_paths(paths.neighbours))
  rng = np.random.default_rng(0)
  queries = rng.choice(len(source), size=min(args.queries, len(source)), replace=False)
  scene_cache = {}

  def scene(i):
    if i not in scene_cache:
      scene_cache[i] = source[int(i)]["scene"]
    return scene_cache[i]

  hits = {name: [0, 0] for name in RELATIONS}  # [retrieved, random]
  total, counts = 0, []
  for q in queries:
    _, ids = records.decode_neighbours(neighbours[int(q)])
    counts.append(len(ids))
    random_ids = rng.choice(np.setdiff1d(np.arange(len(source)), [q]), size=len(ids),
                            replace=False)
    for name, rel in RELATIONS.items():
      hits[name][0] += sum(rel(scene(q), scene(i)) for i in ids)
      hits[name][1] += sum(rel(scene(q), scene(i)) for i in random_ids)
    total += len(ids)
  print(f"\nstatic neighbours of {len(queries)} train documents ({np.mean(counts):.2f} per "
        f"document; bank {len(source)}):")
  print("| attribute shared with the query | retrieved | random (chance) | ratio |")
  print("|---|---:|---:|---:|")
  for name, (got, chance) in hits.items():
    got, chance = got / max(total, 1), chance / max(total, 1)
    print(f"| {name} | {got:.3f} | {chance:.3f} | {got / max(chance, 1e-9):.1f}x |")


if __name__ == "__main__":
  main()

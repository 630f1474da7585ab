"""Do images of never-seen colour-shape pairs need VQ code patterns the decoder never saw?

    python -m experiments.code_novelty --config quickstart
    python -m experiments.code_novelty --config quickstart --window 3 --max-images 1000

Encodes every training image with the run's VQ (what `cm3leon encode` wrote for the decoder's
training documents) and the first `--max-images` single-object images of each split, then
counts, per split: codes that never occur in a training image, and k x k windows of codes
(`--window`, default 2) touching the object (holding a code other than the image's most common
one, its background) that never occur anywhere in the training images.

Why: text-to-image on colour-shape pairs never seen in training fails on the shape (issue 9).
On the quickstart's VQ of the time (4x downsampling, 256 joint codes; 2026-11-29; on such a
workdir add `--config.vq.codebook_size=256 --config.vq.colour_codes=0`) every code of a
never-seen pair's image is common in training (median object code: ~3,000 training
occurrences), but 38.9%
of the 2 x 2 code windows around its object never occur in the 20,000 training images (every
such image has one), against 0.0% for unseen scenes of seen pairs: a code carries the colour
and the local geometry together, so drawing a red triangle means producing local arrangements
of codes the decoder has never been trained to produce, not recombining familiar ones.

With colour-factorised codes (`vq.colour_codes` > 0, tokenizers/vq.py; the quickstart's since
2026-11-29) the table has a row per split for the tokens, their geometry codes (token // C) and
their colour codes (token % C). The quickstart's 128 x 64 VQ: 2x2 windows never in training
around a never-seen pair's object: tokens 37.8%, geometry 10.2%, colour 15.0% (seen pairs'
unseen scenes: 3.3%, 0.6%, 0.0%). The decoder scores geometry and colour apart, so what it
must produce for a red triangle is mostly a seen triangle's geometry and red's colours.
"""

from __future__ import annotations

import argparse
import sys
from typing import Iterable, Sequence

import numpy as np

from cm3leon_jax import configs
from cm3leon_jax.errors import InputError


def windows(codes_G_G: np.ndarray, k: int) -> list[tuple[int, ...]]:
  """Every k x k window of a [G, G] code grid, row-major, as a tuple of its codes."""
  g = codes_G_G.shape[0]
  return [tuple(int(c) for c in codes_G_G[r:r + k, q:q + k].reshape(-1))
          for r in range(g - k + 1) for q in range(g - k + 1)]


def object_windows(codes_G_G: np.ndarray, k: int) -> list[tuple[int, ...]]:
  """The windows holding a code other than the image's background (its most common code)."""
  background = int(np.bincount(codes_G_G.reshape(-1)).argmax())
  return [w for w in windows(codes_G_G, k) if any(c != background for c in w)]


def seen_patterns(train_BGG: Iterable[np.ndarray], k: int) -> tuple[set, set]:
  """The codes and the k x k windows that occur in the training grids (built once per run)."""
  seen_codes, seen_windows = set(), set()
  for grid in train_BGG:
    seen_codes.update(int(c) for c in grid.reshape(-1))
    seen_windows.update(windows(grid, k))
  return seen_codes, seen_windows


def novelty(seen: tuple[set, set], query_BGG: Sequence[np.ndarray], k: int) -> dict:
  """Rates over the query images of codes and object windows that no training image holds;
  `seen`: `seen_patterns` of the training grids with the same k."""
  seen_codes, seen_windows = seen
  n_codes = new_codes = n_windows = new_windows = with_new = 0
  for grid in query_BGG:
    n_codes += grid.size
    new_codes += sum(int(c) not in seen_codes for c in grid.reshape(-1))
    found = object_windows(grid, k)
    new = sum(w not in seen_windows for w in found)
    n_windows += len(found)
    new_windows += new
    with_new += new > 0
  images = max(len(query_BGG), 1)
  return {"images": len(query_BGG), "codes_new": new_codes / max(n_codes, 1),
          "windows_per_image": n_windows / images,
          "windows_new": new_windows / max(n_windows, 1), "images_with_new": with_new / images}


def factors(config) -> dict:
  """The code grids each table row measures: the tokens, and with colour-factorised codes also
  their geometry (token // C) and colour (token % C) parts."""
  c = int(config.vq.get("colour_codes", 0))
  if not c:
    return {"tokens": lambda g: g}
  return {"tokens": lambda g: g, "geometry": lambda g: g // c, "colour": lambda g: g % c}


def _grids(config, split: str, max_images: int | None, single: bool) -> list[np.ndarray]:
  from cm3leon_jax.data import sources
  from cm3leon_jax.tokenizers.vq import ImageTokenizer

  docs = sources.image_text_source(config, split)
  if len(docs) and "scene" not in docs[0]:
    raise InputError(f"{config.data.dataset}: no scenes (this measures the Shapes dataset)")
  images = []
  for i in range(len(docs)):
    if max_images is not None and len(images) >= max_images:
      break
    if not single or len(docs[i]["scene"].objects) == 1:
      images.append(docs[i]["image"])
  if not images:
    raise InputError(f"{split}: no {'single-object ' if single else ''}images")
  grid = config.vq.image_size // config.vq.downsample
  tokenizer = ImageTokenizer.load(config)
  out = []
  for start in range(0, len(images), 1024):
    codes = np.asarray(tokenizer.encode(np.stack(images[start:start + 1024])))
    out += list(codes.reshape(-1, grid, grid))
  return out


def main(argv: Sequence[str] | None = None) -> int:
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("--config", default="quickstart")
  parser.add_argument("--splits", nargs="+", default=["heldout", "eval"])
  parser.add_argument("--max-images", type=int, default=300,
                      help="single-object images per split")
  parser.add_argument("--window", type=int, default=2, help="k of the k x k code windows")
  from cm3leon_jax.cli import _split_overrides

  overrides, rest = _split_overrides(sys.argv[1:] if argv is None else list(argv))
  args = parser.parse_args(rest)
  try:
    if args.window < 1:
      raise InputError(f"--window {args.window}: must be >= 1")
    config = configs.load(args.config, [o[len("--config."):] for o in overrides])
    train = _grids(config, "train", None, single=False)
    queries = {split: _grids(config, split, args.max_images, single=True)
               for split in args.splits}
    rows = {}
    for name, part in factors(config).items():
      seen = seen_patterns([part(g) for g in train], args.window)
      for split, grids in queries.items():
        rows[split, name] = novelty(seen, [part(g) for g in grids], args.window)
  except InputError as e:
    print(f"error: {e}", file=sys.stderr)
    return 2
  print(f"{len(train)} training images encoded with {config.workdir}'s VQ; "
        f"{args.window} x {args.window} code windows touching the object\n")
  print("| split | codes | single-object images | codes never in training | object windows per "
        "image | windows never in training | images with such a window |")
  print("|---|---|---|---|---|---|---|")
  for (split, name), r in rows.items():
    print(f"| {split} | {name} | {r['images']} | {r['codes_new']:.2%} | "
          f"{r['windows_per_image']:.1f} | {r['windows_new']:.1%} | {r['images_with_new']:.1%} |")
  return 0


if __name__ == "__main__":
  sys.exit(main())

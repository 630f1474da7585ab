"""Feature extractors for the Fréchet distance (eval/fid.py): images -> [N, D] float vectors.

    extract = feature_extractor(config, embedder)      # config.eval.fid_features picks one
    fid(extract(generated_NHW3), extract(real_MHW3))

- "encoder" (default): the project's trained dual encoder's image tower (the retriever's
  CLIP-style ViT), its L2-normalised image embedding, as CLIP-feature FIDs do. No Inception
  weights can be downloaded here, so these numbers are comparable within this project (same
  checkpoint, same preset), never with published FIDs (CM3Leon's 4.88 is Inception on COCO).
- "pixels": the image box-filtered to 8x8 and flattened (192 values in [0, 1]). Needs no
  trained model; sees colour and layout, not shape. A sanity check, not a perceptual metric.
- "inception": FID's own Inception-v3 pool3 features (2048-d, eval/inception.py) from the .npz
  at `config.eval.inception_weights`, which the user makes from weights they have
  (`python -m experiments.convert_inception pt_inception-2015-12-05-*.pth out.npz`). With
  pytorch-fid's weights these are the features published FIDs use (the images, their count and
  their size still differ from the paper's COCO set).
"""

from __future__ import annotations

import os
from typing import Callable

import numpy as np

from cm3leon_jax.errors import InputError

FEATURES = ("encoder", "pixels", "inception")
PIXEL_GRID = 8

Extractor = Callable[[np.ndarray], np.ndarray]


def pixel_features(images_NHW3, grid: int = PIXEL_GRID) -> np.ndarray:
  """uint8 [N, S, S, 3] -> float64 [N, grid*grid*3]: mean colour of each of grid x grid blocks."""
  x = np.asarray(images_NHW3)
  if x.ndim != 4 or x.shape[-1] != 3 or x.shape[1] != x.shape[2] or x.shape[1] % grid:
    raise InputError(f"pixel features: expected [N, S, S, 3] images with S a multiple of {grid}, "
                     f"got shape {x.shape}")
  n, s = x.shape[0], x.shape[1]
  blocks = x.astype(np.float64).reshape(n, grid, s // grid, grid, s // grid, 3).mean((2, 4))
  return blocks.reshape(n, -1) / 255.0


def encoder_features(embedder) -> Extractor:
  """The dual encoder's image embeddings ([N, embed_dim], unit norm) as features."""
  return lambda images_NHW3: np.asarray(embedder.embed_images(images_NHW3), np.float64)


def inception_features(path: str) -> Extractor:
  """FID's Inception-v3 on the weights file at `path`; loading checks every key and shape, so a
  bad file fails here, before any decoding (eval_cli.py builds the extractor first)."""
  if not path:
    raise InputError("--config.eval.fid_features='inception' needs "
                     "--config.eval.inception_weights=PATH: an .npz made from Inception weights "
                     "you have by `python -m experiments.convert_inception` (none can be "
                     "downloaded here)")
  if not os.path.isfile(path):
    raise InputError(f"--config.eval.inception_weights={path}: no such file")
  from cm3leon_jax.eval import inception  # jax and the network only when asked for

  return inception.extractor(inception.load_params(path))


def feature_extractor(config, embedder=None) -> Extractor:
  """The extractor `config.eval.fid_features` names; "encoder" needs the trained `embedder`,
  "inception" the weights file `config.eval.inception_weights`."""
  name = config.eval.fid_features
  if name == "pixels":
    return pixel_features
  if name == "encoder":
    if embedder is None:
      raise InputError("--config.eval.fid_features=encoder needs the trained dual encoder "
                       "(run `cm3leon train-retriever`), or set it to 'pixels'")
    return encoder_features(embedder)
  if name == "inception":
    return inception_features(config.eval.inception_weights)
  raise InputError(f"--config.eval.fid_features={name!r}: expected one of {FEATURES}")

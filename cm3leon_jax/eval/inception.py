"""Inception-v3 pool3 features (2048-d) for FID, from a weights file the user brings.

    params = load_params("inception_fid.npz")     # made by experiments/convert_inception.py
    extract = extractor(params)                  # uint8 [N, H, W, 3] -> float64 [N, 2048]

The network is the one FID is defined with (TF's 2015-12-05 Inception graph, as pytorch-fid ports
it): images scaled to [0, 1], resized bilinearly to 299x299 (half-pixel centres, no antialiasing:
PyTorch's `interpolate(align_corners=False)`), mapped to [-1, 1], then the stem, Mixed_5b..7c and a
global average pool ("pool3"). It differs from torchvision's `inception_v3` only in the pool branch
of Mixed_5b..d, 6b..e and 7b (the 3x3 average ignores the zero padding, as TF's does) and of 7c (a
3x3 max pool); `fid_variant=False` runs torchvision's graph. Tests check each graph against its
PyTorch original (pytorch-fid's InceptionV3, torchvision's inception_v3) on shared random weights.
Every conv is followed by eval-mode BatchNorm (eps 1e-3), folded into the conv here.

The weights file is an .npz whose keys are PyTorch state-dict names (`Conv2d_1a_3x3.conv.weight`
[out, in, kh, kw], `Conv2d_1a_3x3.bn.running_mean` [out], ...): exactly the tensors pool3 needs
(no `fc`, `AuxLogits` or `num_batches_tracked`). Nothing is downloaded: FID numbers comparable with
published ones need pytorch-fid's `pt_inception-2015-12-05-*.pth`, converted.
"""

from __future__ import annotations

import functools
import os
import zipfile
from typing import Callable, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from cm3leon_jax.errors import InputError

SIZE = 299  # FID's input resolution
FEATURE_DIM = 2048
BN_EPS = 1e-3
BATCH = 16  # images per jitted call (the largest activation, 147x147x64 float32, is 5.5 MB each)
BN_PARTS = ("weight", "bias", "running_mean", "running_var")


class Conv(NamedTuple):
  """One conv + BatchNorm + ReLU unit (torchvision's BasicConv2d). Every one of them either keeps
  the size (stride 1, padding k // 2 = "SAME") or pads nothing ("VALID")."""
  cin: int
  cout: int
  kh: int
  kw: int
  stride: int = 1
  padding: str = "SAME"


def _block_a(cin: int, pool: int) -> dict[str, Conv]:
  return {"branch1x1": Conv(cin, 64, 1, 1),
          "branch5x5_1": Conv(cin, 48, 1, 1), "branch5x5_2": Conv(48, 64, 5, 5),
          "branch3x3dbl_1": Conv(cin, 64, 1, 1), "branch3x3dbl_2": Conv(64, 96, 3, 3),
          "branch3x3dbl_3": Conv(96, 96, 3, 3),
          "branch_pool": Conv(cin, pool, 1, 1)}


def _block_b(cin: int) -> dict[str, Conv]:
  return {"branch3x3": Conv(cin, 384, 3, 3, 2, "VALID"),
          "branch3x3dbl_1": Conv(cin, 64, 1, 1), "branch3x3dbl_2": Conv(64, 96, 3, 3),
          "branch3x3dbl_3": Conv(96, 96, 3, 3, 2, "VALID")}


def _block_c(cin: int, c7: int) -> dict[str, Conv]:
  return {"branch1x1": Conv(cin, 192, 1, 1),
          "branch7x7_1": Conv(cin, c7, 1, 1), "branch7x7_2": Conv(c7, c7, 1, 7),
          "branch7x7_3": Conv(c7, 192, 7, 1),
          "branch7x7dbl_1": Conv(cin, c7, 1, 1), "branch7x7dbl_2": Conv(c7, c7, 7, 1),
          "branch7x7dbl_3": Conv(c7, c7, 1, 7), "branch7x7dbl_4": Conv(c7, c7, 7, 1),
          "branch7x7dbl_5": Conv(c7, 192, 1, 7),
          "branch_pool": Conv(cin, 192, 1, 1)}


def _block_d(cin: int) -> dict[str, Conv]:
  return {"branch3x3_1": Conv(cin, 192, 1, 1), "branch3x3_2": Conv(192, 320, 3, 3, 2, "VALID"),
          "branch7x7x3_1": Conv(cin, 192, 1, 1), "branch7x7x3_2": Conv(192, 192, 1, 7),
          "branch7x7x3_3": Conv(192, 192, 7, 1), "branch7x7x3_4": Conv(192, 192, 3, 3, 2, "VALID")}


def _block_e(cin: int) -> dict[str, Conv]:
  return {"branch1x1": Conv(cin, 320, 1, 1),
          "branch3x3_1": Conv(cin, 384, 1, 1), "branch3x3_2a": Conv(384, 384, 1, 3),
          "branch3x3_2b": Conv(384, 384, 3, 1),
          "branch3x3dbl_1": Conv(cin, 448, 1, 1), "branch3x3dbl_2": Conv(448, 384, 3, 3),
          "branch3x3dbl_3a": Conv(384, 384, 1, 3), "branch3x3dbl_3b": Conv(384, 384, 3, 1),
          "branch_pool": Conv(cin, 192, 1, 1)}


STEM = {"Conv2d_1a_3x3": Conv(3, 32, 3, 3, 2, "VALID"),  # 299 -> 149
        "Conv2d_2a_3x3": Conv(32, 32, 3, 3, 1, "VALID"),  # -> 147
        "Conv2d_2b_3x3": Conv(32, 64, 3, 3),  # then a 3x3/2 max pool -> 73
        "Conv2d_3b_1x1": Conv(64, 80, 1, 1),
        "Conv2d_4a_3x3": Conv(80, 192, 3, 3, 1, "VALID")}  # -> 71, then 3x3/2 max pool -> 35

# (name, block kind, its convs, the pooling before its pool branch in the FID graph).
# "avg_valid": 3x3 mean over the in-image pixels only (TF's padding); torchvision's graph uses a
# mean counting the zero padding ("avg") in every A, C and E block.
MIXED = (("Mixed_5b", "A", _block_a(192, 32), "avg_valid"),  # 35x35
         ("Mixed_5c", "A", _block_a(256, 64), "avg_valid"),
         ("Mixed_5d", "A", _block_a(288, 64), "avg_valid"),
         ("Mixed_6a", "B", _block_b(288), None),  # -> 17x17
         ("Mixed_6b", "C", _block_c(768, 128), "avg_valid"),
         ("Mixed_6c", "C", _block_c(768, 160), "avg_valid"),
         ("Mixed_6d", "C", _block_c(768, 160), "avg_valid"),
         ("Mixed_6e", "C", _block_c(768, 192), "avg_valid"),
         ("Mixed_7a", "D", _block_d(768), None),  # -> 8x8
         ("Mixed_7b", "E", _block_e(1280), "avg_valid"),
         ("Mixed_7c", "E", _block_e(2048), "max"))  # -> 2048 channels, averaged: pool3

# Every conv unit by its state-dict prefix, in network order.
CONVS: dict[str, Conv] = {**STEM, **{f"{name}.{branch}": conv for name, _, convs, _ in MIXED
                                     for branch, conv in convs.items()}}


def state_dict_shapes() -> dict[str, tuple[int, ...]]:
  """The weights file's keys (PyTorch names) and shapes, in network order."""
  shapes = {}
  for name, c in CONVS.items():
    shapes[f"{name}.conv.weight"] = (c.cout, c.cin, c.kh, c.kw)
    for part in BN_PARTS:
      shapes[f"{name}.bn.{part}"] = (c.cout,)
  return shapes


def init_state_dict(seed: int = 0) -> dict[str, np.ndarray]:
  """Random weights in the file's layout (He-scaled convs, non-trivial BatchNorm statistics) so
  activations stay O(1) through the 94 layers. For tests and shape checks; meaningless features."""
  rng = np.random.default_rng(seed)
  state = {}
  for name, c in CONVS.items():
    fan_in = c.cin * c.kh * c.kw
    state[f"{name}.conv.weight"] = (rng.standard_normal((c.cout, c.cin, c.kh, c.kw), np.float32)
                                    * np.float32(np.sqrt(2.0 / fan_in)))
    state[f"{name}.bn.weight"] = rng.uniform(0.5, 1.5, c.cout).astype(np.float32)
    state[f"{name}.bn.bias"] = rng.uniform(-0.1, 0.1, c.cout).astype(np.float32)
    state[f"{name}.bn.running_mean"] = rng.uniform(-0.1, 0.1, c.cout).astype(np.float32)
    state[f"{name}.bn.running_var"] = rng.uniform(0.5, 1.5, c.cout).astype(np.float32)
  return state


def check_keys(keys, source: str, hint: str = "") -> None:
  """One InputError naming `source` and the first missing or unexpected key."""
  shapes, keys = state_dict_shapes(), set(keys)
  missing = [k for k in shapes if k not in keys]
  if missing:
    raise InputError(f"{source}: missing Inception weight {missing[0]!r} ({len(missing)} of "
                     f"{len(shapes)} missing{hint})")
  extra = sorted(k for k in keys if k not in shapes)
  if extra:
    raise InputError(f"{source}: unexpected key {extra[0]!r} ({len(extra)} unexpected; the file "
                     f"holds exactly the conv and BatchNorm tensors pool3 needs)")


def check_state_dict(state: dict, source: str) -> None:
  """One InputError naming `source` and the first missing, unexpected or misshapen key."""
  check_keys(state, source)
  for key, shape in state_dict_shapes().items():
    if tuple(np.shape(state[key])) != shape:
      raise InputError(f"{source}: {key!r} has shape {tuple(np.shape(state[key]))}, "
                       f"expected {shape}")


def fold(state: dict) -> dict[str, dict[str, np.ndarray]]:
  """PyTorch conv + eval BatchNorm tensors -> {unit: {"w_HWIO", "b"}}: BN(conv(x)) = conv'(x) + b
  with conv' scaled per output channel by gamma / sqrt(var + eps). Folded in float64."""
  params = {}
  for name in CONVS:
    get = lambda k: np.asarray(state[f"{name}.{k}"], np.float64)
    scale = get("bn.weight") / np.sqrt(get("bn.running_var") + BN_EPS)
    w_OIHW = get("conv.weight") * scale[:, None, None, None]
    params[name] = {"w_HWIO": w_OIHW.transpose(2, 3, 1, 0).astype(np.float32),
                    "b": (get("bn.bias") - get("bn.running_mean") * scale).astype(np.float32)}
  return params


def save_npz(state: dict, path: str) -> None:
  """Write a state dict (PyTorch names) as the weights file; checked first, written atomically."""
  check_state_dict(state, path)
  tmp = f"{path}.tmp.npz"
  np.savez(tmp, **{k: np.asarray(state[k], np.float32) for k in state_dict_shapes()})
  os.replace(tmp, path)


def load_params(path: str) -> dict[str, dict[str, jax.Array]]:
  """The weights file -> folded params on device. InputError naming the file (and key) when it is
  not there, not an .npz, or not exactly the expected keys and shapes."""
  if not os.path.isfile(path):
    raise InputError(f"{path}: no such Inception weights file")
  try:
    npz = np.load(path, allow_pickle=False)
  except (OSError, ValueError, EOFError) as e:
    raise InputError(f"{path}: not a readable .npz of Inception weights ({e})") from None
  if not isinstance(npz, np.lib.npyio.NpzFile):
    raise InputError(f"{path}: a single .npy array, not an .npz of Inception weights")
  with npz:
    # Keys before arrays: a zip of other things (a .pth) has other members.
    check_keys(npz.files, path, hint="; `python -m experiments.convert_inception` makes the "
               "file from a PyTorch state dict")
    try:
      state = {k: npz[k] for k in npz.files}
    except (OSError, ValueError, zipfile.BadZipFile) as e:
      raise InputError(f"{path}: unreadable array in the .npz ({e})") from None
  check_state_dict(state, path)
  return jax.device_put(fold(state))


# ---------------------------------------------------------------------------------------- network

def _unit(params, name: str, x_NHWC):
  # HIGHEST: float32 passes on accelerators too (their default rounds inputs to bf16), so the
  # features match the reference network's wherever they are computed.
  c = CONVS[name]
  y = jax.lax.conv_general_dilated(x_NHWC, params[name]["w_HWIO"], (c.stride, c.stride), c.padding,
                                   dimension_numbers=("NHWC", "HWIO", "NHWC"),
                                   precision=jax.lax.Precision.HIGHEST)
  return jax.nn.relu(y + params[name]["b"])


def _max_pool(x_NHWC, stride: int, padding: str):
  # Padding with -inf: a padded pixel never wins (PyTorch's max_pool2d padding).
  return jax.lax.reduce_window(x_NHWC, -jnp.inf, jax.lax.max, (1, 3, 3, 1), (1, stride, stride, 1),
                               padding)


def _pool3x3(x_NHWC, kind: str):
  """The stride-1 3x3 pooling ahead of a block's pool branch (size kept)."""
  if kind == "max":
    return _max_pool(x_NHWC, 1, "SAME")
  sums = jax.lax.reduce_window(x_NHWC, 0.0, jax.lax.add, (1, 3, 3, 1), (1, 1, 1, 1), "SAME")
  if kind == "avg":
    return sums / 9.0
  ones_1HW1 = jnp.ones((1, *x_NHWC.shape[1:3], 1), x_NHWC.dtype)
  counts = jax.lax.reduce_window(ones_1HW1, 0.0, jax.lax.add, (1, 3, 3, 1), (1, 1, 1, 1), "SAME")
  return sums / counts


def _mixed(params, name: str, kind: str, pool: str | None, x):
  u = lambda branch, h: _unit(params, f"{name}.{branch}", h)
  if kind == "A":
    branches = [u("branch1x1", x),
                u("branch5x5_2", u("branch5x5_1", x)),
                u("branch3x3dbl_3", u("branch3x3dbl_2", u("branch3x3dbl_1", x))),
                u("branch_pool", _pool3x3(x, pool))]
  elif kind == "B":
    branches = [u("branch3x3", x),
                u("branch3x3dbl_3", u("branch3x3dbl_2", u("branch3x3dbl_1", x))),
                _max_pool(x, 2, "VALID")]
  elif kind == "C":
    b7 = x
    for step in ("branch7x7_1", "branch7x7_2", "branch7x7_3"):
      b7 = u(step, b7)
    b7dbl = x
    for i in range(1, 6):
      b7dbl = u(f"branch7x7dbl_{i}", b7dbl)
    branches = [u("branch1x1", x), b7, b7dbl, u("branch_pool", _pool3x3(x, pool))]
  elif kind == "D":
    b7 = x
    for i in range(1, 5):
      b7 = u(f"branch7x7x3_{i}", b7)
    branches = [u("branch3x3_2", u("branch3x3_1", x)), b7, _max_pool(x, 2, "VALID")]
  else:  # "E": the 3x3 branches fork into a 1x3 and a 3x1 conv, concatenated
    b3 = u("branch3x3_1", x)
    b3dbl = u("branch3x3dbl_2", u("branch3x3dbl_1", x))
    branches = [u("branch1x1", x),
                u("branch3x3_2a", b3), u("branch3x3_2b", b3),
                u("branch3x3dbl_3a", b3dbl), u("branch3x3dbl_3b", b3dbl),
                u("branch_pool", _pool3x3(x, pool))]
  return jnp.concatenate(branches, axis=-1)


def network_input(images_NHW3):
  """uint8 [N, H, W, 3] -> float32 [N, 299, 299, 3] in [-1, 1]. Bilinear with half-pixel centres
  and no antialiasing when shrinking: PyTorch's interpolate(align_corners=False), as pytorch-fid."""
  x = images_NHW3.astype(jnp.float32) / 255.0
  x = jax.image.resize(x, (x.shape[0], SIZE, SIZE, 3), "bilinear", antialias=False)
  return 2.0 * x - 1.0


@functools.partial(jax.jit, static_argnames=("fid_variant",))
def pool3(params, images_NHW3, fid_variant: bool = True):
  """uint8 [N, H, W, 3] -> float32 [N, 2048]: resize to 299, [-1, 1], the network, mean pool."""
  x = network_input(images_NHW3)
  x = _unit(params, "Conv2d_2b_3x3", _unit(params, "Conv2d_2a_3x3",
                                           _unit(params, "Conv2d_1a_3x3", x)))
  x = _max_pool(x, 2, "VALID")
  x = _unit(params, "Conv2d_4a_3x3", _unit(params, "Conv2d_3b_1x1", x))
  x = _max_pool(x, 2, "VALID")
  for name, kind, _, fid_pool in MIXED:
    x = _mixed(params, name, kind, fid_pool if fid_variant or fid_pool is None else "avg", x)
  return x.mean(axis=(1, 2))


def extractor(params, fid_variant: bool = True,
              batch_size: int = BATCH) -> Callable[[np.ndarray], np.ndarray]:
  """images uint8 [N, H, W, 3] -> float64 [N, 2048], in jitted batches of batch_size, or of N
  rounded up to a power of two when fewer (padded): a handful of compiles per image size."""
  def extract(images_NHW3) -> np.ndarray:
    x = np.asarray(images_NHW3)
    if x.ndim != 4 or x.shape[-1] != 3 or x.dtype != np.uint8:
      raise InputError(f"Inception features: expected uint8 images [N, H, W, 3], got "
                       f"{x.dtype} {x.shape}")
    n = len(x)
    if n == 0:
      return np.zeros((0, FEATURE_DIM))
    b = min(batch_size, 1 << (n - 1).bit_length())
    out = []
    for start in range(0, n, b):
      chunk = x[start:start + b]
      pad = b - len(chunk)
      if pad:
        chunk = np.concatenate([chunk, np.zeros((pad, *x.shape[1:]), np.uint8)])
      out.append(np.asarray(pool3(params, chunk, fid_variant=fid_variant))[:b - pad])
    return np.concatenate(out).astype(np.float64)
  return extract

"""The VQ image tokenizer (REFERENCE.md section 1): conv encoder, vector quantiser, conv decoder.

    tok = ImageTokenizer.load(config)          # latest checkpoint under artifacts(config).vq
    codes_BN = tok.encode(images_BHWC_uint8)   # N = (image_size / downsample) ** 2
    images_BHWC = tok.decode(codes_BN)         # uint8 reconstructions

The encoder maps an image in [-1, 1] to a (H/f, W/f, code_dim) grid, f = vq.downsample (4, 8 or
16: one stride-2 conv per level transition, so `len(vq.channel_mult) == log2(f) + 1`). The
quantiser replaces each vector by its nearest codebook entry by cosine similarity when
`vq.l2_normalize` (ViT-VQGAN's recipe: both sides L2-normalised, which keeps every code on the
unit sphere, so no code drifts away from the data and usage stays high) and passes gradients
straight through. Codes whose running usage falls below `vq.dead_code_threshold` times the
uniform share 1/K are restarted on random encoder outputs (`restart_dead_codes`).

Colour-factorised codes (`vq.colour_codes` > 0): see `colour_codes.py`.
"""

from __future__ import annotations

import json
import math
import os
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec as P

from cm3leon_jax.errors import InputError
from cm3leon_jax.paths import artifacts
from cm3leon_jax.tokenizers.colour_codes import (ColourEncoder, colour_codes, colour_scrambled,
                                                 num_tokens)
from cm3leon_jax.train import mesh as mesh_lib

USAGE_DECAY = 0.95  # EMA decay of per-code usage shares (about 20 steps of memory)


def _norm(channels: int, rngs: nnx.Rngs) -> nnx.LayerNorm:
  """Per-pixel LayerNorm over channels. Not VQGAN's GroupNorm: that normalises each image over
  space, which erases a flat image's absolute colour (on Shapes every background came out the
  same grey); a per-pixel norm keeps it."""
  return nnx.LayerNorm(channels, rngs=rngs)


def num_levels(vq_config) -> int:
  """Resolution levels of the encoder; checks that channel_mult matches downsample."""
  f = int(vq_config.downsample)
  n_down = int(round(math.log2(f))) if f > 0 else -1
  if f < 1 or 2 ** n_down != f:
    raise InputError(f"--config.vq.downsample={f}: must be a power of two (4, 8 or 16)")
  mult = tuple(vq_config.channel_mult)
  if len(mult) != n_down + 1:
    raise InputError(f"--config.vq.channel_mult={mult}: needs log2(vq.downsample)+1 = {n_down + 1} "
                     f"entries for vq.downsample={f} (one per resolution level)")
  if int(vq_config.image_size) % f:
    raise InputError(f"--config.vq.image_size={vq_config.image_size} is not divisible by "
                     f"vq.downsample={f}")
  return n_down + 1


def grid_size(vq_config) -> int:
  """Side of the code grid: image_size / downsample."""
  return int(vq_config.image_size) // int(vq_config.downsample)


class ResBlock(nnx.Module):
  """Norm-swish-conv twice, with a 1x1 skip when the width changes."""

  def __init__(self, cin: int, cout: int, *, rngs: nnx.Rngs):
    self.norm1 = _norm(cin, rngs)
    self.conv1 = nnx.Conv(cin, cout, (3, 3), rngs=rngs)
    self.norm2 = _norm(cout, rngs)
    self.conv2 = nnx.Conv(cout, cout, (3, 3), rngs=rngs)
    self.skip = nnx.Conv(cin, cout, (1, 1), rngs=rngs) if cin != cout else None

  def __call__(self, x_BHWC):
    h = self.conv1(nnx.swish(self.norm1(x_BHWC)))
    h = self.conv2(nnx.swish(self.norm2(h)))
    return h + (self.skip(x_BHWC) if self.skip is not None else x_BHWC)


def _resampled(h, num_res_blocks: int):
  """Output of a resampling conv. Without res blocks a swish follows it: otherwise the levels are
  a chain of linear convs, one affine map (with it the 32 px quickstart VQ at lr 6e-3 went from
  88% to 95% analyzer all-correct, issue 4). With res blocks the next block's norm-swish does it
  (VQGAN's layout)."""
  return nnx.swish(h) if num_res_blocks == 0 else h


class Encoder(nnx.Module):
  """(B, H, W, 3) in [-1, 1] -> (B, H/f, W/f, code_dim)."""

  def __init__(self, c, *, rngs: nnx.Rngs):
    levels = num_levels(c)
    widths = [int(c.base_channels) * int(m) for m in c.channel_mult]
    self.conv_in = nnx.Conv(3, widths[0], (3, 3), rngs=rngs)
    blocks, downs, cin = [], [], widths[0]
    for i, w in enumerate(widths):
      for _ in range(int(c.num_res_blocks)):
        blocks.append(ResBlock(cin, w, rngs=rngs))
        cin = w
      if i < levels - 1:
        downs.append(nnx.Conv(cin, cin, (3, 3), strides=2, rngs=rngs))
    self.blocks = nnx.List(blocks)
    self.downs = nnx.List(downs)
    self.num_res_blocks = int(c.num_res_blocks)
    self.norm_out = _norm(cin, rngs)
    self.conv_out = nnx.Conv(cin, int(c.code_dim), (1, 1), rngs=rngs)

  def features(self, x_BHWC):
    """The last level's activations, before the output norm and projection."""
    h = self.conv_in(x_BHWC)
    for i in range(len(self.downs) + 1):
      for j in range(self.num_res_blocks):
        h = self.blocks[i * self.num_res_blocks + j](h)
      if i < len(self.downs):
        h = _resampled(self.downs[i](h), self.num_res_blocks)
    return h

  def __call__(self, x_BHWC):
    return self.conv_out(nnx.swish(self.norm_out(self.features(x_BHWC))))


class Decoder(nnx.Module):
  """(B, h, w, code_dim [+ colour_dim]) -> (B, h*f, w*f, 3), roughly in [-1, 1] (clipped by
  `decode`)."""

  def __init__(self, c, *, rngs: nnx.Rngs):
    levels = num_levels(c)
    widths = [int(c.base_channels) * int(m) for m in reversed(tuple(c.channel_mult))]
    in_dim = int(c.code_dim) + (int(c.colour_dim) if colour_codes(c) else 0)
    self.conv_in = nnx.Conv(in_dim, widths[0], (3, 3), rngs=rngs)
    blocks, ups, cin = [], [], widths[0]
    for i, w in enumerate(widths):
      for _ in range(int(c.num_res_blocks)):
        blocks.append(ResBlock(cin, w, rngs=rngs))
        cin = w
      if i < levels - 1:
        ups.append(nnx.Conv(cin, cin, (3, 3), rngs=rngs))
    self.blocks = nnx.List(blocks)
    self.ups = nnx.List(ups)
    self.num_res_blocks = int(c.num_res_blocks)
    self.norm_out = _norm(cin, rngs)
    self.conv_out = nnx.Conv(cin, 3, (3, 3), rngs=rngs)

  def features(self, z_BhwD):
    """The full-resolution activations, before the output norm and projection."""
    h = self.conv_in(z_BhwD)
    for i in range(len(self.ups) + 1):
      for j in range(self.num_res_blocks):
        h = self.blocks[i * self.num_res_blocks + j](h)
      if i < len(self.ups):
        # Nearest-neighbour 2x upsampling then a conv: no checkerboard artefacts.
        h = _resampled(self.ups[i](jnp.repeat(jnp.repeat(h, 2, axis=1), 2, axis=2)),
                       self.num_res_blocks)
    return h

  def __call__(self, z_BhwD):
    return self.conv_out(nnx.swish(self.norm_out(self.features(z_BhwD))))


class CodeUsage(nnx.Variable):
  """Running (EMA) share of assignments per code: state for dead-code restarts, not trained."""


class Quantized(NamedTuple):
  zq_BhwD: jax.Array       # straight-through quantised latents (forward: codes; backward: z)
  codes_BN: jax.Array      # int32 code indices, row-major over the grid
  commit_loss: jax.Array   # ||z - sg(e)||^2: pulls the encoder to its codes
  codebook_loss: jax.Array  # ||sg(z) - e||^2: pulls the codes to the encoder outputs
  z_ND: jax.Array          # (normalised) encoder outputs, flattened, for restarts
  err_N: jax.Array         # squared distance of each z to its code (no gradient)
  # Factorised codes: the colour quantiser's own result (its codes, z and errors for restarts;
  # the fields above then hold the geometry's, with both losses summed and codes = g * C + c).
  colour: "Quantized | None" = None


def _normalize(x, l2: bool):
  return x * jax.lax.rsqrt(jnp.sum(x * x, axis=-1, keepdims=True) + 1e-12) if l2 else x


def nearest_codes(z_ND, codebook_KD, l2_normalize: bool):
  """Index of the nearest code per row: max cosine if l2_normalize, else min Euclidean."""
  z, e = _normalize(z_ND, l2_normalize), _normalize(codebook_KD, l2_normalize)
  # ||z - e||^2 = ||z||^2 - 2 z.e + ||e||^2; the ||z||^2 term does not change the argmin.
  dist_NK = -2.0 * z @ e.T + jnp.sum(e * e, axis=-1)[None, :]
  return jnp.argmin(dist_NK, axis=-1).astype(jnp.int32)


def quantize(z_BhwD, codebook_KD, l2_normalize: bool) -> Quantized:
  """Nearest-code quantisation with straight-through gradients and the two VQ-VAE losses."""
  B, h, w, D = z_BhwD.shape
  z_ND = _normalize(z_BhwD.reshape(B * h * w, D), l2_normalize)
  e_KD = _normalize(codebook_KD, l2_normalize)
  codes_N = nearest_codes(z_ND, e_KD, False)
  q_ND = jnp.take(e_KD, codes_N, axis=0)
  commit = jnp.mean(jnp.sum((z_ND - jax.lax.stop_gradient(q_ND)) ** 2, axis=-1))
  codebook = jnp.mean(jnp.sum((jax.lax.stop_gradient(z_ND) - q_ND) ** 2, axis=-1))
  st_ND = z_ND + jax.lax.stop_gradient(q_ND - z_ND)
  err_N = jax.lax.stop_gradient(jnp.sum((z_ND - q_ND) ** 2, axis=-1))
  return Quantized(st_ND.reshape(B, h, w, D), codes_N.reshape(B, h * w), commit, codebook,
                   z_ND, err_N)


def code_histogram(codes, codebook_size: int):
  """Share of each code among `codes` (any shape): (K,) float32 summing to 1."""
  counts = jnp.zeros((codebook_size,), jnp.float32).at[codes.reshape(-1)].add(1.0)
  return counts / jnp.maximum(codes.size, 1)


def perplexity(share_K):
  """exp(entropy) of a code distribution: K when uniform, 1 when one code takes everything."""
  return jnp.exp(-jnp.sum(jnp.where(share_K > 0, share_K * jnp.log(share_K), 0.0)))


def restart_dead_codes(codebook_KD, usage_K, z_ND, err_N, codes_N, key, threshold: float):
  """Update usage EMAs with this batch's codes; move dead codes onto badly fit encoder outputs.

  A code is dead when its EMA share of assignments < threshold / K. Its new value is an encoder
  output drawn with probability proportional to its squared quantisation error (k-means++
  style): on images with a dominant background (Shapes), uniform draws would mostly land on
  background vectors the codebook already fits, error-weighted draws land on object edges.
  Restarted codes get the uniform share back, so they have ~20 steps to win assignments before
  they can die again. Returns (codebook_KD, usage_K, num_restarted).
  """
  K = codebook_KD.shape[0]
  usage_K = USAGE_DECAY * usage_K + (1.0 - USAGE_DECAY) * code_histogram(codes_N, K)
  dead_K = usage_K < threshold / K
  # K draws by inverting the cumulative error (K uniforms and a binary search), not
  # `jax.random.categorical`'s K x N Gumbel draws and argmax: those cost ~15% of the quickstart
  # VQ's whole step on a 2-core CPU, every step, and K x N grows to 8192 x 65k at paper scale.
  # Same distribution: weight err + 1e-12 (uniform when every error is zero).
  cum_N = jnp.cumsum(err_N.astype(jnp.float32) + 1e-12)
  u_K = jax.random.uniform(key, (K,), jnp.float32) * cum_N[-1]
  picks_K = jnp.minimum(jnp.searchsorted(cum_N, u_K, side="right"), cum_N.shape[0] - 1)
  fresh_KD = jnp.take(z_ND, picks_K, axis=0).astype(codebook_KD.dtype)
  codebook_KD = jnp.where(dead_K[:, None], fresh_KD, codebook_KD)
  usage_K = jnp.where(dead_K, 1.0 / K, usage_K)
  return codebook_KD, usage_K, jnp.sum(dead_K)


class VQModel(nnx.Module):
  """Encoder + codebook + decoder for one `config.vq` section."""

  def __init__(self, vq_config, *, rngs: nnx.Rngs):
    c = vq_config
    if int(c.codebook_size) < 1 or int(c.code_dim) < 1:
      raise InputError("--config.vq.codebook_size and vq.code_dim must be >= 1")
    self.image_size = int(c.image_size)
    self.grid = grid_size(c)
    self.codebook_size = int(c.codebook_size)
    self.l2_normalize = bool(c.l2_normalize)
    self.encoder = Encoder(c, rngs=rngs)
    self.decoder = Decoder(c, rngs=rngs)
    K, D = self.codebook_size, int(c.code_dim)
    self.codebook = nnx.Param(jax.random.normal(rngs.params(), (K, D)) / math.sqrt(D))
    self.usage = CodeUsage(jnp.full((K,), 1.0 / K))
    self.colour_codes = colour_codes(c)
    if self.colour_codes:
      if int(c.colour_dim) < 1:
        raise InputError(f"--config.vq.colour_dim={c.colour_dim}: must be >= 1 with "
                         f"vq.colour_codes={self.colour_codes}")
      self.codebook_size = K * self.colour_codes  # token ids: g * C + c
      self.colour_encoder = ColourEncoder(c, rngs=rngs)
      C, Dc = self.colour_codes, int(c.colour_dim)
      self.colour_codebook = nnx.Param(jax.random.normal(rngs.params(), (C, Dc)) / math.sqrt(Dc))
      self.colour_usage = CodeUsage(jnp.full((C,), 1.0 / C))

  def quantize(self, x_BHWC, key=None) -> Quantized:
    """Float images in [-1, 1] -> quantised latents and codes. `key` (training only) draws the
    geometry encoder's colour scramble when codes are factorised."""
    if not self.colour_codes:
      return quantize(self.encoder(x_BHWC), self.codebook[...], self.l2_normalize)
    geo = quantize(self.encoder(colour_scrambled(x_BHWC, key)), self.codebook[...],
                   self.l2_normalize)
    col = quantize(self.colour_encoder(x_BHWC), self.colour_codebook[...], False)
    return Quantized(jnp.concatenate([geo.zq_BhwD, col.zq_BhwD], axis=-1),
                     geo.codes_BN * self.colour_codes + col.codes_BN,
                     geo.commit_loss + col.commit_loss, geo.codebook_loss + col.codebook_loss,
                     geo.z_ND, geo.err_N, col)

  def codes_to_latents(self, codes_BN):
    B = codes_BN.shape[0]
    e_KD = _normalize(self.codebook[...], self.l2_normalize)
    if not self.colour_codes:
      return jnp.take(e_KD, codes_BN, axis=0).reshape(B, self.grid, self.grid, -1)
    e_CD = self.colour_codebook[...]
    z_BND = jnp.concatenate([jnp.take(e_KD, codes_BN // self.colour_codes, axis=0),
                             jnp.take(e_CD, codes_BN % self.colour_codes, axis=0)], axis=-1)
    return z_BND.reshape(B, self.grid, self.grid, -1)

  def __call__(self, x_BHWC, key=None):
    """Reconstruct: returns (reconstruction in ~[-1, 1], Quantized)."""
    q = self.quantize(x_BHWC, key)
    return self.decoder(q.zq_BhwD), q


def to_float(images_BHWC):
  """uint8 [0, 255] -> float32 [-1, 1]."""
  return images_BHWC.astype(jnp.float32) / 127.5 - 1.0


def to_uint8(x_BHWC):
  """float [-1, 1] -> uint8 [0, 255] (clipped, rounded)."""
  return jnp.round(jnp.clip((x_BHWC + 1.0) * 127.5, 0.0, 255.0)).astype(jnp.uint8)


def check_images(images_BHWC, image_size: int) -> np.ndarray:
  """Validate a batch for `encode`: uint8, (B, image_size, image_size, 3), B >= 1."""
  arr = np.asarray(images_BHWC) if not isinstance(images_BHWC, jax.Array) else images_BHWC
  if arr.dtype != np.uint8:
    raise InputError(f"images: dtype {arr.dtype}, expected uint8 pixels in [0, 255]")
  want = (image_size, image_size, 3)
  if arr.ndim != 4 or tuple(arr.shape[1:]) != want or arr.shape[0] < 1:
    raise InputError(f"images: shape {tuple(arr.shape)}, expected (batch, {image_size}, "
                     f"{image_size}, 3) for vq.image_size={image_size}")
  return arr


def check_codes(codes_BN, num_codes: int, codebook_size: int) -> np.ndarray:
  """Validate a batch for `decode`: integer (B, num_codes) with values in [0, codebook_size)."""
  arr = np.asarray(codes_BN)
  if not np.issubdtype(arr.dtype, np.integer):
    raise InputError(f"codes: dtype {arr.dtype}, expected integers")
  if arr.ndim != 2 or arr.shape[1] != num_codes or arr.shape[0] < 1:
    raise InputError(f"codes: shape {tuple(arr.shape)}, expected (batch, {num_codes})")
  if arr.size and (arr.min() < 0 or arr.max() >= codebook_size):
    bad = arr[(arr < 0) | (arr >= codebook_size)]
    raise InputError(f"codes: value {int(bad[0])} outside the codebook [0, {codebook_size})")
  return arr.astype(np.int32)


# --- checkpoints -------------------------------------------------------------------------------
# `cm3leon train-vq` writes an Orbax CheckpointManager directory whose items are 'model' (the
# VQModel's state as a pure dict), 'opt' (optimiser and discriminator state) and 'data' (the
# Grain iterator), plus `vq_config.json`, so the tokenizer restores only what it needs.
ARCH_FIELDS = ("image_size", "downsample", "codebook_size", "code_dim", "base_channels",
               "channel_mult", "num_res_blocks", "l2_normalize", "colour_codes", "colour_dim")
CONFIG_FILE = "vq_config.json"


def arch_dict(vq_config) -> dict:
  # Fields a config predating them lacks read as their defaults (0: joint codes); colour_dim
  # means nothing without colour codes, so a joint-code checkpoint written before these fields
  # existed still matches a joint-code config.
  out = {k: (list(vq_config[k]) if k == "channel_mult" else vq_config.get(k, 0))
         for k in ARCH_FIELDS}
  if not out["colour_codes"]:
    out["colour_dim"] = 0
  return out


def check_checkpoint_config(directory: str, vq_config) -> None:
  """Raise InputError when the checkpoint was trained with a different architecture."""
  path = os.path.join(directory, CONFIG_FILE)
  if not os.path.isfile(path):
    raise InputError(f"{directory}: no VQ checkpoint ({CONFIG_FILE} missing); run "
                     f"`cm3leon train-vq` first")
  with open(path) as f:
    saved = json.load(f)
  want = arch_dict(vq_config)
  diff = [f"vq.{k}: checkpoint {saved.get(k, 0)!r}, config {want[k]!r}"
          for k in ARCH_FIELDS if saved.get(k, 0) != want[k]]
  if diff:
    raise InputError(f"{directory}: checkpoint does not match the config ({'; '.join(diff)})")


def restore_model(directory: str, vq_config, step: int | None = None) -> tuple[VQModel, int]:
  """(the VQModel saved under `directory`, its step); the latest step unless `step`."""
  directory = os.path.abspath(directory)
  check_checkpoint_config(directory, vq_config)
  abstract = nnx.eval_shape(lambda: VQModel(vq_config, rngs=nnx.Rngs(0)))
  graphdef, abstract_state = nnx.split(abstract)
  with ocp.CheckpointManager(directory) as mngr:
    step = mngr.latest_step() if step is None else step
    if step is None:
      raise InputError(f"{directory}: no checkpoint steps; was `cm3leon train-vq` interrupted "
                       f"before its first save?")
    target = jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype),
                          abstract_state.to_pure_dict())
    restored = mngr.restore(step, args=ocp.args.Composite(
        model=ocp.args.StandardRestore(target)))
  nnx.replace_by_pure_dict(abstract_state, restored["model"])
  return nnx.merge(graphdef, abstract_state), step


# --- the public API --------------------------------------------------------------------------
class ImageTokenizer:
  """Jitted `encode` / `decode` of uint8 images, data-parallel over a mesh's batch axes.

  Batches are padded to a multiple of the batch axes' size (results are cut back), so any
  batch size works; each distinct padded size compiles once.
  """

  def __init__(self, model: VQModel, mesh: jax.sharding.Mesh | None = None):
    if mesh is None:
      mesh = mesh_lib.make_mesh({"data": -1, "fsdp": 1, "tensor": 1})
    self.mesh = mesh
    self.image_size, self.grid = model.image_size, model.grid
    self.codebook_size = model.codebook_size
    self.num_codes = self.grid * self.grid
    self.checkpoint_step = None  # set by `load`
    graphdef, state = nnx.split(model)
    self._state = jax.device_put(state, NamedSharding(mesh, P()))  # replicated params
    self._divisor = mesh_lib.batch_divisor(mesh)
    self._images_sharding = mesh_lib.batch_sharding(mesh, 4)
    self._codes_sharding = mesh_lib.batch_sharding(mesh, 2)

    def encode_fn(state, images_BHWC):
      return nnx.merge(graphdef, state).quantize(to_float(images_BHWC)).codes_BN

    def decode_fn(state, codes_BN):
      m = nnx.merge(graphdef, state)
      return to_uint8(m.decoder(m.codes_to_latents(codes_BN)))

    self._encode = jax.jit(encode_fn, out_shardings=self._codes_sharding)
    self._decode = jax.jit(decode_fn, out_shardings=self._images_sharding)

  @classmethod
  def load(cls, config, directory: str | None = None, step: int | None = None,
           mesh: jax.sharding.Mesh | None = None) -> "ImageTokenizer":
    """From `cm3leon train-vq`'s checkpoints (default: artifacts(config).vq)."""
    model, step = restore_model(directory or artifacts(config).vq, config.vq, step)
    tokenizer = cls(model, mesh if mesh is not None else mesh_lib.make_mesh(config.mesh))
    tokenizer.checkpoint_step = step
    return tokenizer

  def _run(self, fn, batch, sharding):
    n = batch.shape[0]
    pad = -n % self._divisor
    if pad:
      batch = np.concatenate([batch, np.repeat(batch[-1:], pad, axis=0)])
    # make_array_from_callback works single- and multi-process (every process passes the batch).
    x = jax.make_array_from_callback(batch.shape, sharding, lambda idx: batch[idx])
    out = fn(self._state, x)
    if not out.is_fully_addressable:
      from jax.experimental import multihost_utils
      out = multihost_utils.process_allgather(out, tiled=True)
    return np.asarray(out)[:n]

  def encode(self, images_BHWC) -> np.ndarray:
    """uint8 (B, S, S, 3) images, S = vq.image_size -> int32 (B, N) codes, N = (S/f)^2."""
    images = np.asarray(check_images(images_BHWC, self.image_size))
    return self._run(self._encode, images, self._images_sharding)

  def decode(self, codes_BN) -> np.ndarray:
    """int (B, N) codes in [0, codebook_size) -> uint8 (B, S, S, 3) images."""
    codes = check_codes(codes_BN, self.num_codes, self.codebook_size)
    return self._run(self._decode, codes, self._codes_sharding)

"""The CLIP-style dual encoder that CM3Leon's retriever and re-ranker use (REFERENCE.md section 3).

No pretrained CLIP can be downloaded here, so the project trains its own (train_encoder.py):
- text tower: a pre-LN transformer over the text tokenizer's local ids, masked mean pool;
- image tower: a ViT over uint8 pixels (patches of `image_patch` px), masked mean pool;
  optionally a 3x3 conv stem (`image_stem` channels) before the patches;
- each tower ends in a linear map to `embed_dim`, L2-normalised; a learnable temperature
  (stored as log(1/T), CLIP's clamp at 100) scales the InfoNCE logits.
A document embedding is the mean of its normalised text and image embeddings (either alone for
a single-modality document). Masks let query dropout remove text tokens and image patches.

Training feeds the text tower packed rows, several texts per row (text_packing.py,
`embed_packed_text`): the same embeddings as one text per row, with fewer padding slots.

`Embedder` is the host-side wrapper every job uses (tokenise, batch, jit, numpy out);
`Embedder.score(images, texts)` is the re-ranking API.
"""

from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from cm3leon_jax.errors import InputError

MAX_LOGIT_SCALE = math.log(100.0)


@dataclasses.dataclass(frozen=True)
class EncoderConfig:
  text_vocab: int
  text_max_len: int
  text_width: int
  text_layers: int
  text_heads: int
  image_size: int
  image_patch: int
  image_width: int
  image_layers: int
  image_heads: int
  embed_dim: int
  temperature_init: float
  image_stem: int = 0  # channels of a 3x3 conv stem before the patches (0: none, plain ViT)

  @classmethod
  def from_config(cls, config) -> "EncoderConfig":
    r = config.retrieval
    out = cls(config.vocab.text_size, r.text_max_len, r.text_width, r.text_layers, r.text_heads,
              config.vq.image_size, r.image_patch, r.image_width, r.image_layers, r.image_heads,
              r.embed_dim, r.temperature_init, int(r.image_stem))
    if out.image_size % out.image_patch:
      raise InputError(f"--config.retrieval.image_patch={out.image_patch} does not divide the "
                       f"image size {out.image_size} (vq.image_size)")
    for name in ("text", "image"):
      width, heads = getattr(out, f"{name}_width"), getattr(out, f"{name}_heads")
      if width % heads:
        raise InputError(f"--config.retrieval.{name}_width={width} is not divisible by "
                         f"{name}_heads={heads}")
    return out

  @property
  def num_patches(self) -> int:
    return (self.image_size // self.image_patch) ** 2


def _linear(din, dout, axes, rngs, use_bias=True):
  return nnx.Linear(din, dout, use_bias=use_bias, rngs=rngs,
                    kernel_init=nnx.with_partitioning(nnx.initializers.xavier_uniform(), axes),
                    bias_init=nnx.with_partitioning(nnx.initializers.zeros, axes[1:]))


def _layer_norm(width, rngs):
  return nnx.LayerNorm(width, rngs=rngs,
                       scale_init=nnx.with_partitioning(nnx.initializers.ones, ("embed",)),
                       bias_init=nnx.with_partitioning(nnx.initializers.zeros, ("embed",)))


class Block(nnx.Module):
  """Pre-LN transformer block with a key-padding mask."""

  def __init__(self, width: int, heads: int, *, rngs: nnx.Rngs):
    self.heads = heads
    self.ln1 = _layer_norm(width, rngs)
    self.qkv = _linear(width, 3 * width, ("embed", "mlp"), rngs)
    self.out = _linear(width, width, ("mlp", "embed"), rngs)
    self.ln2 = _layer_norm(width, rngs)
    self.fc1 = _linear(width, 4 * width, ("embed", "mlp"), rngs)
    self.fc2 = _linear(4 * width, width, ("mlp", "embed"), rngs)

  def __call__(self, x_BTD, mask_BT=None, mask_B1TT=None):
    """`mask_BT`: the keys each query may see (padding off); or `mask_B1TT`, query by key."""
    B, T, D = x_BTD.shape
    qkv = self.qkv(self.ln1(x_BTD)).reshape(B, T, 3, self.heads, D // self.heads)
    mask = mask_BT[:, None, None, :] if mask_B1TT is None else mask_B1TT
    a_BTNH = jax.nn.dot_product_attention(qkv[:, :, 0], qkv[:, :, 1], qkv[:, :, 2], mask=mask)
    x_BTD = x_BTD + self.out(a_BTNH.reshape(B, T, D))
    return x_BTD + self.fc2(jax.nn.gelu(self.fc1(self.ln2(x_BTD))))


class Tower(nnx.Module):
  """Transformer over [B, T, width] inputs + learned positions -> masked mean -> embed_dim."""

  def __init__(self, length, width, layers, heads, embed_dim, *, rngs: nnx.Rngs):
    init = nnx.with_partitioning(nnx.initializers.normal(0.01), ("length", "embed"))
    self.pos = nnx.Param(init(rngs.params(), (length, width)))
    self.blocks = nnx.List([Block(width, heads, rngs=rngs) for _ in range(layers)])
    self.ln = _layer_norm(width, rngs)
    self.proj = _linear(width, embed_dim, ("embed", "mlp"), rngs, use_bias=False)

  def __call__(self, x_BTD, mask_BT):
    x_BTD = x_BTD + self.pos[:x_BTD.shape[1]]
    for block in self.blocks:
      x_BTD = block(x_BTD, mask_BT)
    w_BT1 = mask_BT[..., None].astype(x_BTD.dtype)
    pooled_BD = (self.ln(x_BTD) * w_BT1).sum(1) / jnp.maximum(w_BT1.sum(1), 1.0)
    return l2_normalize(self.proj(pooled_BD))

  def packed(self, x_RLD, positions_RL, segments_RL, owners_RL, num: int):
    """Several inputs per row (retrieval/text_packing.py) -> unit [num, embed_dim], the same
    embeddings as one input per row: positions restart per input, attention stays inside a
    segment (padding slots, segment 0, see only each other) and the mean pools per owner."""
    x_RLD = x_RLD + self.pos[positions_RL]
    mask_R1LL = (segments_RL[:, None, :, None] == segments_RL[:, None, None, :])
    for block in self.blocks:
      x_RLD = block(x_RLD, mask_B1TT=mask_R1LL)
    owners_T = owners_RL.reshape(-1)  # num = padding: pooled into a dropped extra row
    sums_ND = jax.ops.segment_sum(self.ln(x_RLD).reshape(owners_T.shape[0], -1), owners_T,
                                  num_segments=num + 1)[:num]
    counts_N = jax.ops.segment_sum(jnp.ones_like(owners_T, x_RLD.dtype), owners_T,
                                   num_segments=num + 1)[:num]
    return l2_normalize(self.proj(sums_ND / jnp.maximum(counts_N, 1.0)[:, None]))


class DualEncoder(nnx.Module):
  def __init__(self, cfg: EncoderConfig, *, rngs: nnx.Rngs):
    self.cfg = cfg
    self.token_embed = nnx.Embed(
        cfg.text_vocab, cfg.text_width, rngs=rngs,
        embedding_init=nnx.with_partitioning(nnx.initializers.normal(0.02), ("vocab", "embed")))
    self.text = Tower(cfg.text_max_len, cfg.text_width, cfg.text_layers, cfg.text_heads,
                      cfg.embed_dim, rngs=rngs)
    channels = 3
    if cfg.image_stem > 0:
      # Early convolutions (Xiao et al. 2021): edge detectors at full resolution before the
      # patches, so an object's outline inside a patch survives the linear patch embedding.
      self.stem = nnx.Conv(3, cfg.image_stem, (3, 3), padding="SAME", rngs=rngs,
                           kernel_init=nnx.with_partitioning(nnx.initializers.lecun_normal(),
                                                             (None, None, None, "embed")),
                           bias_init=nnx.with_partitioning(nnx.initializers.zeros, ("embed",)))
      channels = cfg.image_stem
    patch_dim = cfg.image_patch * cfg.image_patch * channels
    self.patch_embed = _linear(patch_dim, cfg.image_width, (None, "embed"), rngs)
    self.image = Tower(cfg.num_patches, cfg.image_width, cfg.image_layers, cfg.image_heads,
                       cfg.embed_dim, rngs=rngs)
    self.log_scale = nnx.Param(jnp.asarray(math.log(1.0 / cfg.temperature_init), jnp.float32))

  def embed_text(self, ids_BL, mask_BL):
    """ids_BL: int32 local text ids; mask_BL: bool. Returns unit [B, embed_dim]."""
    return self.text(self.token_embed(ids_BL), mask_BL)

  def embed_packed_text(self, ids_RL, positions_RL, segments_RL, owners_RL, num: int):
    """Packed texts (retrieval/text_packing.py) -> unit [num, embed_dim], as `embed_text`
    would embed them one per row; what encoder training feeds the text tower."""
    return self.text.packed(self.token_embed(ids_RL), positions_RL, segments_RL, owners_RL, num)

  def embed_image(self, pixels_BHWC, patch_mask_BP=None):
    """pixels: uint8 [B, H, W, 3]; patch_mask_BP: bool per patch (row-major). Unit [B, E]."""
    p = self.cfg.image_patch
    B, H, W, C = pixels_BHWC.shape
    x = pixels_BHWC.astype(jnp.float32) / 127.5 - 1.0
    if self.cfg.image_stem > 0:
      x = jax.nn.gelu(self.stem(x))
      C = x.shape[-1]
    x_BPK = x.reshape(B, H // p, p, W // p, p, C).transpose(0, 1, 3, 2, 4, 5).reshape(
        B, (H // p) * (W // p), p * p * C)
    if patch_mask_BP is None:
      patch_mask_BP = jnp.ones(x_BPK.shape[:2], bool)
    return self.image(self.patch_embed(x_BPK), patch_mask_BP)

  def logit_scale(self):
    return jnp.exp(jnp.minimum(self.log_scale[...], MAX_LOGIT_SCALE))


def l2_normalize(x, eps=1e-6):
  return x * jax.lax.rsqrt(jnp.maximum(jnp.sum(x * x, axis=-1, keepdims=True), eps * eps))


def document_embedding(text_BE=None, image_BE=None, has_text_B=None, has_image_B=None):
  """Mean of the L2-normalised text and image embeddings; either alone for a single-modality
  document (per row, from the has_* flags; a missing array means that modality is absent)."""
  parts = [(e, h) for e, h in ((text_BE, has_text_B), (image_BE, has_image_B)) if e is not None]
  if not parts:
    raise InputError("a document needs text or an image")
  total, count = 0.0, 0.0
  for e, has in parts:
    e = np.asarray(e, np.float32)
    e = e / np.maximum(np.linalg.norm(e, axis=-1, keepdims=True), 1e-12)
    w = np.ones(len(e), np.float32) if has is None else np.asarray(has, np.float32)
    total = total + e * w[:, None]
    count = count + w
  if np.any(np.asarray(count) == 0):
    raise InputError("a document has neither text nor an image")
  return total / np.asarray(count)[:, None]


def info_nce(text_BE, image_BE, logit_scale, neg_text_BE=None, neg_valid_B=None):
  """Symmetric InfoNCE over the (global) batch; pair i is text i with image i.

  neg_text_BE (optional): hard-negative texts (NegCLIP), extra columns of every image's
  image -> text softmax; rows where neg_valid_B is False are left out. Text -> image is
  unchanged (a hard negative has no image of its own).
  """
  logits_BB = logit_scale * image_BE @ text_BE.T
  labels = jnp.arange(logits_BB.shape[0])
  logits_i2t = logits_BB
  if neg_text_BE is not None:
    neg_BB = logit_scale * image_BE @ neg_text_BE.T
    if neg_valid_B is not None:
      neg_BB = jnp.where(neg_valid_B[None, :], neg_BB, -jnp.inf)
    logits_i2t = jnp.concatenate([logits_BB, neg_BB], axis=1)
  lp_i2t = jax.nn.log_softmax(logits_i2t, axis=1)
  lp_t2i = jax.nn.log_softmax(logits_BB, axis=0)
  loss = -0.5 * (lp_i2t[labels, labels].mean() + lp_t2i[labels, labels].mean())
  accuracy = (jnp.argmax(logits_BB, axis=0) == labels).mean()  # text -> image top-1
  return loss, accuracy


class Embedder:
  """Host-side use of a trained DualEncoder: tokenise, batch, run jitted, return numpy.

      emb = Embedder.load(config)                 # latest checkpoint + text tokenizer
      t_BE = emb.embed_texts(["a red circle"]); i_BE = emb.embed_images(pixels_BHWC)
      s_B = emb.score(pixels_BHWC, texts)         # cosine of each (image, text) pair

  Batches are padded to a power of two (at most `batch_size`) so few shapes compile; with a
  mesh, each batch is split over its ('data', 'fsdp') axes.
  """

  def __init__(self, model: DualEncoder, tokenizer, mesh=None, batch_size: int = 256):
    self.cfg = model.cfg
    self.tokenizer = tokenizer
    self.mesh = mesh
    self._divisor = 1 if mesh is None else mesh.shape["data"] * mesh.shape["fsdp"]
    self.batch_size = max(batch_size, self._divisor)
    graphdef, self._state = nnx.split(model)

    @jax.jit
    def text_fn(state, ids_BL, mask_BL):
      return nnx.merge(graphdef, state).embed_text(ids_BL, mask_BL)

    @jax.jit
    def image_fn(state, pixels_BHWC, patch_mask_BP):
      return nnx.merge(graphdef, state).embed_image(pixels_BHWC, patch_mask_BP)

    self._text_fn, self._image_fn = text_fn, image_fn

  @property
  def embed_dim(self) -> int:
    return self.cfg.embed_dim

  @classmethod
  def load(cls, config, directory: str | None = None, step: int | None = None) -> "Embedder":
    from cm3leon_jax.retrieval import train_encoder  # checkpoint layout lives with the trainer
    return train_encoder.load_embedder(config, directory, step)

  # --- inputs ---------------------------------------------------------------------------------
  def tokenize(self, texts) -> tuple[np.ndarray, np.ndarray]:
    """Texts (str or UTF-8 bytes) -> (ids_BL int32, mask_BL bool), cut to text_max_len."""
    return tokenize(self.tokenizer, texts, self.cfg.text_max_len)

  def check_images(self, images) -> np.ndarray:
    x = np.asarray(images)
    s = self.cfg.image_size
    if x.ndim != 4 or x.shape[1:] != (s, s, 3):
      raise InputError(f"images: expected uint8 [batch, {s}, {s}, 3] (vq.image_size), got "
                       f"shape {x.shape}")
    if x.dtype != np.uint8:
      raise InputError(f"images: expected uint8 pixels, got {x.dtype}")
    return x

  # --- embedding -----------------------------------------------------------------------------
  def _run(self, fn, *arrays) -> np.ndarray:
    n = len(arrays[0])
    out = []
    for start in range(0, n, self.batch_size):
      chunk = [a[start:start + self.batch_size] for a in arrays]
      m = len(chunk[0])
      size = min(self.batch_size, max(self._divisor, 1 << (m - 1).bit_length()))
      size = -(-size // self._divisor) * self._divisor
      chunk = [np.concatenate([c, np.repeat(c[-1:], size - m, axis=0)]) for c in chunk]
      if self.mesh is not None:
        from cm3leon_jax.train.mesh import batch_sharding
        chunk = [jax.device_put(c, batch_sharding(self.mesh, c.ndim)) for c in chunk]
      out.append(np.asarray(fn(self._state, *chunk))[:m])
    if not out:
      return np.zeros((0, self.embed_dim), np.float32)
    return np.concatenate(out).astype(np.float32)

  def embed_text_tokens(self, ids_BL, mask_BL) -> np.ndarray:
    return self._run(self._text_fn, np.asarray(ids_BL, np.int32), np.asarray(mask_BL, bool))

  def embed_pixels(self, images_BHWC, patch_mask_BP=None) -> np.ndarray:
    x = self.check_images(images_BHWC)
    if patch_mask_BP is None:
      patch_mask_BP = np.ones((len(x), self.cfg.num_patches), bool)
    return self._run(self._image_fn, x, np.asarray(patch_mask_BP, bool))

  def embed_texts(self, texts) -> np.ndarray:
    return self.embed_text_tokens(*self.tokenize(texts))

  def embed_images(self, images_BHWC) -> np.ndarray:
    return self.embed_pixels(images_BHWC)

  def score(self, images_BHWC, texts) -> np.ndarray:
    """Cosine similarity of each (image_i, text_i) pair, [B] in [-1, 1]: CLIP-score re-ranking."""
    if len(images_BHWC) != len(texts):
      raise InputError(f"score: {len(images_BHWC)} images but {len(texts)} texts")
    return np.sum(self.embed_images(images_BHWC) * self.embed_texts(texts), axis=-1)


def tokenize(tokenizer, texts, max_len: int) -> tuple[np.ndarray, np.ndarray]:
  """Texts (str or bytes) -> (ids_BL int32, mask_BL bool), cut to max_len, padded with 0."""
  texts = [t.decode("utf-8") if isinstance(t, (bytes, np.bytes_)) else str(t) for t in texts]
  encoded = tokenizer.encode_batch(texts) if texts else []
  ids = np.zeros((len(texts), max_len), np.int32)
  mask = np.zeros((len(texts), max_len), bool)
  for row, e in enumerate(encoded):
    e = e[:max_len]
    ids[row, :len(e)] = e
    mask[row, :len(e)] = True
  return ids, mask

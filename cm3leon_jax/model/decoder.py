"""The CM3Leon decoder (REFERENCE.md section 4) as a Flax NNX module.

    model = Decoder(DecoderConfig.from_config(config), rngs=nnx.Rngs(0))
    logits_BLV = model(inputs_BL, positions_BL, segment_ids_BL)      # float32

OPT-like: token embedding + learned absolute positions (init std 0.0002), `num_layers`
pre-LN layers (`layers.layer`), a parameter-free final LayerNorm, and a tied (or untied,
zero-initialised) LM head. Every other weight is truncated normal (std 0.006, cut at 3 std);
the residual-branch output projections start at zero. No biases, no dropout, no learnable
LayerNorm parameters.

Layer parameters are stacked on a leading 'layers' axis and run with `jax.lax.scan`
(`scan_layers`, one compiled layer) or unrolled; `remat_policy` wraps the layer in
`jax.checkpoint`. Parameters are in `param_dtype` (float32), matmuls in `dtype` (bf16 on
accelerators); logits come out in float32. Each parameter carries logical axis names
(`out_sharding` metadata), resolved through `config.mesh.axis_rules`.
"""

from __future__ import annotations

import dataclasses
import functools
import math

import jax
import jax.numpy as jnp
from flax import nnx

from cm3leon_jax.errors import InputError
from cm3leon_jax.model import layers as L
from cm3leon_jax.model.attention import BACKENDS
from cm3leon_jax.tokenizers.vocab import Vocab

DECODE_MATVEC = ("auto", "xla", "pallas")
DECODE_ATTENTION = ("xla", "pallas")
REMAT_POLICIES = {
    "none": None,
    "dots_saveable": jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
    "nothing_saveable": jax.checkpoint_policies.nothing_saveable,
}


@dataclasses.dataclass(frozen=True)
class DecoderConfig:
  """Static description of a decoder (hashable: it is part of the NNX graph definition)."""
  vocab_size: int
  num_layers: int
  d_model: int
  num_heads: int
  head_dim: int
  d_ff: int
  seq_len: int
  activation: str = "relu"
  tie_embeddings: bool = True
  qk_norm: bool = False
  init_std: float = 0.006
  pos_init_std: float = 0.0002
  dtype: str = "float32"
  param_dtype: str = "float32"
  scan_layers: bool = True
  remat_policy: str = "none"
  attention: str = "xla"
  decode_matvec: str = "xla"  # auto | xla | pallas (decode/cache.py `uses_matvec`)
  decode_attention: str = "xla"  # xla | pallas (decode/cache.py `uses_attention_kernel`)
  axis_rules: tuple = ()
  # Image-position embeddings (`model.image_positions`): tokens_per_image > 0 adds a learned
  # embedding of each image token's raster index to it; image ids are [image_start, image_end).
  tokens_per_image: int = 0
  image_start: int = 0
  image_end: int = 0
  # Colour-factorised image codes (`vq.colour_codes` = C > 0, tokenizers/vq.py): image id
  # image_start + g * C + c is embedded (and, tied, scored) as geo[g] + colour[c].
  image_colour_codes: int = 0

  @classmethod
  def from_config(cls, config) -> "DecoderConfig":
    """From a full project config; raises InputError naming the inconsistent field."""
    m = config.model
    if m.d_model % m.num_heads:
      raise InputError(f"--config.model.num_heads={m.num_heads} does not divide "
                       f"model.d_model={m.d_model}")
    if m.num_heads * m.head_dim != m.d_model:
      raise InputError(f"--config.model.head_dim={m.head_dim}: num_heads x head_dim = "
                       f"{m.num_heads * m.head_dim} must equal model.d_model={m.d_model}")
    if m.remat_policy not in REMAT_POLICIES:
      raise InputError(f"--config.model.remat_policy={m.remat_policy!r}: expected one of "
                       f"{tuple(REMAT_POLICIES)}")
    if m.attention not in BACKENDS:
      raise InputError(f"--config.model.attention={m.attention!r}: expected one of {BACKENDS}")
    decode_matvec = m.get("decode_matvec", "auto")  # bundles exported before the field
    if decode_matvec not in DECODE_MATVEC:
      raise InputError(f"--config.model.decode_matvec={decode_matvec!r}: expected one of "
                       f"{DECODE_MATVEC}")
    decode_attention = m.get("decode_attention", "xla")
    if decode_attention not in DECODE_ATTENTION:
      raise InputError(f"--config.model.decode_attention={decode_attention!r}: expected one of "
                       f"{DECODE_ATTENTION}")
    from cm3leon_jax.train.mesh import axis_rules  # the one place rules are normalised
    from cm3leon_jax.configs.base import tokens_per_image
    from cm3leon_jax.tokenizers.colour_codes import colour_codes
    vocab = Vocab.from_config(config)
    image = dict(image_start=vocab.image_start, image_end=vocab.image_end,
                 tokens_per_image=tokens_per_image(config) if m.image_positions else 0,
                 image_colour_codes=colour_codes(config.vq))
    if image["image_colour_codes"] and not m.tie_embeddings:
      raise InputError(f"--config.model.tie_embeddings=False: colour-factorised image codes "
                       f"(vq.colour_codes={image['image_colour_codes']}) need the tied head")
    return cls(vocab_size=vocab.size, num_layers=m.num_layers,
               d_model=m.d_model, num_heads=m.num_heads, head_dim=m.head_dim, d_ff=m.d_ff,
               seq_len=m.seq_len, activation=m.activation, tie_embeddings=m.tie_embeddings,
               qk_norm=m.qk_norm, init_std=m.init_std, pos_init_std=m.pos_init_std,
               dtype=m.dtype, param_dtype=m.param_dtype, scan_layers=m.scan_layers,
               remat_policy=m.remat_policy, attention=m.attention,
               decode_matvec=decode_matvec, decode_attention=decode_attention,
               axis_rules=axis_rules(config), **image)

  def layer_shapes(self) -> dict[str, tuple[tuple[int, ...], tuple[str, ...]]]:
    """Stacked parameter name -> (shape, logical axes), 'layers' first."""
    out = {}
    for name, (dims, axes) in L.LAYER_PARAMS.items():
      if name == "w_gate" and self.activation != "swiglu":
        continue
      out[name] = ((self.num_layers, *(getattr(self, d) for d in dims)), ("layers", *axes))
    return out


def _param(rngs: nnx.Rngs, shape, axes, std: float, dtype) -> nnx.Param:
  if std == 0.0:
    value = jnp.zeros(shape, dtype)
  else:  # truncated at 3 std, as the paper's init
    init = jax.nn.initializers.truncated_normal(stddev=std, lower=-3.0, upper=3.0)
    value = init(rngs.params(), shape, dtype)
  # Sharding is applied by the caller (a jit with out_shardings, see `init_sharded`), so
  # the module can also be built eagerly on one device.
  return nnx.Param(value, out_sharding=tuple(axes), eager_sharding=False)


class StackedLayers(nnx.Module):
  """All layers' weights, each stacked on a leading 'layers' axis."""

  def __init__(self, cfg: DecoderConfig, rngs: nnx.Rngs):
    dtype = jnp.dtype(cfg.param_dtype)
    for name, (shape, axes) in cfg.layer_shapes().items():
      std = 0.0 if name in L.ZERO_INIT else cfg.init_std
      setattr(self, name, _param(rngs, shape, axes, std, dtype))

  def arrays(self) -> dict:
    return {name: getattr(self, name)[...] for name in L.LAYER_PARAMS if hasattr(self, name)}


class Decoder(nnx.Module):

  def __init__(self, cfg: DecoderConfig, *, rngs: nnx.Rngs):
    self.cfg = cfg
    dtype = jnp.dtype(cfg.param_dtype)
    self.embed = _param(rngs, (cfg.vocab_size, cfg.d_model), ("vocab", "embed"), cfg.init_std,
                        dtype)
    self.pos_embed = _param(rngs, (cfg.seq_len, cfg.d_model), ("length", "embed"),
                            cfg.pos_init_std, dtype)
    if cfg.tokens_per_image:
      self.image_pos_embed = _param(rngs, (cfg.tokens_per_image, cfg.d_model), (None, "embed"),
                                    cfg.pos_init_std, dtype)
    if cfg.image_colour_codes:
      # The embedding's own image rows go unused (they stay in the table so ids keep their rows).
      geo, colour = self.image_factors()
      self.image_geo_embed = _param(rngs, (geo, cfg.d_model), (None, "embed"), cfg.init_std,
                                    dtype)
      self.image_colour_embed = _param(rngs, (colour, cfg.d_model), (None, "embed"),
                                       cfg.init_std, dtype)
    self.layers = StackedLayers(cfg, rngs)
    if not cfg.tie_embeddings:
      self.head = _param(rngs, (cfg.d_model, cfg.vocab_size), ("embed", "vocab"), 0.0, dtype)

  def image_factors(self) -> tuple[int, int]:
    """(G, C): geometry and colour codes of colour-factorised image ids."""
    cfg = self.cfg
    return (cfg.image_end - cfg.image_start) // cfg.image_colour_codes, cfg.image_colour_codes

  def token_table(self):
    """The [V, D] token embedding (param dtype), the tied head's rows. Colour-factorised: image
    rows are geo[g] + colour[c], so a never-seen (g, c) pair is embedded from seen parts
    (`embed_tokens` gathers the same sums without building the table)."""
    table_VD = self.embed[...]
    if not self.cfg.image_colour_codes:
      return table_VD
    geo, colour = self.image_factors()
    image_GCD = self.image_geo_embed[...][:, None, :] + self.image_colour_embed[...][None, :, :]
    return jnp.concatenate([table_VD[:self.cfg.image_start],
                            image_GCD.reshape(geo * colour, -1),
                            table_VD[self.cfg.image_end:]], axis=0)

  @property
  def shard(self) -> L.Sharder:
    return L.Sharder(self.cfg.axis_rules)

  def image_index(self, inputs_BL):
    """[B, L] int32: each image token's index inside its run of image tokens, -1 elsewhere.

    A run starts after any non-image token (`<break>` opening an image, or the `<mask:k>` of a
    CM3 span), so whole images count 0..N-1 in raster order. Codes that CM3 moved (after a
    body sentinel, or in the tail) are not at their raster places: for masked sequences the
    pipeline gives the exact index (batch `image_index`, data/cm3.py)."""
    cfg = self.cfg
    is_image = (inputs_BL >= cfg.image_start) & (inputs_BL < cfg.image_end)
    count_BL = jnp.cumsum(is_image, axis=1, dtype=jnp.int32)
    last_other_BL = jax.lax.cummax(jnp.where(is_image, 0, count_BL), axis=1)
    return jnp.where(is_image, count_BL - last_other_BL - 1, -1)

  def embed_tokens(self, inputs_BL, positions_BL, image_index_BL=None):
    """Token + position (+ image-position) embeddings -> x_BLD in the compute dtype.

    image_index_BL: the tokens' image raster indices; computed here from the ids when None
    (a full sequence of whole images), given by the pipeline (CM3 moves codes away from their
    place) and by the sampler (one token at a time). Only image tokens use it."""
    # Gather the embedding dimension first (as FSDP does for every weight) but keep the vocab
    # split: without this, GSPMD replicates the whole lookup ("involuntary full remat").
    table = self.shard(self.embed[...], ("vocab", None))
    pos = self.shard(self.pos_embed[...], (None, None))
    x_BLD = jnp.take(table, inputs_BL, axis=0)
    if self.cfg.image_colour_codes:  # geo[g] + colour[c], gathered (no [V, D] table per call)
      start, colour = self.cfg.image_start, self.cfg.image_colour_codes
      is_code_BL = (inputs_BL >= start) & (inputs_BL < self.cfg.image_end)
      code_BL = jnp.where(is_code_BL, inputs_BL - start, 0)
      image_BLD = (jnp.take(self.image_geo_embed[...], code_BL // colour, axis=0)
                   + jnp.take(self.image_colour_embed[...], code_BL % colour, axis=0))
      x_BLD = jnp.where(is_code_BL[..., None], image_BLD, x_BLD)
    x_BLD = x_BLD + jnp.take(pos, positions_BL, axis=0)
    if self.cfg.tokens_per_image:
      if image_index_BL is None:
        image_index_BL = self.image_index(inputs_BL)
      table = self.shard(self.image_pos_embed[...], (None, None))
      # A run longer than an image (never in well-formed documents) reuses the last row.
      rows_BLD = jnp.take(table, jnp.clip(image_index_BL, 0, self.cfg.tokens_per_image - 1),
                          axis=0)
      # Image tokens only: an infilling prompt's last sentinel carries the index before its
      # span (decode/prompts.py) so the sampler's count continues from there.
      is_image_BL = (inputs_BL >= self.cfg.image_start) & (inputs_BL < self.cfg.image_end)
      x_BLD = x_BLD + jnp.where((is_image_BL & (image_index_BL >= 0))[..., None], rows_BLD, 0)
    return self.shard(x_BLD.astype(self.cfg.dtype), ("batch", "length", None))

  def head_weight(self):
    """The LM head as [V, D] in the compute dtype (the token embedding when tied)."""
    w_VD = self.token_table() if self.cfg.tie_embeddings else self.head[...].T
    return w_VD.astype(self.cfg.dtype)

  def logits(self, x_BLD, w_VD=None):
    """Final LayerNorm + LM head -> float32 logits [B, L, V].

    `w_VD`: rows of `head_weight()` (e.g. only the image codes, decode/sampler.py) to score
    those tokens alone; logits [B, L, rows]."""
    h_BLD = L.layer_norm(x_BLD)
    if w_VD is None and self.cfg.image_colour_codes:
      return self.shard(self._factorised_logits(h_BLD), ("batch", "length", "vocab"))
    w_VD = self.head_weight() if w_VD is None else w_VD
    return self.shard(lm_head(h_BLD, w_VD), ("batch", "length", "vocab"))

  def image_factor_logits(self, x_BLD):
    """Colour-factorised codes: (geometry logits [B, L, G], colour logits [B, L, C]), float32;
    image id image_start + g * C + c has logit geo[g] + colour[c]."""
    return self._factor_products(L.layer_norm(x_BLD))

  def _factor_products(self, h_BLD):
    """(h . geo [B, L, G], h . colour [B, L, C]) of the final-normed h, float32."""
    dtype = jnp.dtype(self.cfg.dtype)
    return (lm_head(h_BLD, self.image_geo_embed[...].astype(dtype)),
            lm_head(h_BLD, self.image_colour_embed[...].astype(dtype)))

  def _factorised_logits(self, h_BLD):
    """The same logits as the full head, h . (geo[g] + colour[c]) = h . geo[g] + h . colour[c],
    with G + C head rows for the G x C image ids instead of G x C (the head would otherwise
    cost more than the quickstart decoder's layers)."""
    cfg, dtype = self.cfg, jnp.dtype(self.cfg.dtype)
    w_VD = self.embed[...].astype(dtype)
    geo_BLG, colour_BLC = self._factor_products(h_BLD)
    B, L_, _ = h_BLD.shape
    image_BLGC = geo_BLG[..., :, None] + colour_BLC[..., None, :]
    return jnp.concatenate([lm_head(h_BLD, w_VD[:cfg.image_start]),
                            image_BLGC.reshape(B, L_, -1),
                            lm_head(h_BLD, w_VD[cfg.image_end:])], axis=-1)

  def layer_fn(self):
    """The per-layer function `(params_of_one_layer, x_BLD, segment_ids_BL) -> x_BLD`."""
    cfg = self.cfg
    fn = functools.partial(L.layer, dtype=jnp.dtype(cfg.dtype), activation=cfg.activation,
                           qk_norm=cfg.qk_norm, attention_backend=cfg.attention,
                           shard=self.shard)
    policy = REMAT_POLICIES[cfg.remat_policy]
    if cfg.remat_policy != "none":
      fn = jax.checkpoint(fn, policy=policy, prevent_cse=not cfg.scan_layers)
    return fn

  def __call__(self, inputs_BL, positions_BL, segment_ids_BL, image_index_BL=None):
    """Full causal forward over packed rows -> logits_BLV (float32).

    inputs_BL: token ids; positions_BL: position of each token inside its segment (indexes
    the learned position table); segment_ids_BL: 1, 2, ... per packed sequence, 0 = padding;
    image_index_BL: each image code's raster index (the batch contract's `image_index`, exact
    for CM3-masked sequences); None counts it from the ids (`image_index`).
    """
    return self.logits(self.hidden(inputs_BL, positions_BL, segment_ids_BL, image_index_BL))

  def hidden(self, inputs_BL, positions_BL, segment_ids_BL, image_index_BL=None):
    """The last layer's output x_BLD (before the final LayerNorm and the head)."""
    x_BLD = self.embed_tokens(inputs_BL, positions_BL, image_index_BL)
    params = self.layers.arrays()
    fn = self.layer_fn()
    if self.cfg.scan_layers:
      def body(x_BLD, p):
        return fn(p, x_BLD, segment_ids_BL), None
      x_BLD, _ = jax.lax.scan(body, x_BLD, params)
    else:
      for i in range(self.cfg.num_layers):
        x_BLD = fn(jax.tree.map(lambda a: a[i], params), x_BLD, segment_ids_BL)
    return x_BLD

  def log_z_and_target_logit(self, x_BLD, targets_BL):
    """(log partition function, the target's logit), both [B, L] float32, without the
    [B, L, V] logits when image codes are colour-factorised: the G x C image logits
    g_G + c_C have logsumexp lse(g) + lse(c), and a target's is g[t // C] + c[t % C].
    The training loss (train/step.py) is log_z - target_logit."""
    cfg = self.cfg
    if not cfg.image_colour_codes:
      logits_BLV = self.logits(x_BLD)
      return jax.nn.logsumexp(logits_BLV, axis=-1), _target_logit(logits_BLV, targets_BL)
    h_BLD = L.layer_norm(x_BLD)
    dtype = jnp.dtype(cfg.dtype)
    w_VD = self.embed[...].astype(dtype)
    _, colour = self.image_factors()
    # Every non-image row (specials, sentinels, text, padding) in one product.
    other_BLO = lm_head(h_BLD, jnp.concatenate([w_VD[:cfg.image_start], w_VD[cfg.image_end:]]))
    geo_BLG, colour_BLC = self._factor_products(h_BLD)
    image_lse_BL = jax.nn.logsumexp(geo_BLG, -1) + jax.nn.logsumexp(colour_BLC, -1)
    log_z_BL = jnp.logaddexp(jax.nn.logsumexp(other_BLO, -1), image_lse_BL)
    is_image_BL = (targets_BL >= cfg.image_start) & (targets_BL < cfg.image_end)
    code_BL = jnp.where(is_image_BL, targets_BL - cfg.image_start, 0)
    image_BL = (_target_logit(geo_BLG, code_BL // colour)
                + _target_logit(colour_BLC, code_BL % colour))
    other_id_BL = jnp.where(targets_BL >= cfg.image_end,
                            targets_BL - (cfg.image_end - cfg.image_start), targets_BL)
    other_BL = _target_logit(other_BLO, jnp.where(is_image_BL, 0, other_id_BL))
    return log_z_BL, jnp.where(is_image_BL, image_BL, other_BL)


def _target_logit(logits_BLV, targets_BL):
  """logits_BLV[b, l, targets_BL[b, l]]: a one-hot contraction rather than a gather, which stays
  local when the vocab axis is sharded."""
  return jnp.einsum("BLV,BLV->BL", logits_BLV,
                    jax.nn.one_hot(targets_BL, logits_BLV.shape[-1], dtype=logits_BLV.dtype))


@jax.custom_vjp
def lm_head(h_BLD, w_VD):
  """float32 logits of h @ w.T, accumulated in float32, with a backward pass in h's dtype.

  Plain autodiff of a dot with a float32 result hands the transposed dots a float32 cotangent,
  so in bfloat16 training both backward GEMMs of the head (the largest in the model at a 65k
  vocabulary) ran in float32/TF32: 26 ms of a 291 ms 350M step on an H200 (profile in
  experiments/bench/gpu_profile.py). Here the cotangent is cast to the compute dtype first, as
  every other backward GEMM of the model already runs; in float32 nothing changes.
  """
  return jnp.einsum("BLD,VD->BLV", h_BLD, w_VD, preferred_element_type=jnp.float32)


def _lm_head_fwd(h_BLD, w_VD):
  return lm_head(h_BLD, w_VD), (h_BLD, w_VD)


def _lm_head_bwd(res, g_BLV):
  h_BLD, w_VD = res
  g_BLV = g_BLV.astype(h_BLD.dtype)
  dh_BLD = jnp.einsum("BLV,VD->BLD", g_BLV, w_VD, preferred_element_type=jnp.float32)
  dw_VD = jnp.einsum("BLV,BLD->VD", g_BLV, h_BLD, preferred_element_type=jnp.float32)
  return dh_BLD.astype(h_BLD.dtype), dw_VD.astype(w_VD.dtype)


lm_head.defvjp(_lm_head_fwd, _lm_head_bwd)


def param_count(cfg: DecoderConfig, embeddings: bool = True) -> int:
  """Number of parameters; `embeddings=False` leaves out the token and position tables."""
  n = sum(math.prod(shape) for shape, _ in cfg.layer_shapes().values())
  if not cfg.tie_embeddings:
    n += cfg.d_model * cfg.vocab_size
  if embeddings:
    n += (cfg.vocab_size + cfg.seq_len + cfg.tokens_per_image) * cfg.d_model
    if cfg.image_colour_codes:  # the factor tables (the embedding's image rows stay, unused)
      geo = (cfg.image_end - cfg.image_start) // cfg.image_colour_codes
      n += (geo + cfg.image_colour_codes) * cfg.d_model
  return n

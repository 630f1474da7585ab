"""Colour-factorised codes (`vq.colour_codes` = C > 0): each grid cell gets a geometry code g (of
`vq.codebook_size` = G) and a colour code c (of C), one token g * C + c (`num_tokens` = G * C).
The geometry encoder sees the image centred on its mean colour and, in training, rotated by a
random orthogonal colour matrix and scaled, so it cannot rely on hue; the colour encoder is a
per-pixel MLP max-pooled over each cell, a set function that says which colours the cell holds,
not where (its codebook is searched by Euclidean distance: by cosine, 32 colour codes merged
every light background into one). Why: with joint codes a never-seen (colour, shape) pair needs
code arrangements no training image has (experiments/code_novelty.py: 39% of its 2x2 windows);
factorised, its geometry is a seen shape's and its colours a seen colour's. The decoder embeds
and scores such a token as the sum of a geometry and a colour vector (model/decoder.py).

    C = colour_codes(config.vq); tokens = num_tokens(config.vq)     # G x C image token ids
    token = g * C + c;  g, c = token // C, token % C
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

# The counts live with the token-id layout (vocab.py imports no JAX); used from here too.
from cm3leon_jax.tokenizers.vocab import colour_codes, num_tokens  # noqa: F401


class ColourEncoder(nnx.Module):
  """(B, H, W, 3) -> (B, H/f, W/f, colour_dim): which colours each f x f cell holds.

  A per-pixel MLP, then a max over the cell: a set function, blind to where in the cell (and
  how much of it) a colour lies, so the colour code carries no shape."""

  def __init__(self, c, *, rngs: nnx.Rngs):
    width = 2 * int(c.base_channels)
    self.f = int(c.downsample)
    self.fc1 = nnx.Conv(3, width, (1, 1), rngs=rngs)
    self.fc2 = nnx.Conv(width, width, (1, 1), rngs=rngs)
    self.conv_out = nnx.Conv(width, int(c.colour_dim), (1, 1), rngs=rngs)

  def __call__(self, x_BHWC):
    h_BHWC = self.fc2(nnx.swish(self.fc1(x_BHWC)))
    B, H, W, C = h_BHWC.shape
    f = self.f
    h_BhwC = h_BHWC.reshape(B, H // f, f, W // f, f, C).max(axis=(2, 4))
    return self.conv_out(nnx.swish(h_BhwC))


def colour_scrambled(x_BHWC, key=None):
  """The geometry encoder's input: each image centred on its mean colour; with a key (training)
  also rotated by a random orthogonal 3x3 colour matrix and scaled by U(0.6, 1.4) per image.
  Rotation keeps every colour difference's length (edges stay visible) but not its direction
  (the hue), so the geometry codes cannot carry colour; encoding uses no key (the identity, one
  draw of that distribution)."""
  x_BHWC = x_BHWC - jnp.mean(x_BHWC, axis=(1, 2), keepdims=True)
  if key is None:
    return x_BHWC
  k_rot, k_scale = jax.random.split(key)
  B = x_BHWC.shape[0]
  rot_B33 = jax.random.orthogonal(k_rot, 3, shape=(B,), dtype=x_BHWC.dtype)
  scale_B111 = jax.random.uniform(k_scale, (B, 1, 1, 1), x_BHWC.dtype, 0.6, 1.4)
  return scale_B111 * jnp.einsum("bhwc,bdc->bhwd", x_BHWC, rot_B33)

"""Modality constraints as vectorised masks (REFERENCE.md section 5, "Constraints").

A per-row state machine, updated inside the jitted decode loop:

- inside an image (or an image infill span): only image ids, exactly as many as are left, then
  the closing token is forced (`<break>` for an image; `<eos>` or the next `<mask:j>` for a span);
- in text: text ids, `<eos>`, and `<break>` (which opens an image) only when the cache has room
  for the whole image, its closing `<break>` and a final `<eos>`;
- after `<eos>` (or after the image when `stop_after_image`): only `<pad>`.

The state is three `[B]` arrays, so the loop carries it with no Python per token.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from cm3leon_jax.tokenizers.vocab import Vocab

NOT_IN_IMAGE = -1


class ModalityState(NamedTuple):
  image_left_B: jax.Array   # int32: image tokens still to emit; -1 when not inside an image
  close_token_B: jax.Array  # int32: token forced once image_left reaches 0
  done_B: jax.Array         # bool: row finished; only <pad> follows


def initial_state(vocab: Vocab, prompts_BL: np.ndarray, prompt_lens_B: np.ndarray,
                  tokens_per_image: int, span_lens_B: np.ndarray | None = None,
                  span_close: int | None = None) -> ModalityState:
  """State after each prompt: inside an image if the prompt ends in an unclosed one.

  For image infilling (`<infill> <mask:0>` prompts) pass `span_lens_B` (image tokens to
  generate) and `span_close` (the token that ends the span, e.g. `<eos>`).
  """
  batch = len(prompt_lens_B)
  image_left = np.full(batch, NOT_IN_IMAGE, np.int32)
  close = np.full(batch, vocab.break_id, np.int32)
  for b in range(batch):
    prompt = np.asarray(prompts_BL[b, :prompt_lens_B[b]])
    if span_lens_B is not None:
      image_left[b] = span_lens_B[b]
      close[b] = vocab.eos_id if span_close is None else span_close
      continue
    last_eos = np.flatnonzero(prompt == vocab.eos_id)
    tail = prompt[last_eos[-1] + 1:] if last_eos.size else prompt
    breaks = np.flatnonzero(tail == vocab.break_id)
    if len(breaks) % 2:  # an image was opened and not closed
      image_left[b] = tokens_per_image - (len(tail) - breaks[-1] - 1)
  return ModalityState(jnp.asarray(image_left), jnp.asarray(close),
                       jnp.zeros(batch, dtype=bool))


def allowed_mask(state: ModalityState, positions_B: jax.Array, vocab: Vocab,
                 tokens_per_image: int, max_len: int, allow_images: bool = True,
                 allow_text: bool = True) -> jax.Array:
  """[B, V] bool: the ids each row may emit at `positions_B` (the index the new token gets).

  `max_len` (scalar or per-row [B]) is the row's length limit: no token at or past it.
  """
  ids_V = jnp.arange(vocab.size)
  is_image_V = (ids_V >= vocab.image_start) & (ids_V < vocab.image_end)
  is_text_V = (ids_V >= vocab.text_start) & (ids_V < vocab.image_start)
  image_left = state.image_left_B[:, None]
  in_image = image_left > 0
  closing = image_left == 0
  # Room for N image tokens, the closing <break> and an <eos> after the opening <break>.
  max_len_B1 = jnp.broadcast_to(jnp.asarray(max_len), positions_B.shape)[:, None]
  room = (positions_B[:, None] + tokens_per_image + 2) < max_len_B1
  last_slot = positions_B[:, None] >= max_len_B1 - 1
  text_ok = (is_text_V[None] & allow_text & ~last_slot) | (ids_V == vocab.eos_id)[None]
  text_ok = text_ok | ((ids_V == vocab.break_id)[None] & room & allow_images & ~last_slot)
  mask = jnp.where(in_image, is_image_V[None], text_ok)
  mask = jnp.where(closing, ids_V[None] == state.close_token_B[:, None], mask)
  return jnp.where(state.done_B[:, None], (ids_V == vocab.pad_id)[None], mask)


def update(state: ModalityState, tokens_B: jax.Array, vocab: Vocab, tokens_per_image: int,
           stop_after_image: bool = False) -> ModalityState:
  """The state after each row emitted `tokens_B`."""
  in_image = state.image_left_B >= 0
  is_image = (tokens_B >= vocab.image_start) & (tokens_B < vocab.image_end)
  closes = in_image & (tokens_B == state.close_token_B) & (state.image_left_B == 0)
  opens = ~in_image & (tokens_B == vocab.break_id)
  image_left = jnp.where(in_image & is_image, state.image_left_B - 1, state.image_left_B)
  image_left = jnp.where(closes, NOT_IN_IMAGE, image_left)
  image_left = jnp.where(opens, tokens_per_image, image_left)
  close = jnp.where(opens, vocab.break_id, state.close_token_B)
  ended = (~in_image & (tokens_B == vocab.eos_id)) | (closes & (tokens_B == vocab.eos_id))
  if stop_after_image:
    ended = ended | closes
  done = state.done_B | ended
  return ModalityState(image_left.astype(jnp.int32), close.astype(jnp.int32), done)

"""Sequence assembly: retrieved documents + the query document -> one CM3 training example.

    <eos> retrieved_0 <eos> retrieved_1 <eos> query <eos>   -> CM3 mask -> inputs/targets/weights

(REFERENCE.md sections 2-3.) Documents are token ids ending in `<eos>` (`Vocab.document_to_ids`).
- Retrieved documents come first, in the order given, each kept only if it fits whole: a
  retrieved document is never cut (RA-CM3 / CM3Leon drop them instead).
- The query document always comes last. One longer than the window is cut at its last segment
  boundary that fits (never inside an image); a first text segment that alone is too long is
  cut inside the text; a first image that alone is too long cannot be kept (the document is
  skipped). The caller counts both.
- "Image first" rotation (Chameleon-style captioning direction): with probability
  `image_first_rate` every document of the sequence that starts with text and ends with an
  image is rotated to start at its first image: `T1 I1 T2 I2` -> `I1 T2 I2 T1`.
- CM3 masking over the whole sequence (`cm3.py`); with probability `causal_fraction` the
  sequence is left unmasked. The span count n is drawn before assembly and the window keeps
  room for the transform's 2n + 2 extra tokens, so every example fits `seq_len`.

An example of S tokens gives `inputs = seq[:-1]`, `targets = seq[1:]` (so S - 1 <= seq_len).
"""

from __future__ import annotations

import dataclasses

import numpy as np

from cm3leon_jax.data import cm3
from cm3leon_jax.errors import InputError
from cm3leon_jax.tokenizers.vocab import Vocab


def segment_starts(doc_D: np.ndarray, vocab: Vocab) -> np.ndarray:
  """Indices where a segment of the document starts: 0, every image's opening `<break>` and the
  token after every closing `<break>` (sorted, may include len(doc) - 1, the `<eos>`)."""
  breaks = np.flatnonzero(doc_D == vocab.break_id)
  if len(breaks) % 2:
    raise InputError("document has an unclosed image (odd number of <break>)")
  opens, closes = breaks[0::2], breaks[1::2]
  return np.unique(np.concatenate([[0], opens, closes + 1]))


def fit_document(doc_D: np.ndarray, max_len: int, vocab: Vocab) -> tuple[np.ndarray | None, bool]:
  """Cut a document (ending in `<eos>`) to at most `max_len` tokens, `<eos>` included.

  Returns (document or None if nothing can be kept, whether it was cut).
  """
  if len(doc_D) <= max_len:
    return doc_D, False
  room = max_len - 1  # tokens before the closing <eos>
  if room <= 0:
    return None, True
  starts = segment_starts(doc_D, vocab)
  cut = int(starts[np.searchsorted(starts, room, side="right") - 1])
  if cut == 0:
    if doc_D[0] == vocab.break_id:  # an image alone is longer than the window
      return None, True
    cut = room  # the first text segment alone is too long: cut inside the text
  return np.concatenate([doc_D[:cut], [vocab.eos_id]]).astype(np.int32), True


def image_first(doc_D: np.ndarray, vocab: Vocab) -> np.ndarray:
  """Rotate a document that starts with text and ends with an image to start at its first
  image (`T1 I1 T2 I2 <eos>` -> `I1 T2 I2 T1 <eos>`); other documents are returned as they are.

  Only those documents rotate so two text runs never become adjacent (which would merge).
  """
  if len(doc_D) < 3 or doc_D[0] == vocab.break_id or doc_D[-2] != vocab.break_id:
    return doc_D
  first_break = int(np.argmax(doc_D == vocab.break_id))
  return np.concatenate([doc_D[first_break:-1], doc_D[:first_break], doc_D[-1:]])


@dataclasses.dataclass(frozen=True)
class Assembler:
  """Builds one example from a query document and its retrieved documents (picklable)."""
  vocab: Vocab
  seq_len: int
  poisson_rate: float = 1.0
  min_spans: int = 0
  max_spans: int = 15
  causal_fraction: float = 0.0
  image_first_rate: float = 0.0

  @classmethod
  def from_config(cls, config, vocab: Vocab | None = None) -> "Assembler":
    data = config.data
    for field in ("causal_fraction", "image_first_rate"):
      if not 0.0 <= float(data[field]) <= 1.0:
        raise InputError(f"--config.data.{field}={data[field]}: must lie in [0, 1]")
    if float(data.cm3_poisson_rate) < 0:
      raise InputError(f"--config.data.cm3_poisson_rate={data.cm3_poisson_rate}: must be >= 0")
    if int(data.cm3_min_spans) > cm3.max_spans(config):
      raise InputError(f"--config.data.cm3_min_spans={data.cm3_min_spans}: above the span cap "
                       f"{cm3.max_spans(config)} (cm3_max_spans, vocab.num_sentinels)")
    if int(config.model.seq_len) + 1 - cm3.overhead(cm3.max_spans(config)) < 4:
      raise InputError(f"--config.model.seq_len={config.model.seq_len}: too short for "
                       f"{cm3.max_spans(config)} CM3 spans (each adds 2 tokens, plus 2)")
    return cls(vocab=vocab or Vocab.from_config(config), seq_len=int(config.model.seq_len),
               poisson_rate=float(data.cm3_poisson_rate), min_spans=int(data.cm3_min_spans),
               max_spans=cm3.max_spans(config), causal_fraction=float(data.causal_fraction),
               image_first_rate=float(data.image_first_rate))

  @property
  def span_cap(self) -> int:
    return max(0, min(self.max_spans, self.vocab.num_sentinels))

  def budget(self, num_spans: int) -> int:
    """Tokens the unmasked sequence may hold (leading `<eos>` included) so that, once masked
    with `num_spans` spans, it still gives at most `seq_len` inputs."""
    return self.seq_len + 1 - cm3.overhead(num_spans)

  def assemble(self, query_D: np.ndarray, retrieved: list[np.ndarray], budget: int,
               rotate: bool = False) -> tuple[np.ndarray | None, dict[str, int]]:
    """`<eos>` + the retrieved documents that fit + the query, at most `budget` tokens; None
    if the query cannot fit.

    Returns the sequence and counts {"cut": 0|1, "uncuttable": 0|1, "retrieved_dropped": k}.
    """
    counts = {"cut": 0, "uncuttable": 0, "retrieved_dropped": 0}
    query_D, was_cut = fit_document(query_D, budget - 1, self.vocab)
    counts["cut"] = int(was_cut and query_D is not None)
    if query_D is None:
      counts["uncuttable"] = 1
      return None, counts
    room = budget - 1 - len(query_D)
    kept = []
    for doc in retrieved:
      if len(doc) <= room:
        kept.append(doc)
        room -= len(doc)
      else:
        counts["retrieved_dropped"] += 1
    docs = kept + [query_D]
    if rotate:
      docs = [image_first(d, self.vocab) for d in docs]
    return np.concatenate([[self.vocab.eos_id], *docs]).astype(np.int32), counts

  def num_spans(self, rng: np.random.Generator) -> int:
    """The span count of one sequence: 0 with probability `causal_fraction`, else Poisson."""
    if self.causal_fraction > 0 and rng.random() < self.causal_fraction:
      return 0
    return cm3.sample_num_spans(rng, self.poisson_rate, self.min_spans, self.span_cap,
                                self.vocab.num_sentinels)

  def example(self, seq_S: np.ndarray, image_index_S: np.ndarray | None = None
              ) -> dict[str, np.ndarray]:
    """A (masked) sequence -> unpadded `inputs`, `targets` int32, `weights` float32 and the
    inputs' `image_index` int32, [S-1]. image_index_S: the masked sequence's (cm3.py);
    default: counted from the ids (right for an unmasked sequence)."""
    if len(seq_S) - 1 > self.seq_len:
      raise AssertionError(f"assembled {len(seq_S)} tokens for seq_len {self.seq_len}")
    if image_index_S is None:
      image_index_S = cm3.image_index(seq_S, self.vocab)
    targets = seq_S[1:].astype(np.int32)
    return {"inputs": seq_S[:-1].astype(np.int32), "targets": targets,
            "weights": cm3.loss_weights(targets, self.vocab),
            "image_index": np.asarray(image_index_S[:-1], np.int32)}

  def __call__(self, query_D: np.ndarray, retrieved: list[np.ndarray],
               rng: np.random.Generator) -> tuple[dict[str, np.ndarray] | None, dict[str, int]]:
    """Rotate, assemble, mask: one training example (None if the query cannot fit) + counts.

    The span count is drawn first so the window reserves room for exactly its extra tokens.
    """
    rotate = self.image_first_rate > 0 and rng.random() < self.image_first_rate
    n = self.num_spans(rng)
    seq_S, counts = self.assemble(query_D, retrieved, self.budget(n), rotate)
    if seq_S is None:
      return None, counts
    return self.example(*cm3.mask_with_index(seq_S, n, rng, self.vocab)), counts

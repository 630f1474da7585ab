"""The decoding Python API: text-to-image, captioning, infilling, with retrieval and re-ranking.

    gen = Generator.load(config)                       # decoder, tokenizers, retriever
    gen = Generator.from_bundle("outputs/quickstart/export")   # or a `cm3leon export` bundle
    result = gen.text_to_image(["a red circle at the top left"], num_candidates=8)
    result.images_BHWC                                 # the best candidate per prompt
    gen.caption(images_BHWC)                           # -> list of str
    gen.answer(images_BHWC, ["What shape is the object at the top left?"])  # VQA, -> str
    gen.infill_image(images_BHWC, captions, region_mask_N)

Candidate pools (REFERENCE.md section 5): n samples per prompt, drawn with CFG + top-p
("top_p"), CD-K ("cdk"), or half of each ("mixed"), the best picked by the dual encoder's
image-text score.
"""

from __future__ import annotations

import dataclasses
import os
from typing import Sequence

import jax
import numpy as np

from cm3leon_jax.configs.base import tokens_per_image
from cm3leon_jax.data import records
from cm3leon_jax.data.tasks import vqa_text
from cm3leon_jax.decode import constraints as C
from cm3leon_jax.decode import prompts as P
from cm3leon_jax.decode.likelihood import continuation_nll
from cm3leon_jax.decode.sampler import SamplerSpec, generate, make_knobs
from cm3leon_jax.errors import InputError
from cm3leon_jax.tokenizers.vocab import Document, ImageSegment, TextSegment, Vocab

POOLS = ("top_p", "cdk", "mixed")


@dataclasses.dataclass
class TextToImageResult:
  images_BHWC: np.ndarray        # uint8: the best candidate of each prompt
  candidates_BNHWC: np.ndarray   # uint8: every candidate, prompt-major
  scores_BN: np.ndarray | None   # dual-encoder scores of the candidates (None: no re-ranking)
  codes_BNT: np.ndarray          # image codes of every candidate
  retrieved: list                # retrieved document ids per prompt


class MemoryBank:
  """Random access to the training token documents (the retrieval memory bank)."""

  def __init__(self, directory: str, vocab: Vocab):
    import grain
    self.directory = directory
    self.vocab = vocab
    self._source = grain.sources.ArrayRecordDataSource(records.shard_paths(directory))

  def __len__(self):
    return len(self._source)

  def document(self, doc_id: int) -> Document:
    if not 0 <= doc_id < len(self._source):
      raise InputError(f"{self.directory}: document id {doc_id} outside [0, {len(self._source)})")
    _, ids = records.decode_tokens(self._source[int(doc_id)])
    # Stored documents end with <eos>; parse as one serialised sequence.
    docs = self.vocab.ids_to_documents(np.concatenate([[self.vocab.eos_id], ids]))
    return docs[0] if docs else []


def restore_model(config, step: int | None = None, directory: str | None = None):
  """The decoder of a `cm3leon train` checkpoint (default: the latest), on the config's mesh.
  Reads the parameters only, not the optimizer's moments."""
  from flax import nnx

  from cm3leon_jax.paths import artifacts
  from cm3leon_jax.train.checkpoint import Checkpointer, adopt_budget_depth
  from cm3leon_jax.train.mesh import make_mesh
  from cm3leon_jax.train.state import abstract_model
  directory = directory or os.path.join(artifacts(config).decoder, "checkpoints")
  if not os.path.isdir(directory):
    raise InputError(f"{directory}: no decoder checkpoints; run `cm3leon train` first")
  config = adopt_budget_depth(config, directory, step)  # a time budget's shallower decoder
  graphdef, abstract = abstract_model(config, make_mesh(config.mesh))
  checkpointer = Checkpointer(directory, config, async_save=False)
  try:
    params = checkpointer.restore_params(abstract, step=step)
  finally:
    checkpointer.close()
  return nnx.merge(graphdef, params)


class Generator:

  def __init__(self, config, model, text_tokenizer, image_tokenizer, retriever=None,
               memory: MemoryBank | None = None):
    self.config = config
    self.model = model
    self.vocab = Vocab.from_config(config)
    self.text_tokenizer = text_tokenizer
    self.image_tokenizer = image_tokenizer
    self.retriever = retriever
    self.memory = memory
    self.n_image = tokens_per_image(config)

  @classmethod
  def load(cls, config, step: int | None = None, retrieval: bool | None = None,
           decoder_dir: str | None = None) -> "Generator":
    """Everything from `config.workdir`: decoder checkpoint, tokenizers, retriever + bank.
    `decoder_dir`: another run's directory (e.g. `<workdir>/sft`, `cm3leon sft`'s) instead of
    `<workdir>/decoder`."""
    model = restore_model(config, step=step, directory=decoder_dir
                          and os.path.join(decoder_dir, "checkpoints"))
    return cls._with_parts(config, model, retrieval)

  @classmethod
  def from_bundle(cls, bundle: str, overrides=(), retrieval: bool | None = None) -> "Generator":
    """Everything from a `cm3leon export` bundle (export.py), nothing from a workdir.
    `overrides` (`"decoding.cfg_weight=3"`, ...) change decoding or eval fields of its config."""
    from cm3leon_jax import export
    return cls.load_bundle(export.load_config(bundle, overrides), retrieval)

  @classmethod
  def load_bundle(cls, config, retrieval: bool | None = None) -> "Generator":
    """The bundle of `config`, a config from `export.load_config` (its workdir: the bundle)."""
    from cm3leon_jax import export
    return cls._with_parts(config, export.load_model(config), retrieval)

  @classmethod
  def _with_parts(cls, config, model, retrieval: bool | None) -> "Generator":
    from cm3leon_jax.paths import artifacts
    from cm3leon_jax.tokenizers.text import TextTokenizer
    from cm3leon_jax.tokenizers.vq import ImageTokenizer
    paths = artifacts(config)
    retriever = memory = None
    if config.retrieval.enabled if retrieval is None else retrieval:
      from cm3leon_jax.retrieval.strategy import Retriever
      retriever = Retriever.load(config)
      memory = MemoryBank(paths.tokens, Vocab.from_config(config))
    return cls(config, model, TextTokenizer.load(paths.text_tokenizer),
               ImageTokenizer.load(config), retriever, memory)

  # --- retrieval ---------------------------------------------------------------------------
  def retrieve(self, text: str | None, image=None, k: int = 0) -> tuple[list[Document], list[int]]:
    if k <= 0:
      return [], []
    if self.retriever is None or self.memory is None:
      raise InputError("retrieval at inference needs a retriever and a memory bank "
                       "(train-retriever, index, encode); pass num_retrieved=0 to skip")
    ids = [int(i) for i in self.retriever.retrieve_for_prompt(text, image, k)]
    return [self.memory.document(i) for i in ids], ids

  # --- tasks -------------------------------------------------------------------------------
  def _text_to_image_prompt(self, caption: str, k: int) -> tuple[P.Prompt, list[int]]:
    if not caption.strip():
      raise InputError("text_to_image: an empty caption")
    docs, ids = self.retrieve(caption, None, k)
    tokens = self.text_tokenizer.encode(caption)
    prompt = P.text_to_image(self.vocab, tokens, docs)
    # As in training (REFERENCE.md 3), retrieved documents are dropped, never cut, until the
    # prompt and the image fit the window; the lowest-ranked goes first.
    while docs and len(prompt.cond) + self.n_image + 1 > self.model.cfg.seq_len:
      docs, ids = docs[:-1], ids[:-1]
      prompt = P.text_to_image(self.vocab, tokens, docs)
    return prompt, ids

  def image_nll(self, captions: Sequence[str], codes_BN, *, num_retrieved: int = 0) -> np.ndarray:
    """Teacher-forced NLL (nats, summed over the N codes) of each image's codes after its
    text-to-image prompt (and `num_retrieved` documents retrieved for the caption). float64 [B]."""
    codes = np.asarray(codes_BN)
    if codes.ndim != 2 or codes.shape[1] != self.n_image or len(codes) != len(captions):
      raise InputError(f"image_nll: codes of shape {codes.shape} for {len(captions)} captions; "
                       f"expected [{len(captions)}, {self.n_image}]")
    prompts_ = [self._text_to_image_prompt(c, num_retrieved)[0].cond for c in captions]
    return continuation_nll(self.model, prompts_, [self.vocab.image_to_ids(c) for c in codes])

  def text_to_image(self, captions: Sequence[str], *, num_candidates: int | None = None,
                    pool: str | None = None, cfg_weight: float | None = None,
                    temperature: float | None = None, top_p: float | None = None,
                    num_retrieved: int | None = None, rerank: bool = True,
                    seed: int | None = None) -> TextToImageResult:
    d = self.config.decoding
    n = d.num_candidates if num_candidates is None else num_candidates
    pool = d.pool if pool is None else pool
    k = d.num_retrieved if num_retrieved is None else num_retrieved
    if n < 1:
      raise InputError(f"num_candidates={n}: must be >= 1")
    if pool not in POOLS:
      raise InputError(f"decoding.pool={pool!r}: expected one of {POOLS}")
    if not captions:
      raise InputError("text_to_image: no captions")
    cond, uncond, retrieved = [], [], []
    for caption in captions:
      prompt, ids = self._text_to_image_prompt(caption, k)
      cond += [prompt.cond] * n
      uncond += [prompt.uncond] * n
      retrieved.append(ids)
    use_cdk = np.zeros((len(captions), n), bool)
    if pool == "cdk":
      use_cdk[:] = True
    elif pool == "mixed":
      use_cdk[:, n // 2:] = True  # half top-p, half CD-K (n = 1: top-p)
    spec = SamplerSpec(num_streams=2, max_new_tokens=self.n_image + 1,
                       tokens_per_image=self.n_image, top_k=d.top_k, cdk_k=d.cdk_k,
                       stop_after_image=True, cache_window=d.cache_window)
    knobs = make_knobs(len(cond), temperature=d.temperature if temperature is None else temperature,
                       top_p=d.top_p if top_p is None else top_p, use_cdk=use_cdk.reshape(-1),
                       cfg_weight=d.cfg_weight if cfg_weight is None else cfg_weight,
                       cdk_alpha=d.cdk_alpha)
    rng = jax.random.key(d.seed if seed is None else seed)
    tokens, _ = generate(self.model, self.vocab, [cond, uncond], spec, knobs, rng)
    codes = self.vocab.ids_to_image(tokens[:, :self.n_image])
    images = self.image_tokenizer.decode(codes)
    size = images.shape[1]
    candidates = images.reshape(len(captions), n, size, size, 3)
    scores = None
    best = np.zeros(len(captions), int)
    if rerank and n > 1 and self.retriever is not None:
      scores = self._pool_scores(images, captions, n)
      best = scores.argmax(1)
    return TextToImageResult(candidates[np.arange(len(captions)), best], candidates, scores,
                             codes.reshape(len(captions), n, -1), retrieved)

  def _pool_scores(self, images, captions: Sequence[str], n: int) -> np.ndarray:
    """Dual-encoder scores [B, n] of image-major pools (caption b's candidates are rows
    b*n .. b*n+n-1): what text-to-image and infilling re-rank by."""
    texts = [c for c in captions for _ in range(n)]
    return np.asarray(self.retriever.embedder.score(images, texts)).reshape(len(captions), n)

  def _decode_text(self, prompts_: list[np.ndarray], temperature: float, seed: int,
                   state: C.ModalityState | None = None) -> list[str]:
    d = self.config.decoding
    spec = SamplerSpec(max_new_tokens=d.max_text_tokens, tokens_per_image=self.n_image,
                       top_k=d.top_k, allow_images=False, cache_window=d.cache_window)
    tokens, _ = generate(self.model, self.vocab, [prompts_], spec,
                         make_knobs(len(prompts_), temperature=temperature, top_p=d.top_p),
                         jax.random.key(seed), state=state)
    texts = []
    for row in tokens:
      end = np.flatnonzero(row == self.vocab.eos_id)
      row = row[:end[0]] if end.size else row
      texts.append(self.text_tokenizer.decode(self.vocab.ids_to_text(row[self.vocab.is_text(row)])))
    return texts

  def caption(self, images_BHWC, *, infill: bool = False, temperature: float = 0.0,
              num_retrieved: int = 0, seed: int = 0, instruction: str | None = None) -> list[str]:
    """Image-to-text with the causal prompt or CM3's infilling prompt (greedy by default).
    `instruction` (e.g. "Describe the given picture.", the SFT captioning template of
    data/tasks.py) follows the image, `<eos> <break> I <break> {instruction}`, and the caption
    is what the decoder writes after it: the prompt an instruction-tuned decoder expects."""
    if instruction is not None and (infill or not instruction.strip()):
      raise InputError("caption: an instruction needs the causal prompt and some text")
    codes = self.image_tokenizer.encode(images_BHWC)
    if instruction is not None:
      text = np.asarray(self.text_tokenizer.encode(instruction.strip()))
    prompts_ = []
    for image, c in zip(np.asarray(images_BHWC), codes):
      docs, _ = self.retrieve(None, image, num_retrieved)
      if instruction is not None:
        prompts_.append(P.continuation(self.vocab, [ImageSegment(c), TextSegment(text)],
                                       docs).cond)
      else:
        prompts_.append(P.image_to_text(self.vocab, c, self.n_image, infill=infill,
                                        retrieved=docs).cond)
    texts = self._decode_text(prompts_, temperature, seed)
    return [t.strip() for t in texts] if instruction is not None else texts

  def answer(self, images_BHWC, questions: Sequence[str], *, seed: int = 0) -> list[str]:
    """Visual question answering with the VQA task's template (data/tasks.py, image first):
    `<eos> <break> I <break> Question: {q} Answer:` -> greedy text up to its first '.'."""
    if len(images_BHWC) != len(questions):
      raise InputError(f"answer: {len(images_BHWC)} images but {len(questions)} questions")
    if any(not q.strip() for q in questions):
      raise InputError("answer: an empty question")
    codes = self.image_tokenizer.encode(images_BHWC)
    prompts_ = []
    for c, q in zip(codes, questions):
      text = np.asarray(self.text_tokenizer.encode(vqa_text(q.strip())))
      prompts_.append(P.continuation(self.vocab, [ImageSegment(c), TextSegment(text)]).cond)
    return [t.split(".")[0].strip() for t in self._decode_text(prompts_, 0.0, seed)]

  def infill_image(self, images_BHWC, captions: Sequence[str] | None, region_mask_N, *,
                   temperature: float | None = None, num_candidates: int = 1,
                   seed: int = 0) -> np.ndarray:
    """Regenerate the codes under `region_mask_N` (one contiguous raster run) of each image.

    `num_candidates` > 1 draws that many infills per image and keeps the one the dual encoder
    scores highest against the image's caption (the text-to-image pools' re-ranking); it needs
    captions and a retriever.
    """
    n = int(num_candidates)
    if n < 1:
      raise InputError(f"num_candidates={n}: must be >= 1")
    if n > 1 and (not captions or not all(captions) or self.retriever is None):
      raise InputError(f"num_candidates={n}: re-ranking infills needs captions (one per "
                       "image, none empty) and the dual encoder (retriever)")
    codes = self.image_tokenizer.encode(images_BHWC)
    region = np.asarray(region_mask_N, bool).reshape(-1)
    prompts_ = []
    for b, c in enumerate(codes):
      caption = captions[b] if captions else None
      tokens = self.text_tokenizer.encode(caption) if caption else None
      prompts_ += [P.image_infill(self.vocab, tokens, c, region, self.n_image)] * n
    span = prompts_[0].image_span
    state = C.initial_state(self.vocab, np.zeros((len(prompts_), 1), np.int32),
                            np.ones(len(prompts_), np.int32), self.n_image,
                            span_lens_B=np.full(len(prompts_), span), span_close=self.vocab.eos_id)
    d = self.config.decoding
    spec = SamplerSpec(max_new_tokens=span + 1, tokens_per_image=self.n_image, top_k=d.top_k,
                       cache_window=d.cache_window)
    tokens, _ = generate(self.model, self.vocab, [[p.cond for p in prompts_]], spec,
                         make_knobs(len(prompts_), temperature=d.temperature if temperature is None
                                    else temperature, top_p=d.top_p),
                         jax.random.key(seed), state=state,
                         image_index=[[p.image_index for p in prompts_]])
    out = np.repeat(codes, n, axis=0)  # image-major: image b's candidates are rows b*n..b*n+n-1
    out[:, region] = self.vocab.ids_to_image(tokens[:, :span])
    images = self.image_tokenizer.decode(out)
    if n == 1:
      return images
    scores_BN = self._pool_scores(images, captions, n)
    return images.reshape(len(codes), n, *images.shape[1:])[np.arange(len(codes)),
                                                              scores_BN.argmax(1)]

  def infill_text(self, befores: Sequence[str], afters: Sequence[str], *, temperature: float = 0.0,
                  seed: int = 0) -> list[str]:
    prompts_ = [P.text_infill(self.vocab, self.text_tokenizer.encode(b),
                              self.text_tokenizer.encode(a)).cond for b, a in zip(befores, afters)]
    return self._decode_text(prompts_, temperature, seed)

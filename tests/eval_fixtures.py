"""A tiny, randomly initialised CM3Leon stack for evaluation tests: every real component
(decoder, VQ tokenizer, text tokenizer, dual encoder, ScaNN index, memory bank on disk), no
training, 16 px Shapes records made in memory. Results mean nothing; the plumbing is real."""

import jax
import numpy as np
from flax import nnx

from cm3leon_jax.data import records as R
from cm3leon_jax.data import shapes
from cm3leon_jax.decode.api import Generator, MemoryBank
from cm3leon_jax.model.decoder import Decoder, DecoderConfig
from cm3leon_jax.retrieval.encoder import DualEncoder, Embedder, EncoderConfig, document_embedding
from cm3leon_jax.retrieval.index import Index
from cm3leon_jax.retrieval.strategy import Retriever, unit_rows
from cm3leon_jax.tokenizers.text import TextTokenizer
from cm3leon_jax.tokenizers.vocab import ImageSegment, TextSegment, Vocab
from cm3leon_jax.tokenizers.vq import ImageTokenizer, VQModel
from cm3leon_jax.train import mesh as mesh_lib
from cm3leon_jax.train.mesh import make_mesh


def shapes_records(split: str, count: int, size: int, seed: int = 0) -> list[dict]:
  """What data/sources.py yields for a Shapes split: image, caption, scene."""
  out = []
  for i in range(count):
    scene = shapes.scene_at(seed, i, split)
    out.append({"image": shapes.render(scene, size), "text": shapes.caption(scene, i),
                "scene": scene, "id": i})
  return out


def random_module(config, make, seed: int):
  """An NNX module with random numpy weights: matrices ~ N(0, 1/fan_in), norm scales 1, other
  vectors 0. Skips the module's own initialisers, which compile op by op (tens of seconds on
  a busy 2-core machine); what the tests check does not depend on how weights are drawn."""
  mesh = make_mesh(config.mesh)
  with jax.set_mesh(mesh), nnx.logical_axis_rules(mesh_lib.axis_rules(config)):
    graphdef, abstract = nnx.split(nnx.eval_shape(make))
  rng = np.random.default_rng(seed)

  def fill(path, a):
    if not np.issubdtype(a.dtype, np.floating):
      return np.zeros(a.shape, a.dtype)
    if a.ndim <= 1:
      return np.full(a.shape, 1.0 if "scale" in str(path[-1]) else 0.0, a.dtype)
    return (rng.normal(size=a.shape) / np.sqrt(np.prod(a.shape[:-1]))).astype(a.dtype)

  return nnx.merge(graphdef, jax.tree_util.tree_map_with_path(fill, abstract))


def random_decoder(config, seed: int = 0) -> Decoder:
  # Unit-scale weights (not the paper's near-zero init) make the logits depend on the prompt,
  # as a trained model's do.
  return random_module(config, lambda: Decoder(DecoderConfig.from_config(config),
                                               rngs=nnx.Rngs(seed)), seed)


def tiny_generator(config, bank_dir: str, num_bank: int = 32) -> tuple[Generator, Embedder]:
  """Generator with retrieval over a memory bank of `num_bank` train documents."""
  size = config.vq.image_size
  train = shapes_records("train", num_bank, size)
  tokenizer = TextTokenizer.train([r["text"] for r in shapes_records("train", 200, size)],
                                  config.vocab.text_size, min_frequency=1)
  mesh = make_mesh(config.mesh)
  image_tokenizer = ImageTokenizer(
      random_module(config, lambda: VQModel(config.vq, rngs=nnx.Rngs(1)), 1), mesh)
  encoder = random_module(
      config, lambda: DualEncoder(EncoderConfig.from_config(config), rngs=nnx.Rngs(2)), 2)
  embedder = Embedder(encoder, tokenizer, mesh=mesh, batch_size=64)
  vocab = Vocab.from_config(config)
  images = np.stack([r["image"] for r in train])
  texts = [r["text"] for r in train]
  codes = image_tokenizer.encode(images)
  docs = [[TextSegment(tokenizer.encode(t)), ImageSegment(c)] for t, c in zip(texts, codes)]
  R.write_records(bank_dir, (R.encode_tokens(i, vocab.document_to_ids(d))
                             for i, d in enumerate(docs)), {"kind": "tokens"})
  bank_NE = document_embedding(embedder.embed_texts(texts), embedder.embed_images(images))
  retriever = Retriever(embedder, Index.build(bank_NE), unit_rows(bank_NE),
                        config.retrieval.max_score)
  generator = Generator(config, random_decoder(config), tokenizer, image_tokenizer, retriever,
                        MemoryBank(bank_dir, vocab))
  return generator, embedder

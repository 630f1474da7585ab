"""The dual encoder: embeddings, masks, document embedding, InfoNCE, scoring, training, resume."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from cm3leon_jax import configs
from cm3leon_jax.errors import InputError
from cm3leon_jax.retrieval import train_encoder
from cm3leon_jax.retrieval.encoder import Embedder, EncoderConfig, document_embedding, info_nce
from cm3leon_jax.tokenizers.text import TextTokenizer
from cm3leon_jax.train.mesh import make_mesh

COLOURS = {"red": (220, 40, 40), "green": (40, 170, 60), "blue": (40, 70, 220),
           "yellow": (240, 210, 30)}
CORNERS = ("top left", "top right", "bottom left", "bottom right")


class Quadrants:
  """16 px images with one coloured quadrant; the caption names colour and corner."""

  def __init__(self, n, seed=0):
    rng = np.random.default_rng(seed)
    self.items = []
    for _ in range(n):
      colour, corner = rng.choice(list(COLOURS)), int(rng.integers(4))
      image = np.full((16, 16, 3), 245, np.uint8)
      r, c = divmod(corner, 2)
      image[8 * r:8 * r + 8, 8 * c:8 * c + 8] = COLOURS[colour]
      self.items.append({"image": image, "text": f"a {colour} square at the {CORNERS[corner]}"})

  def __len__(self):
    return len(self.items)

  def __getitem__(self, i):
    return self.items[i]


@pytest.fixture(scope="module")
def config():
  return configs.load("tiny", ["train.checkpoint_every=2"])


@pytest.fixture(scope="module")
def tokenizer():
  texts = [f"a {c} square at the {k}" for c in COLOURS for k in CORNERS] * 4
  return TextTokenizer.train(texts, vocab_size=300, min_frequency=1)


@pytest.fixture(scope="module")
def embedder(config, tokenizer):
  model, _ = train_encoder.init_sharded(config, make_mesh(config.mesh), steps=10)
  return Embedder(model, tokenizer, mesh=make_mesh(config.mesh), batch_size=16)


def test_text_and_image_embeddings_are_unit_vectors_of_embed_dim(embedder):
  data = Quadrants(5)
  t = embedder.embed_texts([x["text"] for x in data.items])
  i = embedder.embed_images(np.stack([x["image"] for x in data.items]))
  assert t.shape == i.shape == (5, 32)
  np.testing.assert_allclose(np.linalg.norm(t, axis=1), 1.0, rtol=1e-5)
  np.testing.assert_allclose(np.linalg.norm(i, axis=1), 1.0, rtol=1e-5)


def test_padding_tokens_do_not_change_the_text_embedding(embedder):
  ids, mask = embedder.tokenize(["a red square at the top left"])
  other = ids.copy()
  other[~mask] = 7  # garbage where the mask is off
  np.testing.assert_allclose(embedder.embed_text_tokens(ids, mask),
                             embedder.embed_text_tokens(other, mask), atol=1e-6)


def test_masked_patches_do_not_change_the_image_embedding(embedder):
  image = Quadrants(1).items[0]["image"][None]
  mask = np.ones((1, embedder.cfg.num_patches), bool)
  mask[0, 0] = False
  changed = image.copy()
  changed[0, :4, :4] = 0  # patch 0 (4 px patches), which the mask removes
  np.testing.assert_allclose(embedder.embed_pixels(image, mask),
                             embedder.embed_pixels(changed, mask), atol=1e-6)
  assert not np.allclose(embedder.embed_pixels(image), embedder.embed_pixels(changed))


def test_batching_does_not_change_embeddings(embedder):
  texts = [x["text"] for x in Quadrants(20).items]  # 16 + 4: two padded batches
  one_by_one = np.concatenate([embedder.embed_texts([t]) for t in texts[:3]])
  np.testing.assert_allclose(embedder.embed_texts(texts)[:3], one_by_one, atol=1e-5)


def test_document_embedding_is_the_mean_of_normalised_embeddings():
  text = np.array([[3.0, 0.0]])
  image = np.array([[0.0, 0.5]])
  np.testing.assert_allclose(document_embedding(text, image), [[0.5, 0.5]])


def test_single_modality_document_uses_that_embedding_alone():
  text = np.array([[3.0, 0.0], [3.0, 0.0]])
  image = np.array([[0.0, 2.0], [0.0, 2.0]])
  out = document_embedding(text, image, has_text_B=[True, False], has_image_B=[False, True])
  np.testing.assert_allclose(out, [[1.0, 0.0], [0.0, 1.0]])
  np.testing.assert_allclose(document_embedding(image_BE=image), [[0, 1], [0, 1]])
  with pytest.raises(InputError, match="neither text nor an image"):
    document_embedding(text, image, has_text_B=[False, True], has_image_B=[False, True])


def test_info_nce_is_log_batch_for_uninformative_and_zero_for_perfect_embeddings():
  same = jnp.ones((4, 2)) / jnp.sqrt(2.0)
  loss, _ = info_nce(same, same, 1.0)
  assert float(loss) == pytest.approx(np.log(4), rel=1e-5)
  eye = jnp.eye(4)
  loss, acc = info_nce(eye, eye, 100.0)
  assert float(loss) < 1e-6 and float(acc) == 1.0


def test_a_hard_negative_equal_to_the_caption_costs_half_log_2_and_an_invalid_one_nothing():
  # One pair, perfectly aligned: plain InfoNCE is 0. A valid negative identical to the true
  # text ties it in the image -> text softmax: that half of the loss becomes log 2.
  e = jnp.eye(1, 2)
  loss, _ = info_nce(e, e, 1.0, neg_text_BE=e, neg_valid_B=jnp.array([True]))
  assert float(loss) == pytest.approx(0.5 * np.log(2), rel=1e-5)
  loss, _ = info_nce(e, e, 1.0, neg_text_BE=e, neg_valid_B=jnp.array([False]))
  assert float(loss) == pytest.approx(0.0, abs=1e-6)


def test_pairs_get_their_caption_with_one_word_swapped_as_a_hard_negative(config, tokenizer):
  hard = configs.load("tiny", ["retrieval.hard_negatives=1.0", "retrieval.pack_text=False",
                               "retrieval.swap_groups=('red green blue yellow',)"])
  batch = next(iter(train_encoder.pair_dataset(Quadrants(16), tokenizer, hard, 16, seed=0)))
  for ids, mask, neg_ids, neg_mask in zip(batch["ids"], batch["mask"], batch["neg_ids"],
                                          batch["neg_mask"]):
    text = tokenizer.decode(ids[mask].tolist())
    neg = tokenizer.decode(neg_ids[neg_mask].tolist())
    colour = text.split()[1]
    assert neg != text and neg.split()[1] in COLOURS and neg.split()[1] != colour
    assert neg.replace(neg.split()[1], colour) == text  # only the colour word changed
  plain = next(iter(train_encoder.pair_dataset(Quadrants(16), tokenizer, config, 16, seed=0)))
  assert "neg_ids" not in plain and "neg_valid" not in plain


def test_a_caption_with_no_swappable_word_gets_no_hard_negative(tokenizer):
  hard = configs.load("tiny", ["retrieval.hard_negatives=1.0", "retrieval.pack_text=False",
                               "retrieval.swap_groups=('circle cross',)"])
  batch = next(iter(train_encoder.pair_dataset(Quadrants(8), tokenizer, hard, 8, seed=0)))
  assert not batch["neg_mask"].any()


@pytest.mark.parametrize("overrides, message", [
    (["retrieval.hard_negatives=1.5"], "hard_negatives=1.5: a probability"),
    (["retrieval.hard_negatives=0.5", "retrieval.swap_groups=('red',)"],
     "needs --config.retrieval.swap_groups"),
])
def test_bad_hard_negative_settings_are_clear_errors(tokenizer, overrides, message):
  with pytest.raises(InputError, match=message):
    train_encoder.pair_dataset(Quadrants(8), tokenizer, configs.load("tiny", overrides), 8, 0)


def test_a_conv_stem_keeps_the_image_embedding_a_unit_vector(tokenizer):
  stem = configs.load("tiny", ["retrieval.image_stem=4"])
  mesh = make_mesh(stem.mesh)
  model, _ = train_encoder.init_sharded(stem, mesh, steps=10)
  assert model.stem.kernel.shape == (3, 3, 3, 4)
  emb = Embedder(model, tokenizer, mesh=mesh, batch_size=8)
  out = emb.embed_images(np.stack([x["image"] for x in Quadrants(3).items]))
  np.testing.assert_allclose(np.linalg.norm(out, axis=1), 1.0, atol=1e-5)


def test_temperature_starts_at_its_config_value(config):
  model, _ = train_encoder.init_sharded(config, make_mesh(config.mesh), steps=10)
  assert 1.0 / float(model.logit_scale()) == pytest.approx(config.retrieval.temperature_init)


def test_score_is_the_cosine_of_each_image_text_pair(embedder):
  data = Quadrants(3).items
  images, texts = np.stack([x["image"] for x in data]), [x["text"] for x in data]
  expected = np.sum(embedder.embed_images(images) * embedder.embed_texts(texts), axis=1)
  np.testing.assert_allclose(embedder.score(images, texts), expected, atol=1e-6)


def test_images_of_the_wrong_size_or_type_are_clear_errors(embedder):
  with pytest.raises(InputError, match=r"expected uint8 \[batch, 16, 16, 3\]"):
    embedder.embed_images(np.zeros((1, 32, 32, 3), np.uint8))
  with pytest.raises(InputError, match="expected uint8 pixels, got float32"):
    embedder.embed_images(np.zeros((1, 16, 16, 3), np.float32))
  with pytest.raises(InputError, match="2 images but 1 texts"):
    embedder.score(np.zeros((2, 16, 16, 3), np.uint8), ["a"])


def test_patch_size_must_divide_the_image(config):
  bad = configs.load("tiny", ["retrieval.image_patch=5"])
  with pytest.raises(InputError, match="image_patch=5 does not divide"):
    EncoderConfig.from_config(bad)


def test_train_step_is_data_parallel_over_all_devices(config):
  mesh = make_mesh(config.mesh)
  assert mesh.shape["data"] == len(jax.devices()) == 8


@pytest.mark.slow
def test_training_learns_and_resumes_exactly(config, tokenizer, tmp_path):
  data = Quadrants(256)
  straight = train_encoder.train(config, data, tokenizer, str(tmp_path / "a"), steps=4,
                                 progress=False, log_every=1)
  train_encoder.train(config, data, tokenizer, str(tmp_path / "b"), steps=2, progress=False)
  resumed = train_encoder.train(config, data, tokenizer, str(tmp_path / "b"), steps=4,
                                progress=False, log_every=1)
  assert resumed["loss"] == pytest.approx(straight["loss"], rel=1e-5)
  # Resumed with nothing left to do: the finished run's last logged metrics, not NaNs.
  again = train_encoder.train(config, data, tokenizer, str(tmp_path / "b"), steps=4,
                              progress=False)
  assert again["step"] == 4 and again["loss"] == resumed["loss"]
  a = train_encoder.load_embedder(config, str(tmp_path / "a"), tokenizer=tokenizer)
  b = train_encoder.load_embedder(config, str(tmp_path / "b"), tokenizer=tokenizer)
  texts = [x["text"] for x in data.items[:8]]
  np.testing.assert_allclose(a.embed_texts(texts), b.embed_texts(texts), atol=1e-5)
  # Keep training: 16 colour x corner combinations become retrievable from their captions.
  train_encoder.train(config, data, tokenizer, str(tmp_path / "a"), steps=60, progress=False)
  trained = train_encoder.load_embedder(config, str(tmp_path / "a"), tokenizer=tokenizer)
  held_out = Quadrants(64, seed=1).items
  t = trained.embed_texts([x["text"] for x in held_out])
  i = trained.embed_images(np.stack([x["image"] for x in held_out]))
  same_scene = np.array([[x["text"] == y["text"] for y in held_out] for x in held_out])
  hit = same_scene[np.arange(64), np.argmax(t @ i.T, axis=1)]
  assert hit.mean() > 0.5  # chance: 1/16

"""The text tokenizer: training, exact round trip, persistence, bad input."""

import os
import unicodedata

import numpy as np
import pytest
from hypothesis import given, settings, strategies as st

from cm3leon_jax.errors import InputError
from cm3leon_jax.tokenizers.text import TextTokenizer

CORPUS = [f"a {size} {colour} {shape} at the {where} number {i}"
          for i, (size, colour, shape, where) in enumerate(
              (s, c, h, w) for s in ("small", "large") for c in ("red", "green", "blue")
              for h in ("circle", "square", "triangle") for w in ("top left", "centre", "bottom"))]


@pytest.fixture(scope="module")
def tokenizer():
  return TextTokenizer.train(CORPUS * 5, vocab_size=400)


@pytest.fixture(scope="module")
def raw_tokenizer():
  return TextTokenizer.train(CORPUS * 5, vocab_size=400, normalization="none")


def test_training_respects_the_vocab_size_and_learns_merges(tokenizer):
  assert 256 < tokenizer.vocab_size <= 400
  # "circle" is frequent: it must be fewer tokens than its 6 bytes.
  assert len(tokenizer.encode("circle")) < 6


def test_digits_are_split_one_per_token(tokenizer):
  ids = tokenizer.encode("2024")
  assert [tokenizer.decode([i]) for i in ids] == ["2", "0", "2", "4"]


@pytest.mark.parametrize("text", ["hello world", "😀🎨 emoji", "ctrl\x01\x07\x1b\t\n", "0123456789",
                                  "  double  spaces ", "", "Ünïcödé ñ 漢字 עברית"])
def test_decode_encode_is_exact(tokenizer, text):
  assert tokenizer.decode(tokenizer.encode(text)) == text


def test_nfkc_normalises_compatibility_characters(tokenizer, raw_tokenizer):
  text = "ﬁ ＡＢ ①"  # ligature, full-width letters, circled digit
  assert tokenizer.decode(tokenizer.encode(text)) == "fi AB 1"
  assert raw_tokenizer.decode(raw_tokenizer.encode(text)) == text


@settings(max_examples=200)
@given(st.text(alphabet=st.characters(blacklist_categories=("Cs",), blacklist_characters="\x00")))
def test_arbitrary_unicode_round_trips(tokenizer, raw_tokenizer, text):
  assert raw_tokenizer.decode(raw_tokenizer.encode(text)) == text
  assert tokenizer.decode(tokenizer.encode(text)) == unicodedata.normalize("NFKC", text)


def test_batch_encode_matches_single_encode(tokenizer):
  texts = ["red circle", "42 blue squares", ""]
  batch = tokenizer.encode_batch(texts)
  for text, ids in zip(texts, batch):
    np.testing.assert_array_equal(ids, tokenizer.encode(text))
  assert tokenizer.decode_batch(batch) == texts


def test_save_load_round_trip(tokenizer, tmp_path):
  path = tmp_path / "tok.json"
  tokenizer.save(str(path))
  loaded = TextTokenizer.load(str(path))
  assert loaded.vocab_size == tokenizer.vocab_size
  np.testing.assert_array_equal(loaded.encode("a large red circle 7"),
                                tokenizer.encode("a large red circle 7"))
  assert [p.name for p in tmp_path.iterdir()] == ["tok.json"]  # no temp file left


def test_vocab_size_below_the_byte_alphabet_is_an_error():
  with pytest.raises(InputError, match="vocab_size=200 is too small"):
    TextTokenizer.train(CORPUS, vocab_size=200)


@pytest.mark.parametrize("content", [b"", b"{not json", b"\xff\xfe\x00", b'{"version": "1.0"}'])
def test_unreadable_tokenizer_file_is_a_one_line_error(tmp_path, content):
  path = tmp_path / "bad.json"
  path.write_bytes(content)
  with pytest.raises(InputError) as error:
    TextTokenizer.load(str(path))
  assert str(path) in str(error.value) and "\n" not in str(error.value)


def test_missing_tokenizer_file_is_an_error(tmp_path):
  with pytest.raises(InputError, match="not found"):
    TextTokenizer.load(str(tmp_path / "missing.json"))

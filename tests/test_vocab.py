"""The shared vocabulary: id ranges and the document round trip."""

import numpy as np
import pytest
from hypothesis import given, strategies as st

from cm3leon_jax import configs
from cm3leon_jax.errors import InputError
from cm3leon_jax.tokenizers.vocab import ImageSegment, TextSegment, Vocab

VOCAB = Vocab(text_size=300, image_size=64, num_sentinels=16)


def test_ranges_are_disjoint_complete_and_padded():
  ranges = [VOCAB.special_range, VOCAB.sentinel_range, VOCAB.text_range, VOCAB.image_range,
            VOCAB.padding_range]
  # Consecutive: each range starts where the previous ends, from 0 to size.
  assert ranges[0][0] == 0 and ranges[-1][1] == VOCAB.size
  for (_, end), (start, _) in zip(ranges, ranges[1:]):
    assert end == start
  assert [e - s for s, e in ranges[:4]] == [5, 16, 300, 64]
  assert VOCAB.size == 512 and VOCAB.size % 128 == 0  # 385 used ids -> 512


def test_every_id_has_exactly_one_kind():
  ids = np.arange(VOCAB.size)
  kinds = np.stack([VOCAB.is_text(ids), VOCAB.is_image(ids), VOCAB.is_sentinel(ids),
                    ids < 5, ids >= VOCAB.image_end])
  assert (kinds.sum(0) == 1).all()
  assert (VOCAB.is_special(ids) == ~(kinds[0] | kinds[1])).all()


def test_special_ids_and_names():
  assert [VOCAB.pad_id, VOCAB.eos_id, VOCAB.break_id, VOCAB.infill_id, VOCAB.unk_id] == [0, 1, 2, 3, 4]
  assert VOCAB.token_name(2) == "<break>"
  assert VOCAB.token_name(VOCAB.sentinel_id(3)) == "<mask:3>"
  assert VOCAB.token_name(VOCAB.image_start) == "<img:0>"


def test_paper_vocabulary_rounds_to_a_multiple_of_128():
  vocab = Vocab.from_config(configs.load("cm3leon_7b"))
  assert vocab.used_size == 5 + 16 + 56320 + 8192
  assert vocab.size == 64640


def test_serialisation_follows_reference_section_1():
  doc = [TextSegment(np.array([7, 8])), ImageSegment(np.array([0, 63]))]
  ids = VOCAB.documents_to_ids([doc, doc])
  t, i = VOCAB.text_start, VOCAB.image_start
  one = [t + 7, t + 8, 2, i + 0, i + 63, 2, 1]
  assert ids.tolist() == [1] + one + one


def test_explicit_size_too_small_for_specials_is_an_error():
  with pytest.raises(InputError, match=r"vocab.size=300 is too small.*need 385"):
    Vocab(text_size=300, image_size=64, explicit_size=300)


def test_out_of_range_local_ids_are_errors():
  with pytest.raises(InputError, match="image codes"):
    VOCAB.document_to_ids([ImageSegment(np.array([64]))])
  with pytest.raises(InputError, match="text token ids"):
    VOCAB.document_to_ids([TextSegment(np.array([-1]))])


@pytest.mark.parametrize("ids, message", [
    ([2, 5, 1], "start with <eos>"),
    ([1, VOCAB.text_start], "end with <eos>"),
    ([1, 2, VOCAB.image_start, 1], "never closed"),
    ([1, 2, VOCAB.text_start, 2, 1], "inside an image"),
    ([1, VOCAB.sentinel_id(0), 1], "inside text"),
    ([1, 2, 2, 1], "empty image"),
])
def test_malformed_sequences_are_rejected(ids, message):
  with pytest.raises(InputError, match=message):
    VOCAB.ids_to_documents(np.array(ids))


def test_adjacent_text_segments_are_rejected():
  with pytest.raises(InputError, match="adjacent text"):
    VOCAB.document_to_ids([TextSegment(np.array([1])), TextSegment(np.array([2]))])


_text = st.lists(st.integers(0, 299), min_size=1, max_size=12).map(
    lambda x: TextSegment(np.array(x, np.int32)))
_image = st.lists(st.integers(0, 63), min_size=1, max_size=16).map(
    lambda x: ImageSegment(np.array(x, np.int32)))


@st.composite
def _documents(draw):
  docs = []
  for _ in range(draw(st.integers(0, 4))):
    doc = []
    for segment in draw(st.lists(st.one_of(_text, _image), max_size=6)):
      if isinstance(segment, TextSegment) and doc and isinstance(doc[-1], TextSegment):
        continue  # adjacent text runs are one run by definition
      doc.append(segment)
    docs.append(doc)
  return docs


@given(_documents())
def test_round_trip_is_exact(docs):
  ids = VOCAB.documents_to_ids(docs)
  assert ids.dtype == np.int32
  assert VOCAB.ids_to_documents(ids) == docs
  # Two <break>s per image, one <eos> per document plus the leading one.
  n_images = sum(isinstance(s, ImageSegment) for d in docs for s in d)
  assert (ids == VOCAB.break_id).sum() == 2 * n_images
  assert (ids == VOCAB.eos_id).sum() == len(docs) + 1

"""The CM3 transform (cm3leon_jax/data/cm3.py): property tests on random documents."""

import collections

import numpy as np
import pytest
from hypothesis import given, settings, strategies as st

from cm3leon_jax import configs
from cm3leon_jax.data import cm3
from cm3leon_jax.errors import InputError
from cm3leon_jax.tokenizers.vocab import ImageSegment, TextSegment, Vocab

N = 9  # image tokens per image in these tests
VOCAB = Vocab(text_size=50, image_size=20, num_sentinels=6)


@st.composite
def documents(draw):
  """1..3 documents of 1..4 alternating text / image segments (never two texts in a row)."""
  docs = []
  for _ in range(draw(st.integers(1, 3))):
    doc, image = [], draw(st.booleans())
    for _ in range(draw(st.integers(1, 4))):
      if image:
        doc.append(ImageSegment(np.array(draw(st.lists(st.integers(0, 19), min_size=N,
                                                       max_size=N)))))
      else:
        doc.append(TextSegment(np.array(draw(st.lists(st.integers(0, 49), min_size=1,
                                                      max_size=12)))))
      image = not image
    docs.append(doc)
  return VOCAB.documents_to_ids(docs)


sequences = documents()
span_counts = st.integers(0, VOCAB.num_sentinels)
seeds = st.integers(0, 2**32 - 1)


def masked(ids, n, seed):
  return cm3.mask(ids, n, np.random.default_rng(seed), VOCAB)


@settings(max_examples=150)
@given(sequences, span_counts, seeds)
def test_masked_sequence_is_a_permutation_plus_sentinels_infill_eos(ids, n, seed):
  starts, _ = cm3.choose_spans(ids, n, np.random.default_rng(seed), VOCAB)
  out = masked(ids, n, seed)
  k = len(starts)
  added = [VOCAB.sentinel_id(i) for i in range(k)] * 2
  added += [VOCAB.infill_id, VOCAB.eos_id] if k else []
  assert collections.Counter(out.tolist()) == collections.Counter(ids.tolist() + added)


@settings(max_examples=150)
@given(sequences, span_counts, seeds)
def test_unmask_restores_the_original_exactly(ids, n, seed):
  np.testing.assert_array_equal(cm3.unmask(masked(ids, n, seed), VOCAB), ids)


@settings(max_examples=150)
@given(sequences, span_counts, seeds)
def test_no_span_crosses_or_covers_a_special_token(ids, n, seed):
  starts, ends = cm3.choose_spans(ids, n, np.random.default_rng(seed), VOCAB)
  assert np.all(ends[:-1] <= starts[1:]), "spans overlap"
  for s, e in zip(starts, ends):
    span = ids[s:e]
    assert len(span) >= 1
    assert VOCAB.is_text(span).all() or VOCAB.is_image(span).all()
  # The specials of the sequence (<eos>, <break>) all stay in the body, in order.
  out = masked(ids, n, seed)
  body = out[:np.flatnonzero(out == VOCAB.infill_id)[0]] if len(starts) else out
  keep = lambda x: x[VOCAB.is_special(x) & ~VOCAB.is_sentinel(x)]
  np.testing.assert_array_equal(keep(body), keep(ids))


@settings(max_examples=150)
@given(sequences, span_counts, seeds)
def test_every_body_image_keeps_exactly_its_n_tokens_counting_its_moved_spans(ids, n, seed):
  out = masked(ids, n, seed)
  infill = np.flatnonzero(out == VOCAB.infill_id)
  body = out[:infill[0]] if len(infill) else out
  tail = out[infill[0] + 1:-1] if len(infill) else out[:0]
  tail_at = np.flatnonzero(VOCAB.is_sentinel(tail))
  spans = {int(tail[a]): tail[a + 1:b] for a, b in zip(tail_at, list(tail_at[1:]) + [len(tail)])}
  breaks = np.flatnonzero(body == VOCAB.break_id)
  assert len(breaks) == (ids == VOCAB.break_id).sum()
  for open_at, close_at in breaks.reshape(-1, 2):
    inside = body[open_at + 1:close_at]
    sentinels = inside[VOCAB.is_sentinel(inside)]
    assert VOCAB.is_image(inside[~VOCAB.is_sentinel(inside)]).all()
    assert all(VOCAB.is_image(spans[int(s)]).all() for s in sentinels)  # whole pieces of it
    assert (~VOCAB.is_sentinel(inside)).sum() + sum(len(spans[int(s)]) for s in sentinels) == N


@settings(max_examples=50)
@given(sequences, seeds)
def test_zero_spans_leave_the_plain_causal_sequence(ids, seed):
  np.testing.assert_array_equal(masked(ids, 0, seed), ids)


def test_worked_example_from_the_module_docstring():
  text = lambda *t: np.asarray(t) + VOCAB.text_start
  image = lambda *c: np.asarray(c) + VOCAB.image_start
  e, b = VOCAB.eos_id, VOCAB.break_id
  ids = np.concatenate([[e], text(0, 1, 2), [b], image(1, 2, 3, 4), [b], text(3, 4), [e]])
  out = cm3.apply_spans(ids, np.array([2, 6]), np.array([4, 8]), VOCAB)
  m0, m1 = VOCAB.sentinel_id(0), VOCAB.sentinel_id(1)
  expected = np.concatenate([[e], text(0), [m0, b], image(1), [m1], image(4), [b], text(3, 4), [e],
                             [VOCAB.infill_id, m0], text(1, 2), [m1], image(2, 3), [e]])
  np.testing.assert_array_equal(out, expected)


def test_loss_weights_are_zero_on_sentinel_and_pad_targets():
  targets = np.array([VOCAB.text_start, VOCAB.sentinel_id(0), VOCAB.eos_id, VOCAB.pad_id,
                      VOCAB.image_start, VOCAB.sentinel_id(5), VOCAB.infill_id])
  np.testing.assert_array_equal(cm3.loss_weights(targets, VOCAB), [1, 0, 1, 0, 1, 0, 1])


def test_span_count_is_poisson_clamped_and_never_above_the_sentinels():
  rng = np.random.default_rng(0)
  counts = np.array([cm3.sample_num_spans(rng, 1.0, 0, 15, 16) for _ in range(4000)])
  assert abs(counts.mean() - 1.0) < 0.05
  assert abs((counts == 0).mean() - np.exp(-1)) < 0.03  # about 37% stay causal
  many = [cm3.sample_num_spans(rng, 50.0, 0, 99, 6) for _ in range(200)]
  assert max(many) == 6  # capped by the 6 sentinels, not by max_spans=99
  assert min(cm3.sample_num_spans(rng, 0.01, 2, 5, 6) for _ in range(100)) == 2


def test_config_span_cap_respects_num_sentinels():
  config = configs.load("tiny", ["data.cm3_max_spans=40", "vocab.num_sentinels=8"])
  assert cm3.max_spans(config) == 8


def test_short_sequences_get_fewer_spans_than_asked():
  ids = VOCAB.documents_to_ids([[TextSegment(np.array([1, 2, 3]))]])  # 3 maskable tokens
  starts, ends = cm3.choose_spans(ids, 6, np.random.default_rng(0), VOCAB)
  assert len(starts) == 1


def test_unmask_rejects_a_tail_that_does_not_match_the_body():
  ids = VOCAB.documents_to_ids([[TextSegment(np.arange(10))]])
  out = cm3.apply_spans(ids, np.array([2, 5]), np.array([3, 7]), VOCAB)
  bad = out.copy()
  bad[bad == VOCAB.sentinel_id(1)] = VOCAB.sentinel_id(2)
  with pytest.raises(InputError, match="sentinels"):
    cm3.unmask(bad, VOCAB)
  with pytest.raises(InputError, match="end with <eos>"):
    cm3.unmask(out[:-1], VOCAB)


def test_image_index_of_the_worked_example_follows_each_code_to_its_new_place():
  text = lambda *t: np.asarray(t) + VOCAB.text_start
  image = lambda *c: np.asarray(c) + VOCAB.image_start
  e, b = VOCAB.eos_id, VOCAB.break_id
  ids = np.concatenate([[e], text(0, 1, 2), [b], image(1, 2, 3, 4), [b], text(3, 4), [e]])
  np.testing.assert_array_equal(cm3.image_index(ids, VOCAB),
                                [-1, -1, -1, -1, -1, 0, 1, 2, 3, -1, -1, -1, -1])
  # body: <eos> a <mask:0> <break> I1 <mask:1> I4 <break> d e <eos>
  # tail: <infill> <mask:0> b c <mask:1> I2 I3 <eos>: I4 keeps index 3, I2 I3 keep 1 and 2.
  index = cm3.masked_image_index(ids, np.array([2, 6]), np.array([4, 8]), VOCAB)
  np.testing.assert_array_equal(index, [-1, -1, -1, -1, 0, -1, 3, -1, -1, -1, -1,
                                        -1, -1, -1, -1, -1, 1, 2, -1])


@settings(max_examples=100)
@given(sequences, span_counts, seeds)
def test_every_moved_code_keeps_its_index_in_its_image(ids, n, seed):
  out, index = cm3.mask_with_index(ids, n, np.random.default_rng(seed), VOCAB)
  assert len(index) == len(out)
  # Move the index back with the ids: positions of each span's tokens follow unmask's order.
  starts, ends = cm3.choose_spans(ids, n, np.random.default_rng(seed), VOCAB)
  source = cm3.span_sources(len(ids), starts, ends)
  restored = np.full(len(ids), -2)
  restored[source[source >= 0]] = index[source >= 0]
  np.testing.assert_array_equal(restored, cm3.image_index(ids, VOCAB))
  np.testing.assert_array_equal(out[source >= 0], ids[source[source >= 0]])

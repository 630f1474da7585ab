"""Sequence assembly (cm3leon_jax/data/assembly.py): retrieved docs, cutting, rotation, masking."""

import numpy as np
import pytest

from cm3leon_jax import configs
from cm3leon_jax.data import assembly, cm3
from cm3leon_jax.data.assembly import Assembler
from cm3leon_jax.errors import InputError
from cm3leon_jax.tokenizers.vocab import ImageSegment, TextSegment, Vocab

VOCAB = Vocab(text_size=50, image_size=20, num_sentinels=4)
E, B = VOCAB.eos_id, VOCAB.break_id


def T(*tokens):
  return TextSegment(np.array(tokens))


def I(*codes):
  return ImageSegment(np.array(codes))


def doc(*segments):
  return VOCAB.document_to_ids(list(segments))


def assembler(seq_len=64, **kw):
  return Assembler(vocab=VOCAB, seq_len=seq_len, **kw)


def test_retrieved_documents_precede_the_query_in_order():
  q, r0, r1 = doc(T(1), I(1, 2)), doc(T(2), I(3, 4)), doc(T(3))
  seq, counts = assembler().assemble(q, [r0, r1], budget=65)
  np.testing.assert_array_equal(seq, np.concatenate([[E], r0, r1, q]))
  assert counts["retrieved_dropped"] == 0


def test_retrieved_documents_that_do_not_fit_are_dropped_never_cut():
  q = doc(T(*range(10)))                 # 11 tokens
  big, small = doc(T(*range(20))), doc(T(7, 8))  # 21 and 3 tokens
  seq, counts = assembler().assemble(q, [big, small], budget=1 + 11 + 5)
  np.testing.assert_array_equal(seq, np.concatenate([[E], small, q]))
  assert counts["retrieved_dropped"] == 1


def test_long_query_is_cut_at_the_last_segment_boundary_that_fits():
  q = doc(T(1, 2, 3), I(1, 2, 3, 4), T(4, 5), I(5, 6, 7, 8))  # 3 + 6 + 2 + 6 + 1 = 18 tokens
  # 14 tokens allowed: the second image would be cut inside, so the cut is before it.
  out, was_cut = assembly.fit_document(q, 14, VOCAB)
  np.testing.assert_array_equal(out, doc(T(1, 2, 3), I(1, 2, 3, 4), T(4, 5)))
  assert was_cut
  out, _ = assembly.fit_document(q, 8, VOCAB)  # inside the first image: keep the text only
  np.testing.assert_array_equal(out, doc(T(1, 2, 3)))


def test_a_first_text_segment_longer_than_the_window_is_cut_inside_the_text():
  out, was_cut = assembly.fit_document(doc(T(*range(30)), I(1, 2)), 11, VOCAB)
  np.testing.assert_array_equal(out, doc(T(*range(10))))
  assert was_cut


def test_a_first_image_longer_than_the_window_cannot_be_kept():
  q = doc(I(*range(16)), T(1))
  assert assembly.fit_document(q, 10, VOCAB) == (None, True)
  seq, counts = assembler(seq_len=8).assemble(q, [], budget=9)
  assert seq is None and counts["uncuttable"] == 1


def test_image_first_rotates_text_image_documents():
  np.testing.assert_array_equal(assembly.image_first(doc(T(1, 2), I(3, 4)), VOCAB),
                                doc(I(3, 4), T(1, 2)))
  np.testing.assert_array_equal(assembly.image_first(doc(T(1), I(2), T(3), I(4)), VOCAB),
                                doc(I(2), T(3), I(4), T(1)))
  for unchanged in (doc(I(3, 4), T(1)), doc(T(1), I(2), T(3)), doc(T(1, 2))):
    np.testing.assert_array_equal(assembly.image_first(unchanged, VOCAB), unchanged)


def test_image_first_rate_one_rotates_every_document_and_zero_none():
  q, r = doc(T(1), I(1, 2)), doc(T(2), I(3, 4))
  rotated = [doc(I(3, 4), T(2)), doc(I(1, 2), T(1))]
  ex, _ = assembler(max_spans=0, image_first_rate=1.0)(q, [r], np.random.default_rng(0))
  np.testing.assert_array_equal(ex["inputs"], np.concatenate([[E], *rotated])[:-1])
  ex, _ = assembler(max_spans=0, image_first_rate=0.0)(q, [r], np.random.default_rng(0))
  np.testing.assert_array_equal(ex["inputs"], np.concatenate([[E], r, q])[:-1])


def test_inputs_and_targets_are_the_sequence_shifted_by_one():
  q = doc(T(1, 2), I(3, 4))
  ex, _ = assembler(max_spans=0)(q, [], np.random.default_rng(0))
  seq = np.concatenate([[E], q])
  np.testing.assert_array_equal(ex["inputs"], seq[:-1])
  np.testing.assert_array_equal(ex["targets"], seq[1:])
  np.testing.assert_array_equal(ex["weights"], np.ones(len(seq) - 1))


def test_causal_fraction_one_never_masks_and_zero_with_min_spans_always_masks():
  q, rng = doc(T(*range(20)), I(*range(8))), np.random.default_rng(0)
  causal = assembler(min_spans=2, max_spans=4, causal_fraction=1.0)
  masked = assembler(min_spans=2, max_spans=4, causal_fraction=0.0)
  for _ in range(20):
    assert not VOCAB.is_sentinel(causal(q, [], rng)[0]["inputs"]).any()
    assert (masked(q, [], rng)[0]["inputs"] == VOCAB.infill_id).sum() == 1


def test_masked_examples_never_exceed_seq_len_and_unmask_to_the_assembly():
  rng = np.random.default_rng(1)
  a = assembler(seq_len=48, poisson_rate=3.0, max_spans=4)
  q = doc(T(*range(40)), I(*range(10)), T(1, 2))  # 55 tokens, longer than the window: cut
  r = doc(T(5), I(*range(6)))
  for _ in range(50):
    ex, counts = a(q, [r], rng)
    assert len(ex["inputs"]) <= 48 and counts["cut"] == 1
    seq = np.append(ex["inputs"], ex["targets"][-1])
    VOCAB.ids_to_documents(cm3.unmask(seq, VOCAB))  # parses: nothing cut inside an image
    assert (ex["weights"] == 0).sum() == VOCAB.is_sentinel(ex["targets"]).sum()


def test_bad_config_values_are_input_errors():
  with pytest.raises(InputError, match="causal_fraction"):
    Assembler.from_config(configs.load("tiny", ["data.causal_fraction=1.5"]))
  with pytest.raises(InputError, match="cm3_min_spans"):
    Assembler.from_config(configs.load("tiny", ["data.cm3_min_spans=20"]))
  with pytest.raises(InputError, match="seq_len"):
    Assembler.from_config(configs.load("tiny", ["model.seq_len=16"]))

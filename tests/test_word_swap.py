"""Caption word swaps (data/word_swap.py): the binding probe's and the hard negatives' input."""

import numpy as np
import pytest

from cm3leon_jax.data.word_swap import parse_groups, random_swap, swap_word


@pytest.mark.parametrize("caption, old, new, expected", [
    ("a red circle at the top left", "red", "orange", "an orange circle at the top left"),
    ("An orange square in the centre", "orange", "red", "A red square in the centre"),
    ("a small red circle", "red", "blue", "a small blue circle"),
    ("there is a cyan cross, large, at the top", "large", "small",
     "there is a cyan cross, small, at the top"),
])
def test_swap_word_replaces_the_word_and_keeps_the_article_grammatical(caption, old, new,
                                                                      expected):
  assert swap_word(caption, old, new) == expected


def test_swap_word_needs_exactly_one_whole_word_occurrence():
  assert swap_word("a red circle and a red square", "red", "blue") is None
  assert swap_word("a blue circle", "red", "green") is None
  assert swap_word("a reddish circle", "red", "green") is None


def test_parse_groups_splits_words_and_drops_groups_with_nothing_to_swap_to():
  assert parse_groups(["red blue red", "alone", "", "small large"]) == (("red", "blue"),
                                                                         ("small", "large"))


def test_random_swap_changes_exactly_one_group_word_to_another_of_its_group():
  groups = parse_groups(["red green blue", "circle square"])
  rng = np.random.default_rng(0)
  seen = {random_swap("a red circle at the top", groups, rng) for _ in range(200)}
  # 2 other colours + 1 other shape: every possible swap, and nothing else.
  assert seen == {"a green circle at the top", "a blue circle at the top",
                  "a red square at the top"}


def test_random_swap_is_none_when_no_group_word_occurs_exactly_once():
  groups = parse_groups(["red green", "circle square"])
  rng = np.random.default_rng(0)
  assert random_swap("a purple cross", groups, rng) is None
  assert random_swap("a red circle and a red square", parse_groups(["red green"]), rng) is None

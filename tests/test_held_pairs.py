"""The encoder's input pipeline reads each training pair once (retrieval/pairs.py HeldPairs) and
tokenises each distinct text once (train_encoder._Prepare): the same batches as reading and
tokenising every time, and bad items still named."""

import numpy as np
import pytest

from cm3leon_jax import configs
from cm3leon_jax.errors import InputError
from cm3leon_jax.retrieval import pairs, train_encoder
from cm3leon_jax.retrieval.encoder import tokenize
from tests.test_encoder import Quadrants, tokenizer  # noqa: F401 (the tokenizer fixture)


class Counted(Quadrants):
  """Quadrants that count the reads of each item."""

  def __init__(self, n):
    super().__init__(n)
    self.reads = [0] * n

  def __getitem__(self, i):
    self.reads[i] += 1
    return super().__getitem__(i)


def test_held_pairs_read_each_item_once_and_give_it_back_unchanged():
  source = Counted(6)
  held = pairs.HeldPairs(source, range(1, 6, 2))  # items 1, 3, 5
  for _ in range(3):
    for n, i in enumerate((1, 3, 5)):
      assert held[n]["text"] == source.items[i]["text"]
      np.testing.assert_array_equal(held[n]["image"], source.items[i]["image"])
  assert len(held) == 3
  assert source.reads == [0, 1, 0, 1, 0, 1]


@pytest.mark.parametrize("limit_mb,held", [(0, False), (16 * 16 * 3 * 8 / 2**20, True),
                                           (16 * 16 * 3 * 7 / 2**20, False)])
def test_pairs_are_held_only_where_their_images_fit_the_limit(limit_mb, held):
  # 8 images of 16 x 16 x 3 bytes: held at a limit of exactly their size, not one image less
  got = pairs.HeldPairs.fitting(Quadrants(8), range(8), limit_mb)
  assert (got is not None) == held


def test_a_held_item_without_a_text_or_of_another_image_shape_is_named():
  source = Quadrants(4)
  source.items[2] = {"image": source.items[2]["image"]}
  source.items[3] = {"image": np.zeros((8, 8, 3), np.uint8), "text": "a red square"}
  held = pairs.HeldPairs(source, range(4))
  held[0]
  with pytest.raises(InputError, match="item 2: no 'text' field"):
    held[2]
  with pytest.raises(InputError, match=r"item 3: image of shape \(8, 8, 3\), not \(16, 16, 3\)"):
    held[3]


@pytest.mark.parametrize("limit", [1 << 18, 2])
def test_tokenising_each_text_once_gives_what_tokenising_every_time_gives(tokenizer, limit):
  prepare = train_encoder._Prepare(tokenizer, max_len=6)
  prepare.MEMO_LIMIT = limit  # 2: the memo fills up; later texts are tokenised every time
  texts = ["a red square at the top left", "", "a blue square", "a red square at the top left",
           "a green square at the bottom right", "a blue square"]
  for start in range(0, len(texts), 2):
    ids, mask = prepare._tokenize(texts[start:start + 2])
    want_ids, want_mask = tokenize(tokenizer, texts[start:start + 2], 6)
    np.testing.assert_array_equal(ids, want_ids)
    np.testing.assert_array_equal(mask, want_mask)
  assert len(prepare._ids) == min(limit, 4)


@pytest.mark.parametrize("pack", [False, True])
def test_held_pairs_give_the_batches_the_dataset_gives(tokenizer, pack):
  overrides = ["retrieval.hard_negatives=0.5", f"retrieval.pack_text={pack}",
               "retrieval.swap_groups=('red green blue yellow',)"]
  held = configs.load("tiny", overrides + ["retrieval.pairs_in_memory_mb=1"])
  read = configs.load("tiny", overrides + ["retrieval.pairs_in_memory_mb=0"])
  source = Counted(24)
  a = iter(train_encoder.pair_dataset(source, tokenizer, held, 8, seed=3))
  b = iter(train_encoder.pair_dataset(Quadrants(24), tokenizer, read, 8, seed=3))
  for _ in range(9):  # three epochs
    batch_a, batch_b = next(a), next(b)
    assert batch_a.keys() == batch_b.keys()
    for k in batch_a:
      np.testing.assert_array_equal(batch_a[k], batch_b[k])
  # Read from the dataset every time, three epochs are 72 reads. Held: each item once, but for
  # an item two of the pipeline's threads read at once (two batches of 8 in flight at most).
  assert 24 <= sum(source.reads) <= 24 + 16

"""TFDS builders: build from files the test creates, read back through Grain, compare exactly."""

import json
import os

import grain
import numpy as np
import pytest

from cm3leon_jax import configs
from cm3leon_jax.data import shapes, sources
from cm3leon_jax.errors import InputError


def shapes_config(tmp_path, *overrides):
  return configs.load("tiny", [f"workdir={tmp_path}", "vq.image_size=32", "data.num_train=40",
                               "data.num_eval=8", "data.num_heldout=8", *overrides])


@pytest.fixture(scope="module")
def built_shapes(tmp_path_factory):
  config = shapes_config(tmp_path_factory.mktemp("shapes"))
  sources.builder_for(config).download_and_prepare(file_format="array_record")
  return config


def test_shapes_records_are_the_scenes_in_order(built_shapes):
  source = sources.image_text_source(built_shapes, "train")
  assert len(source) == 40
  for i in (0, 17, 39):
    record = source[i]
    scene = shapes.scene_at(0, i, "train")
    assert record["id"] == i and record["scene"] == scene
    assert np.array_equal(record["image"], shapes.render(scene, 32))
    assert record["source"] == f"shapes/train/{i}" and isinstance(record["text"], str)


def test_shapes_read_through_grain_equal_direct_reads(built_shapes):
  source = sources.image_text_source(built_shapes, "eval")
  read = list(grain.MapDataset.source(source).shuffle(seed=3))
  assert sorted(r["id"] for r in read) == list(range(8))
  for r in read:
    direct = source[r["id"]]
    assert r["text"] == direct["text"] and np.array_equal(r["image"], direct["image"])


def test_shapes_heldout_split_has_only_scenes_with_heldout_pairs(built_shapes):
  for record in sources.image_text_source(built_shapes, "heldout"):
    assert {(o.colour, o.shape) for o in record["scene"].objects} & shapes.HELDOUT_PAIRS


def test_unbuilt_dataset_is_an_input_error_naming_the_command(tmp_path):
  with pytest.raises(InputError, match="cm3leon data build shapes"):
    sources.image_text_source(shapes_config(tmp_path), "train")


def test_unknown_split_is_an_input_error(built_shapes):
  with pytest.raises(InputError, match="no split 'test'"):
    sources.image_text_source(built_shapes, "test")

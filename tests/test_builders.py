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


def test_image_source_yields_the_images_alone(built_shapes):
  images = sources.image_source(built_shapes, "eval")
  records = sources.image_text_source(built_shapes, "eval")
  assert len(images) == 8
  assert all(np.array_equal(images[i], records[i]["image"]) for i in range(8))
  with pytest.raises(IndexError):
    images[8]


def test_shapes_heldout_split_has_only_scenes_with_heldout_pairs(built_shapes):
  for record in sources.image_text_source(built_shapes, "heldout"):
    assert {(o.colour, o.shape) for o in record["scene"].objects} & shapes.HELDOUT_PAIRS


def test_unbuilt_dataset_is_an_input_error_naming_the_command(tmp_path):
  with pytest.raises(InputError, match="cm3leon data build shapes"):
    sources.image_text_source(shapes_config(tmp_path), "train")


def test_unknown_split_is_an_input_error(built_shapes):
  with pytest.raises(InputError, match="no split 'test'"):
    sources.image_text_source(built_shapes, "test")


# --- real-data builders ---------------------------------------------------------------------

from cm3leon_jax.data import build  # noqa: E402
from cm3leon_jax.data.builders import common  # noqa: E402
from tests import data_fixtures as fx  # noqa: E402


def local_config(tmp_path, *overrides):
  return configs.load("tiny", [f"workdir={tmp_path / 'work'}", "vq.image_size=32", *overrides])


def make_coco(root):
  """A tiny COCO: 3 train images (2 captions each), 2 val images; 32x32 PNGs (exact pixels)."""
  expected = {}
  for split, folder, ids in (("train", "train2017", (1, 2, 3)), ("eval", "val2017", (7, 8))):
    images, annotations = [], []
    for image_id in ids:
      name = f"{image_id:012d}.png"
      array = fx.rgb(32, seed=image_id)
      fx.write(root / folder / name, fx.png_bytes(array))
      images.append({"id": image_id, "file_name": name, "height": 32, "width": 32})
      for k in range(2):
        caption = f"  image {image_id}\ncaption {k} "
        annotations.append({"id": 100 * image_id + k, "image_id": image_id, "caption": caption})
        expected[(split, f"image {image_id} caption {k}")] = array
    short = folder.replace("2017", "")
    fx.write(root / "annotations" / f"captions_{short}2017.json",
             json.dumps({"images": images, "annotations": annotations}).encode())
  return expected


def test_coco_layout_builds_and_reads_back_through_grain_exactly(tmp_path):
  expected = make_coco(tmp_path / "coco")
  config = local_config(tmp_path)
  builder = build.build(config, "coco_captions", str(tmp_path / "coco"))
  assert common.read_skips(builder) == {"train": {}, "eval": {}}
  seen = {}
  for split in ("train", "eval"):
    source = sources.image_text_source(config, split, "coco_captions")
    for record in grain.MapDataset.source(source):
      seen[(split, record["text"])] = record["image"]
  assert seen.keys() == expected.keys()
  for key, image in seen.items():
    assert np.array_equal(image, expected[key]), key


def test_coco_bad_image_skips_all_its_captions(tmp_path):
  make_coco(tmp_path / "coco")
  fx.write(tmp_path / "coco" / "train2017" / f"{2:012d}.png", b"")
  builder = build.build(local_config(tmp_path, "data.max_skipped_fraction=0.5"), "coco_captions",
                        str(tmp_path / "coco"))
  assert common.read_skips(builder)["train"] == {"empty_file": 2}
  assert builder.info.splits["train"].num_examples == 4


def test_coco_bad_caption_skips_only_that_caption(tmp_path):
  make_coco(tmp_path / "coco")
  path = tmp_path / "coco" / "annotations" / "captions_val2017.json"
  data = json.loads(path.read_text())
  data["annotations"][0]["caption"] = "   "
  data["annotations"].append({"id": 999, "image_id": 12345, "caption": "no such image"})
  path.write_text(json.dumps(data))
  builder = build.build(local_config(tmp_path, "data.max_skipped_fraction=0.5"), "coco_captions",
                        str(tmp_path / "coco"))
  assert common.read_skips(builder)["eval"] == {"empty_caption": 1, "unknown_image_id": 1}
  assert builder.info.splits["eval"].num_examples == 3


def test_coco_without_annotations_is_an_input_error(tmp_path):
  fx.write(tmp_path / "coco" / "README", b"not coco")
  with pytest.raises(InputError, match="captions_train"):
    build.build(local_config(tmp_path), "coco_captions", str(tmp_path / "coco"))


def test_corrupt_coco_annotation_file_is_an_input_error(tmp_path):
  fx.write(tmp_path / "coco" / "annotations" / "captions_train2017.json", b"{not json")
  with pytest.raises(InputError, match="not a COCO captions file"):
    build.build(local_config(tmp_path), "coco_captions", str(tmp_path / "coco"))


def make_folder(root, outside):
  """A folder dataset: 6 good records of every image mode, then one line per bad input."""
  good, lines = {}, []
  for i, (name, (image, expected)) in enumerate(sorted(fx.mode_images(32).items())):
    fmt = "JPEG" if name == "cmyk" else "PNG"
    fx.save(image, root / "img" / f"{name}.{fmt.lower()}", fmt,
            **({"quality": 100} if fmt == "JPEG" else {}))
    lines.append(json.dumps({"image": f"img/{name}.{fmt.lower()}", "text": f"a {name} image"}))
    good[f"a {name} image"] = expected
  array = fx.rgb(32, seed=9)
  fx.write(root / "img" / "rgb.png", fx.png_bytes(array))
  lines.append(json.dumps({"image": "img/rgb.png", "text": "an rgb image"}))
  good["an rgb image"] = array
  fx.write(root / "img" / "empty.png", b"")
  full = fx.png_bytes(fx.rgb(64))
  fx.write(root / "img" / "cut.png", full[: len(full) // 2])
  fx.write(root / "img" / "text.png", b"hello\n")
  fx.write(root / "img" / "bomb.png", fx.huge_png_header())
  fx.write(outside / "secret.png", fx.png_bytes(fx.rgb(32)))
  (root / "img" / "link.png").symlink_to(outside / "secret.png")
  bad = [
      ("empty_file", {"image": "img/empty.png", "text": "x"}),
      ("truncated_image", {"image": "img/cut.png", "text": "x"}),
      ("not_an_image", {"image": "img/text.png", "text": "x"}),
      ("too_many_pixels", {"image": "img/bomb.png", "text": "x"}),
      ("missing_file", {"image": "img/missing.png", "text": "x"}),
      ("path_escapes_root", {"image": "../outside/secret.png", "text": "x"}),
      ("path_escapes_root", {"image": str(outside / "secret.png"), "text": "x"}),
      ("path_escapes_root", {"image": "img/link.png", "text": "x"}),
      ("empty_caption", {"image": "img/rgb.png", "text": ""}),
      ("empty_caption", {"image": "img/rgb.png", "text": " \t\n "}),
      ("caption_too_long", {"image": "img/rgb.png", "text": "x" * 1_000_000}),
      ("bad_caption", {"image": "img/rgb.png", "text": 42}),
      ("malformed_jsonl", {"text": "no image field"}),
  ]
  data = "\n".join(lines + [json.dumps(b) for _, b in bad]).encode()
  data += b'\n{"image": "img/rgb.png", "text": "broken\n'  # malformed JSON
  data += b'\n{"image": "img/rgb.png", "text": "caf\xe9"}\n'  # Latin-1 byte: invalid UTF-8
  data += b'{"image": "img/rgb.png", "text": "\\ud800"}\n'  # lone surrogate: invalid UTF-8
  data += b"\n   \n"  # blank lines are not records
  fx.write(root / "train.jsonl", data)
  reasons = {}
  for r, _ in bad + [("malformed_jsonl", None), ("invalid_utf8", None), ("invalid_utf8", None)]:
    reasons[r] = reasons.get(r, 0) + 1
  return good, reasons


def test_folder_with_every_bad_input_skips_each_with_its_reason(tmp_path):
  good, reasons = make_folder(tmp_path / "root", tmp_path / "outside")
  config = local_config(tmp_path, "data.max_skipped_fraction=0.9", "data.max_caption_chars=500")
  builder = build.build(config, "image_text_folder", str(tmp_path / "root"))
  assert common.read_skips(builder)["train"] == reasons
  source = sources.image_text_source(config, "train", "image_text_folder")
  read = list(grain.MapDataset.source(source))
  assert [r["text"] for r in read] == list(good)  # manifest order kept
  for record in read:
    tolerance = 3 if "cmyk" in record["text"] else 0
    assert np.abs(record["image"].astype(int) - good[record["text"]]).max() <= tolerance


def test_too_many_skips_fail_the_build_and_leave_nothing(tmp_path):
  make_folder(tmp_path / "root", tmp_path / "outside")
  config = local_config(tmp_path, "data.max_skipped_fraction=0.5")
  with pytest.raises(InputError, match=r"skipped 16 of 22 records.*max_skipped_fraction=0.5"):
    build.build(config, "image_text_folder", str(tmp_path / "root"))
  assert not (tmp_path / "work" / "data").exists()
  with pytest.raises(InputError, match="not built"):
    sources.image_text_source(config, "train", "image_text_folder")


def test_folder_without_train_manifest_is_an_input_error(tmp_path):
  fx.write(tmp_path / "root" / "eval.jsonl", b"")
  with pytest.raises(InputError, match="no train.jsonl"):
    build.build(local_config(tmp_path), "image_text_folder", str(tmp_path / "root"))
  (tmp_path / "empty").mkdir()
  with pytest.raises(InputError, match="empty"):
    build.build(local_config(tmp_path), "image_text_folder", str(tmp_path / "empty"))


def test_local_builders_need_a_manual_dir(tmp_path):
  with pytest.raises(InputError, match="--manual_dir"):
    build.build(local_config(tmp_path), "image_text_folder", None)
  with pytest.raises(InputError, match="no such directory"):
    build.build(local_config(tmp_path), "coco_captions", str(tmp_path / "absent"))

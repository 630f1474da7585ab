"""`cm3leon export`: a workdir -> an inference bundle that generates exactly what the workdir
does, loads with nothing else present, and refuses bad input with one clear error."""

import json
import os
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from cm3leon_jax import cli, configs, export
from cm3leon_jax.decode.api import Generator
from cm3leon_jax.errors import InputError
from cm3leon_jax.paths import artifacts

OVERRIDES = ["data.num_train=64", "data.num_eval=16", "data.num_heldout=16", "vq.steps=2",
             "retrieval.steps=2", "retrieval.batch_size=16", "train.steps=2"]
PROMPTS = ["a large red circle at the top left", "a small blue square in the centre"]


def _args(workdir, *extra):
  return ["--config", "tiny", f"--config.workdir={workdir}",
          *[f"--config.{o}" for o in OVERRIDES], *extra]


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
  """Every artifact inference reads, made by the CLI as a user makes them (2-step trainings)."""
  root = str(tmp_path_factory.mktemp("export") / "work")
  for argv in (["data", "build", "shapes"], ["train-text-tokenizer"], ["train-vq"],
               ["encode", "--split", "train"], ["train-retriever", "--eval-pairs", "8"],
               ["index"], ["train", "--synthetic", "--no-progress"]):
    assert cli.main([argv[0], *_args(root, *argv[1:])]) == 0, argv
  return root


def _config(workdir):
  return configs.load("tiny", [f"workdir={workdir}"] + OVERRIDES)


@pytest.fixture(scope="module")
def bundle(workdir, tmp_path_factory):
  out = str(tmp_path_factory.mktemp("bundles") / "f32")
  assert cli.main(["export", *_args(workdir, "--out", out)]) == 0
  # Nothing of the workdir is needed once the bundle exists.
  moved = workdir + "-moved"
  os.rename(workdir, moved)
  yield out
  os.rename(moved, workdir)


def _images(generator, seed=3):
  result = generator.text_to_image(PROMPTS, num_candidates=2, num_retrieved=1, seed=seed)
  return result.codes_BNT, result.scores_BN


@pytest.mark.slow
def test_bundle_generates_exactly_what_the_workdir_generates(workdir, bundle):
  codes_b, scores_b = _images(Generator.from_bundle(bundle))
  moved = workdir + "-moved"
  os.rename(moved, workdir)
  try:
    codes_w, scores_w = _images(Generator.load(_config(workdir)))
  finally:
    os.rename(workdir, moved)
  np.testing.assert_array_equal(codes_b, codes_w)
  np.testing.assert_array_equal(scores_b, scores_w)


@pytest.mark.slow
def test_manifest_lists_every_file_with_its_size_and_checksum(bundle, capsys):
  manifest = export.verify(bundle, checksums=True)
  assert manifest["format"] == export.FORMAT
  assert manifest["decoder"]["step"] == 2 and manifest["decoder"]["dtype"] == "float32"
  listed = set(manifest["files"])
  on_disk = {os.path.relpath(os.path.join(d, f), bundle) for d, _, fs in os.walk(bundle)
             for f in fs} - {export.MANIFEST}
  assert listed == on_disk
  assert "text_tokenizer.json" in listed and "vq/vq_config.json" in listed
  # model items only: no optimizer moments or data-iterator state from the trainings
  assert not [f for f in listed if "/optimizer/" in f or "/opt/" in f or "/data/" in f]
  assert {f.split("/")[0] for f in listed} == {"bundle.json", "config.json", "decoder", "index",
                                               "retriever", "text_tokenizer.json", "tokens",
                                               "vq"} - {"bundle.json"}
  assert cli.main(["export", "--check", bundle]) == 0
  assert "sizes and SHA-256 match" in capsys.readouterr().out


@pytest.mark.slow
def test_decoder_holds_the_parameters_and_nothing_else(bundle):
  config = export.load_config(bundle)
  params = nnx.state(export.load_model(config))
  count = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(params))
  assert count == export.read_manifest(bundle)["decoder"]["num_params"]
  decoder_bytes = sum(m["bytes"] for f, m in export.read_manifest(bundle)["files"].items()
                      if f.startswith("decoder/"))
  assert decoder_bytes < 2 * 4 * count  # float32 parameters, no AdamW moments (3x)


@pytest.mark.slow
def test_bfloat16_export_halves_the_decoder_and_still_generates(workdir, tmp_path):
  moved = workdir + "-moved"
  os.rename(moved, workdir)
  try:
    out = str(tmp_path / "bf16")
    manifest = export.export(_config(workdir), out, dtype="bfloat16", retrieval=False)
  finally:
    os.rename(workdir, moved)
  assert manifest["decoder"]["dtype"] == "bfloat16" and not manifest["parts"]["retrieval"]
  assert not os.path.exists(os.path.join(out, "tokens"))
  generator = Generator.from_bundle(out)
  leaves = jax.tree.leaves(nnx.state(generator.model))
  assert {x.dtype for x in leaves} == {jnp.dtype(jnp.bfloat16)}
  assert generator.retriever is None
  result = generator.text_to_image(PROMPTS[:1], num_candidates=1, num_retrieved=0, seed=0)
  assert result.images_BHWC.shape == (1, 16, 16, 3)


@pytest.mark.slow
def test_decoding_overrides_apply_and_shape_overrides_are_refused(bundle):
  assert export.load_config(bundle, ["decoding.cfg_weight=4.5"]).decoding.cfg_weight == 4.5
  with pytest.raises(InputError, match="fields are fixed; override decoding or eval"):
    export.load_config(bundle, ["model.num_layers=3"])


@pytest.mark.slow
def test_generate_cli_from_a_bundle(bundle, tmp_path, capsys):
  out = str(tmp_path / "samples")
  assert cli.main(["generate", "--bundle", bundle, "--prompt", PROMPTS[0], "--output", out,
                   "--num-candidates", "1", "--config.decoding.num_retrieved=0"]) == 0
  with open(os.path.join(out, "outputs.jsonl")) as f:
    assert [json.loads(line)["text"] for line in f] == [PROMPTS[0]]
  assert cli.main(["generate", "--bundle", bundle, "--step", "2", "--prompt", "x"]) == 2
  assert "--step and --decoder do not apply" in capsys.readouterr().err


@pytest.mark.slow
def test_eval_cli_on_a_bundle_reads_the_dataset_from_data_dir(workdir, bundle, tmp_path, capsys):
  out = str(tmp_path / "eval")
  argv = ["eval", "--bundle", bundle, "--suite", "captioning", "--output", out]
  assert cli.main(argv) == 2  # the bundle holds no dataset
  assert "a bundle holds none: pass --config.data.data_dir=" in capsys.readouterr().err
  data_dir = os.path.join(workdir + "-moved", "data")
  assert cli.main([*argv, f"--config.data.data_dir={data_dir}",
                   "--config.eval.num_captions=4"]) == 0
  with open(os.path.join(out, "metrics.json")) as f:
    assert json.load(f)["captioning"]["num_images"] == 4
  on_disk = {os.path.relpath(os.path.join(d, f), bundle) for d, _, fs in os.walk(bundle)
             for f in fs} - {export.MANIFEST}
  assert on_disk == set(export.read_manifest(bundle)["files"])  # nothing written into it


# --- bad input -------------------------------------------------------------------------------
@pytest.fixture
def broken(bundle, tmp_path):
  """A copy of the bundle to damage."""
  copy = str(tmp_path / "copy")
  shutil.copytree(bundle, copy)
  return copy


@pytest.mark.slow
def test_a_missing_file_is_named(broken):
  os.remove(os.path.join(broken, "text_tokenizer.json"))
  with pytest.raises(InputError, match="text_tokenizer.json: missing from the bundle"):
    Generator.from_bundle(broken)


@pytest.mark.slow
def test_a_truncated_file_is_named(broken):
  manifest = export.read_manifest(broken)
  rel = next(f for f in manifest["files"] if f.startswith("decoder/"))
  with open(os.path.join(broken, rel), "r+b") as f:
    f.truncate(max(0, manifest["files"][rel]["bytes"] - 1))
  with pytest.raises(InputError, match="truncated or modified"):
    export.load_config(broken)


@pytest.mark.slow
def test_a_modified_file_fails_the_checksum(broken, capsys):
  path = os.path.join(broken, "config.json")
  text = open(path).read()
  with open(path, "w") as f:
    f.write(text.replace('"num_layers": 2', '"num_layers": 3'))  # same length
  assert os.path.getsize(path) == export.read_manifest(broken)["files"]["config.json"]["bytes"]
  assert cli.main(["export", "--check", broken]) == 2
  assert "config.json: SHA-256 differs" in capsys.readouterr().err


@pytest.mark.slow
def test_a_bundle_of_another_format_is_refused(broken):
  path = os.path.join(broken, export.MANIFEST)
  manifest = json.load(open(path))
  manifest["format"] = "cm3leon_jax.bundle/99"
  json.dump(manifest, open(path, "w"))
  with pytest.raises(InputError, match="format 'cm3leon_jax.bundle/99', this version reads"):
    export.load_config(broken)


def test_a_directory_without_a_manifest_is_not_a_bundle(tmp_path):
  with pytest.raises(InputError, match="not an export bundle .bundle.json missing."):
    Generator.from_bundle(str(tmp_path))


def test_export_onto_a_file_is_one_error_line(tmp_path, capsys):
  (tmp_path / "taken").write_text("not a bundle")
  assert cli.main(["export", "--config", "tiny", f"--config.workdir={tmp_path}", "--out",
                   str(tmp_path / "taken")]) == 2
  assert "taken: is a file, not a directory" in capsys.readouterr().err
  assert (tmp_path / "taken").read_text() == "not a bundle"


def test_a_bad_dtype_is_refused_before_anything_is_read(tmp_path):
  with pytest.raises(InputError, match="--dtype=float16: choose from float32, bfloat16"):
    export.export(configs.load("tiny", [f"workdir={tmp_path}"]), str(tmp_path / "b"),
                  dtype="float16")


def test_export_without_a_decoder_is_one_error_line(tmp_path, capsys):
  assert cli.main(["export", "--config", "tiny", f"--config.workdir={tmp_path}"]) == 2
  err = capsys.readouterr().err
  assert err.count("\n") == 1 and "no decoder checkpoints; run `cm3leon train` first" in err


@pytest.mark.slow
def test_an_existing_bundle_is_replaced_only_with_overwrite(workdir, bundle, capsys):
  moved = workdir + "-moved"
  os.rename(moved, workdir)
  try:
    before = export.read_manifest(bundle)["created"]
    assert cli.main(["export", *_args(workdir, "--out", bundle)]) == 2
    assert "exists and is not empty; pass --overwrite" in capsys.readouterr().err
    assert export.read_manifest(bundle)["created"] == before  # untouched
    with pytest.raises(InputError, match="must not be the workdir or inside what is exported"):
      export.export(_config(workdir), os.path.join(workdir, "tokens", "x"))
    assert cli.main(["export", *_args(workdir, "--out", bundle, "--overwrite")]) == 0
    export.verify(bundle, checksums=True)
    assert not [d for d in os.listdir(os.path.dirname(bundle)) if ".tmp-" in d]
  finally:
    os.rename(workdir, moved)

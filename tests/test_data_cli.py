"""`cm3leon data build ...`: builds, reports written/skipped, is idempotent, fails cleanly."""

import json

from cm3leon_jax import cli
from tests import data_fixtures as fx


def run(capsys, *argv):
  status = cli.main(list(argv))
  out = capsys.readouterr()
  return status, out.out, out.err


def test_build_shapes_prints_a_summary_and_a_rerun_is_free(tmp_path, capsys):
  args = ("data", "build", "shapes", "--config", "tiny", f"--config.workdir={tmp_path}",
          "--config.data.num_train=20", "--config.data.num_eval=4", "--config.data.num_heldout=4")
  status, out, _ = run(capsys, *args)
  assert status == 0
  assert "shapes (16px_n20_e4_h4_o3_s0) built" in out
  assert "train    written       20   skipped      0" in out
  status, out, _ = run(capsys, *args)
  assert status == 0 and "already built" in out


def test_build_folder_reports_skips_by_reason(tmp_path, capsys):
  root = tmp_path / "root"
  fx.write(root / "a.png", fx.png_bytes(fx.rgb(16)))
  lines = [{"image": "a.png", "text": f"caption {i}"} for i in range(9)]
  lines.append({"image": "../etc/passwd", "text": "escape"})
  fx.write(root / "train.jsonl", "\n".join(json.dumps(r) for r in lines).encode())
  status, out, _ = run(capsys, "data", "build", "image_text_folder", "--config", "tiny",
                       f"--config.workdir={tmp_path / 'w'}", "--manual_dir", str(root),
                       "--config.data.max_skipped_fraction=0.2")
  assert status == 0
  assert "train    written        9   skipped      1 (path_escapes_root=1)" in out


def test_build_over_the_skip_threshold_exits_2_with_one_error_line(tmp_path, capsys):
  root = tmp_path / "root"
  fx.write(root / "train.jsonl", b'{"image": "missing.png", "text": "x"}\n')
  status, out, err = run(capsys, "data", "build", "image_text_folder", "--config", "tiny",
                         f"--config.workdir={tmp_path / 'w'}", "--manual_dir", str(root))
  assert status == 2
  assert err.strip().splitlines()[-1].startswith("error: split 'train': skipped 1 of 1 records")
  assert "missing_file=1" in err
  assert not (tmp_path / "w" / "data").exists()


def test_missing_manual_dir_exits_2(tmp_path, capsys):
  status, _, err = run(capsys, "data", "build", "coco_captions", "--config", "tiny",
                       f"--config.workdir={tmp_path}")
  assert status == 2 and "--manual_dir" in err

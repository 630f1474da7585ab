"""`cm3leon encode`: document layout, resume after a crash or a kill, and bad input."""

import os
import signal
import subprocess
import sys
import textwrap
import time

import numpy as np
import pytest
from flax import nnx

from cm3leon_jax import cli, configs
from cm3leon_jax.data import records
from cm3leon_jax.errors import InputError
from cm3leon_jax.tokenizers import encode, vq
from cm3leon_jax.tokenizers.text import TextTokenizer
from cm3leon_jax.tokenizers.vocab import ImageSegment, TextSegment, Vocab

CAPTIONS = ["a red circle", "two blue squares", "a small green cross at the top"]


def make_source(n, size=16):
  rng = np.random.default_rng(0)
  return [{"image": rng.integers(0, 256, (size, size, 3), dtype=np.uint8),
           "text": CAPTIONS[i % len(CAPTIONS)]} for i in range(n)]


class Crashing:
  """A source whose record `crash_at` raises, like a job killed mid-shard."""

  def __init__(self, records, crash_at):
    self.records, self.crash_at = records, crash_at

  def __len__(self):
    return len(self.records)

  def __getitem__(self, i):
    if i == self.crash_at:
      raise KeyboardInterrupt("killed")
    return self.records[i]


@pytest.fixture(scope="module")
def parts(tmp_path_factory):
  config = configs.load("tiny")
  text = TextTokenizer.train(CAPTIONS * 20, vocab_size=300)
  image = vq.ImageTokenizer(vq.VQModel(config.vq, rngs=nnx.Rngs(0)))
  return config, image, text, Vocab.from_config(config)


def _encode(parts, source, output, **kwargs):
  _, image, text, vocab = parts
  return encode.encode_dataset(source, image, text, vocab, str(output), {"test": 1},
                               batch_size=4, **kwargs)


def _read(directory):
  return [records.decode_tokens(r) for path in records.shard_paths(directory)
          for r in _array_records(path)]


def _array_records(path):
  from array_record.python import array_record_module
  reader = array_record_module.ArrayRecordReader(path)
  out = reader.read_all()
  reader.close()
  return out


def _files(directory):
  return {name: open(os.path.join(directory, name), "rb").read()
          for name in sorted(os.listdir(directory))}


def test_each_pair_becomes_caption_then_image_document(parts, tmp_path):
  _, image, text, vocab = parts
  source = make_source(10)
  assert _encode(parts, source, tmp_path / "tok", shard_size=4) == 10
  docs = _read(tmp_path / "tok")
  assert [doc_id for doc_id, _ in docs] == list(range(10))  # doc id == record index
  codes = image.encode(np.stack([r["image"] for r in source]))
  for i, (_, ids) in enumerate(docs):
    want = [TextSegment(text.encode(source[i]["text"])), ImageSegment(codes[i])]
    assert vocab.ids_to_documents(np.concatenate([[vocab.eos_id], ids]))[0] == want
  meta = records.read_meta(tmp_path / "tok")
  assert meta["num_records"] == 10 and len(records.shard_paths(tmp_path / "tok")) == 3
  assert not os.path.exists(f"{tmp_path / 'tok'}.partial")


def test_resume_after_a_crash_equals_an_uninterrupted_run(parts, tmp_path):
  source = make_source(10)
  _encode(parts, source, tmp_path / "whole", shard_size=4)
  with pytest.raises(KeyboardInterrupt):
    _encode(parts, Crashing(source, crash_at=9), tmp_path / "resumed", shard_size=4)
  partial = f"{tmp_path / 'resumed'}.partial"
  assert sorted(os.listdir(partial)) == ["job.json", records.shard_name(0),
                                         records.shard_name(1)]  # no half shard
  assert not os.path.exists(tmp_path / "resumed")
  written = []
  _encode(parts, source, tmp_path / "resumed", shard_size=4, on_shard=written.append)
  assert written == [2]  # shards 0 and 1 were skipped
  assert _files(tmp_path / "resumed") == _files(tmp_path / "whole")


def test_shards_of_other_inputs_are_discarded(parts, tmp_path):
  source = make_source(10)
  with pytest.raises(KeyboardInterrupt):
    _encode(parts, Crashing(source, crash_at=5), tmp_path / "tok", shard_size=4)
  written = []
  _encode(parts, source, tmp_path / "tok", shard_size=5, on_shard=written.append)
  assert written == [0, 1]  # another shard size: start over
  assert [d for d, _ in _read(tmp_path / "tok")] == list(range(10))


def test_a_finished_encode_is_not_redone(parts, tmp_path):
  source = make_source(4)
  _encode(parts, source, tmp_path / "tok")
  written = []
  _encode(parts, source, tmp_path / "tok", on_shard=written.append)
  assert written == []


def test_bad_arguments(parts, tmp_path):
  with pytest.raises(InputError, match="no records"):
    _encode(parts, [], tmp_path / "tok")
  with pytest.raises(InputError, match="--shard-size=0"):
    _encode(parts, make_source(2), tmp_path / "tok", shard_size=0)
  bad = [{"image": np.zeros((8, 8, 3), np.uint8), "text": "x"}]
  with pytest.raises(InputError, match=r"shape \(1, 8, 8, 3\)"):
    _encode(parts, bad, tmp_path / "tok")


def test_cli_without_a_vq_checkpoint_prints_one_error(tmp_path, capsys):
  TextTokenizer.train(CAPTIONS * 20, vocab_size=300).save(str(tmp_path / "t.json"))
  status = cli.main(["encode", "--config", "tiny", f"--config.workdir={tmp_path}",
                     "--text-tokenizer", str(tmp_path / "t.json")])
  assert status == cli.EXIT_INPUT_ERROR
  assert "run `cm3leon train-vq` first" in capsys.readouterr().err


# The killed job runs encode_dataset in a child process over a source that slows down after
# the first shard, so the parent can SIGKILL it mid-run; the rerun must finish the job exactly.
_CHILD = textwrap.dedent("""
    import sys, time
    sys.path.insert(0, {test_dir!r})
    from flax import nnx
    from cm3leon_jax import configs
    from cm3leon_jax.tokenizers import encode, vq
    from cm3leon_jax.tokenizers.text import TextTokenizer
    from cm3leon_jax.tokenizers.vocab import Vocab
    import test_encode as t

    class Slow(list):
      def __getitem__(self, i):
        if i >= 8:
          time.sleep(0.2)
        return list.__getitem__(self, i)

    config = configs.load("tiny")
    image = vq.ImageTokenizer(vq.VQModel(config.vq, rngs=nnx.Rngs(0)))
    text = TextTokenizer.train(t.CAPTIONS * 20, vocab_size=300)
    slow = {slow}
    source = Slow(t.make_source(40)) if slow else t.make_source(40)
    encode.encode_dataset(source, image, text, Vocab.from_config(config), {output!r},
                          {{"test": 1}}, batch_size=4, shard_size=8)
""")


@pytest.mark.slow
def test_resume_after_sigkill_equals_an_uninterrupted_run(tmp_path):
  def child(output, slow):
    code = _CHILD.format(test_dir=os.path.dirname(__file__), output=str(output), slow=slow)
    return subprocess.Popen([sys.executable, "-c", code], env={**os.environ, "PYTHONPATH": os.getcwd()})

  assert child(tmp_path / "whole", slow=False).wait(timeout=300) == 0
  proc = child(tmp_path / "killed", slow=True)
  first = os.path.join(f"{tmp_path / 'killed'}.partial", records.shard_name(0))
  deadline = time.time() + 300
  while not os.path.exists(first) and time.time() < deadline:
    time.sleep(0.05)
  proc.send_signal(signal.SIGKILL)
  proc.wait()
  assert not os.path.exists(tmp_path / "killed")  # killed before it finished
  assert child(tmp_path / "killed", slow=False).wait(timeout=300) == 0
  assert _files(tmp_path / "killed") == _files(tmp_path / "whole")


def test_a_text_tokenizer_larger_than_the_vocabularys_text_range_is_refused(tmp_path):
  from cm3leon_jax import configs
  from cm3leon_jax.data import shapes
  from cm3leon_jax.errors import InputError
  from cm3leon_jax.tokenizers.encode import load_text_tokenizer
  from cm3leon_jax.tokenizers.text import TextTokenizer
  texts = [shapes.caption(shapes.scene_at(0, i, "train"), i) for i in range(200)]
  path = str(tmp_path / "text_tokenizer.json")
  TextTokenizer.train(texts, 384, min_frequency=1).save(path)
  size = TextTokenizer.load(path).vocab_size
  assert load_text_tokenizer(path, configs.load("tiny")).vocab_size == size  # 384 ids fit
  with pytest.raises(InputError, match=f"{size} text ids do not fit --config.vocab.text_size=300"):
    load_text_tokenizer(path, configs.load("tiny", ["vocab.text_size=300"]))

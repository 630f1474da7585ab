"""`cm3leon encode`: an image-text dataset -> token documents (records.py), offline and resumable.

    python -m cm3leon_jax encode --config quickstart [--split train]

Each caption-image record i becomes document i: `[TextSegment(caption), ImageSegment(codes)]`
(captions by the text tokenizer, images by the VQ tokenizer, global ids from vocab.py), written
to artifacts(config).tokens (other splits: `<tokens>-<split>`, as pipeline.default_tasks reads).

Resumable: records are written in fixed-size shards (shard s holds documents
[s * shard_size, (s + 1) * shard_size)), each one atomically into `<output>.partial/`. A rerun
after a kill skips the shards already there, so the result has no duplicates and no gaps and
is byte-identical to an uninterrupted run (batches never straddle a shard, so every batch is
the same in both runs). meta.json and the rename to `<output>` come last; `job.json` in the
work directory holds what the shards depend on, and a rerun with different inputs starts over.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import sys
from typing import Callable

import grain
import numpy as np
from tqdm import tqdm

from cm3leon_jax.data import records
from cm3leon_jax.errors import InputError
from cm3leon_jax.paths import artifacts
from cm3leon_jax.tokenizers.text import TextTokenizer
from cm3leon_jax.tokenizers.vocab import ImageSegment, TextSegment, Vocab
from cm3leon_jax.tokenizers.vq import ImageTokenizer

JOB_FILE = "job.json"


def add_arguments(p: argparse.ArgumentParser) -> None:
  p.add_argument("--split", default="train", help="dataset split to encode (default: train)")
  p.add_argument("--output", default=None,
                 help="record directory (default: <workdir>/tokens, or tokens-<split>)")
  p.add_argument("--vq", default=None, help="VQ checkpoint directory (default: <workdir>/vq)")
  p.add_argument("--text-tokenizer", default=None,
                 help="text tokenizer JSON (default: <workdir>/text_tokenizer.json)")
  p.add_argument("--batch-size", type=int, default=256, help="images per jitted call")
  p.add_argument("--shard-size", type=int, default=4096, help="documents per shard")


def tokens_dir(config, split: str) -> str:
  base = artifacts(config).tokens
  return base if split == "train" else f"{base}-{split}"


def document_record(doc_id: int, caption_tokens: np.ndarray, codes_N: np.ndarray,
                    vocab: Vocab) -> bytes:
  """One caption-image pair as a token-document record (an empty caption: image only)."""
  doc = ([TextSegment(caption_tokens)] if len(caption_tokens) else []) + [ImageSegment(codes_N)]
  return records.encode_tokens(doc_id, vocab.document_to_ids(doc))


def _batches(source, start: int, stop: int, batch_size: int):
  """Records [start, stop) in batches (lists of dicts), read ahead by Grain threads."""
  ds = grain.MapDataset.source(source)[start:stop].batch(batch_size, batch_fn=list)
  return ds.to_iter_dataset(grain.ReadOptions(num_threads=2, prefetch_buffer_size=2))


def encode_dataset(source, image_tokenizer: ImageTokenizer, text_tokenizer: TextTokenizer,
                   vocab: Vocab, output: str, job: dict, batch_size: int = 64,
                   shard_size: int = 4096, progress: bool = False,
                   on_shard: Callable[[int], None] | None = None, write: bool = True) -> int:
  """Encode `source` (records with 'image' uint8 [S, S, 3] and 'text') into `output`.

  `job` describes the inputs (checkpoint, tokenizer, dataset); shards written under another
  job description are discarded. `on_shard(s)` runs after shard s is written (progress hooks).
  Multi-process: every process runs this over the same batches (the jitted encode is a
  collective) on a shared filesystem; only the one with `write=True` writes.
  Returns the number of documents.
  """
  if batch_size < 1 or shard_size < 1:
    raise InputError(f"encode: --batch-size={batch_size} and --shard-size={shard_size} must be "
                     f">= 1")
  n = len(source)
  if n == 0:
    raise InputError(f"encode: {source!r} has no records")
  job = {**job, "num_records": n, "shard_size": shard_size, "vocab_size": vocab.size}
  if os.path.isfile(os.path.join(output, records.META)):
    if records.read_meta(output).get("job") == job:
      return n  # already encoded with exactly these inputs
  work = output.rstrip("/") + ".partial"
  if write:
    _open_work_dir(work, job)
  num_shards = -(-n // shard_size)
  done = {s for s in range(num_shards) if os.path.exists(os.path.join(work, records.shard_name(s)))}
  bar = tqdm(total=n, initial=sum(min(shard_size, n - s * shard_size) for s in done),
             desc=f"encode {os.path.basename(output)}", unit="doc", disable=not progress,
             file=sys.stderr)
  for s in range(num_shards):
    if s in done:
      continue
    start, stop = s * shard_size, min(n, (s + 1) * shard_size)
    shard = []
    for batch in _batches(source, start, stop, batch_size):
      images = np.stack([np.asarray(r["image"]) for r in batch])
      codes_BN = image_tokenizer.encode(images)
      texts = text_tokenizer.encode_batch([str(r["text"]) for r in batch])
      for tokens, codes in zip(texts, codes_BN):
        shard.append(document_record(start + len(shard), tokens, codes, vocab))
      bar.update(len(batch))
    if write:
      records.write_shard(os.path.join(work, records.shard_name(s)), shard)
    if on_shard is not None:
      on_shard(s)
  bar.close()
  meta = {"kind": "tokens", "vocab_size": vocab.size, "image_tokens": image_tokenizer.num_codes,
          "job": job}
  if write:
    records.finish_shards(work, output, meta, n)
  return n


def _open_work_dir(work: str, job: dict) -> None:
  """Keep a work directory of earlier shards only if they were made from the same inputs."""
  job_path = os.path.join(work, JOB_FILE)
  if os.path.isdir(work):
    try:
      with open(job_path) as f:
        same = json.load(f) == job
    except (OSError, ValueError):
      same = False
    if not same:  # shards of other inputs: never mix them with these
      shutil.rmtree(work)
  if not os.path.isdir(work):
    os.makedirs(work)
    with open(job_path + ".tmp", "w") as f:
      json.dump(job, f, indent=1)
    os.replace(job_path + ".tmp", job_path)


def fingerprint(path: str) -> str:
  """A short content hash of a file (what a job's outputs depend on)."""
  h = hashlib.sha256()
  with open(path, "rb") as f:
    for chunk in iter(lambda: f.read(1 << 20), b""):
      h.update(chunk)
  return h.hexdigest()[:16]


def load_text_tokenizer(path: str, config) -> TextTokenizer:
  """The text tokenizer at `path`, checked to fit the vocabulary's text range."""
  text_tokenizer = TextTokenizer.load(path)
  text_size = Vocab.from_config(config).text_size
  if text_tokenizer.vocab_size > text_size:
    raise InputError(f"{path}: {text_tokenizer.vocab_size} text ids do not fit "
                     f"--config.vocab.text_size={text_size}")
  return text_tokenizer


def run(args, config) -> int:
  import jax
  from cm3leon_jax.data import sources
  paths = artifacts(config)
  vq_dir = os.path.abspath(args.vq or paths.vq)
  text_path = args.text_tokenizer or paths.text_tokenizer
  output = args.output or tokens_dir(config, args.split)
  text_tokenizer = load_text_tokenizer(text_path, config)
  vocab = Vocab.from_config(config)
  image_tokenizer = ImageTokenizer.load(config, vq_dir)
  source = sources.image_text_source(config, args.split)
  job = {"dataset": source.name, "split": args.split, "vq": vq_dir,
         "vq_step": image_tokenizer.checkpoint_step,
         "text_tokenizer": fingerprint(text_path), "image_size": int(config.vq.image_size)}
  n = encode_dataset(source, image_tokenizer, text_tokenizer, vocab, output, job,
                     batch_size=args.batch_size,
                     shard_size=args.shard_size,
                     progress=sys.stderr.isatty() and jax.process_index() == 0,
                     write=jax.process_index() == 0)
  print(f"encode: {n} documents ({args.split}) -> {output}")
  return 0

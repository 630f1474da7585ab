"""`cm3leon train-text-tokenizer`: train the text tokenizer on text files or a TFDS dataset."""

from __future__ import annotations

import argparse
import json
import os
import sys
from typing import Iterator, Sequence

from cm3leon_jax.errors import InputError
from cm3leon_jax.paths import artifacts
from cm3leon_jax.tokenizers.text import TextTokenizer


def add_arguments(p: argparse.ArgumentParser) -> None:
  source = p.add_mutually_exclusive_group()
  source.add_argument("--input", nargs="+", metavar="FILE",
                      help="text files (one document per line) or .jsonl files with a 'text' "
                           "field")
  source.add_argument("--split", default="train",
                      help="without --input: the captions of this split of the built dataset "
                           "(config.data.dataset; default train)")
  p.add_argument("--output", default=None,
                 help="tokenizer JSON path (default: <workdir>/text_tokenizer.json)")


def iter_texts(paths: Sequence[str]) -> Iterator[str]:
  """Lines of text files, or the 'text' field of JSONL records; bad input is an InputError."""
  for path in paths:
    if not os.path.isfile(path):
      raise InputError(f"{path}: input file not found")
    with open(path, encoding="utf-8", errors="strict") as f:
      try:
        for line_no, line in enumerate(f, 1):
          if not path.endswith(".jsonl"):
            yield line.rstrip("\n")
            continue
          if not line.strip():
            continue
          try:
            record = json.loads(line)
          except json.JSONDecodeError as e:
            raise InputError(f"{path}:{line_no}: malformed JSON ({e.msg})") from None
          if not isinstance(record, dict) or not isinstance(record.get("text"), str):
            raise InputError(f"{path}:{line_no}: expected an object with a string 'text'")
          yield record["text"]
      except UnicodeDecodeError as e:
        raise InputError(f"{path}: not UTF-8 text ({e.reason} at byte {e.start})") from None


def dataset_texts(config, split: str) -> Iterator[str]:
  """The captions of a built dataset split (what `cm3leon data build` wrote)."""
  from cm3leon_jax.data.sources import image_text_source
  source = image_text_source(config, split)
  for i in range(len(source)):
    yield source[i]["text"]


def run(args, config) -> int:
  output = args.output or artifacts(config).text_tokenizer
  texts = iter_texts(args.input) if args.input else dataset_texts(config, args.split)
  tokenizer = TextTokenizer.train(
      texts, vocab_size=config.vocab.text_size,
      normalization=config.text_tokenizer.normalization,
      min_frequency=config.text_tokenizer.min_frequency, show_progress=sys.stderr.isatty())
  tokenizer.save(output)
  print(f"text tokenizer: {tokenizer.vocab_size} ids (limit {config.vocab.text_size}) -> {output}")
  return 0

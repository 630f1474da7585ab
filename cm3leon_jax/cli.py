"""The `cm3leon` command line: one subcommand per arrow of DESIGN.md's data flow.

    cm3leon <command> [--config PRESET] [--config.section.field=value ...] [options]

Every command takes a preset (`--config quickstart`, default) and overrides. Bad input
(missing files, config typos) prints one `error:` line and exits with status 2. Commands
whose issue has not landed yet say so and exit with status 3.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from typing import Callable, Sequence

from cm3leon_jax import configs
from cm3leon_jax.errors import InputError
from cm3leon_jax.paths import artifacts

EXIT_INPUT_ERROR = 2
EXIT_NOT_BUILT = 3

# name -> (one-line help, issue that builds it or None when built). Order follows the data flow.
COMMANDS = {
    "data": ("build a TFDS dataset (shapes | coco_captions | image_text_folder)", 3),
    "train-text-tokenizer": ("train the byte-level BPE text tokenizer", None),
    "train-vq": ("train the VQ image tokenizer", 4),
    "encode": ("turn an image-text dataset into token documents", 4),
    "train-retriever": ("train the CLIP-style dual encoder", 5),
    "index": ("build the ScaNN index over the memory bank", 5),
    "retrieve": ("compute static neighbours for every training document", 5),
    "train": ("pretrain the decoder on retrieval-augmented CM3 batches", 7),
    "sft": ("instruction-tune the decoder on the Shapes task mixture", "SFT (not filed yet)"),
    "generate": ("sample text and images (CFG, CD-K, retrieval, re-ranking)", 8),
    "eval": ("run an evaluation suite on a checkpoint", 9),
    "export": ("export an inference bundle", "export (not filed yet)"),
    "quickstart": ("the whole recipe end to end on Shapes (the main job)", 9),
}


def _add_config_arg(parser: argparse.ArgumentParser) -> None:
  parser.add_argument(
      "--config", default="quickstart",
      help=f"preset ({', '.join(configs.PRESETS)}) or a .py file with get_config(); "
           "override fields with --config.section.field=value")


def build_parser() -> argparse.ArgumentParser:
  parser = argparse.ArgumentParser(
      prog="cm3leon", description="CM3Leon in JAX: retrieval-augmented multimodal decoder.",
      epilog="Config overrides: --config.model.num_layers=4 (any field of the preset).")
  sub = parser.add_subparsers(dest="command", metavar="command")
  for name, (help_text, issue) in COMMANDS.items():
    suffix = "" if issue is None else f" [not built yet: issue {issue}]"
    p = sub.add_parser(name, help=help_text + suffix, description=help_text + suffix)
    _add_config_arg(p)
    add = _ARGUMENTS.get(name)
    if add:
      add(p)
  return parser


# --- train-text-tokenizer -------------------------------------------------------------------
def _args_train_text_tokenizer(p: argparse.ArgumentParser) -> None:
  p.add_argument("--input", nargs="+", required=True, metavar="FILE",
                 help="text files (one document per line) or .jsonl files with a 'text' field")
  p.add_argument("--output", default=None,
                 help="tokenizer JSON path (default: <workdir>/text_tokenizer.json)")


def _iter_texts(paths: Sequence[str]):
  for path in paths:
    if not os.path.isfile(path):
      raise InputError(f"{path}: input file not found")
    with open(path, encoding="utf-8", errors="strict") as f:
      try:
        for line_no, line in enumerate(f, 1):
          if path.endswith(".jsonl"):
            if not line.strip():
              continue
            try:
              record = json.loads(line)
            except json.JSONDecodeError as e:
              raise InputError(f"{path}:{line_no}: malformed JSON ({e.msg})") from None
            if not isinstance(record, dict) or not isinstance(record.get("text"), str):
              raise InputError(f"{path}:{line_no}: expected an object with a string 'text'")
            yield record["text"]
          else:
            yield line.rstrip("\n")
      except UnicodeDecodeError as e:
        raise InputError(f"{path}: not UTF-8 text ({e.reason} at byte {e.start})") from None


def _run_train_text_tokenizer(args, config) -> int:
  from cm3leon_jax.tokenizers.text import TextTokenizer
  output = args.output or artifacts(config).text_tokenizer
  tokenizer = TextTokenizer.train(
      _iter_texts(args.input), vocab_size=config.vocab.text_size,
      normalization=config.text_tokenizer.normalization,
      min_frequency=config.text_tokenizer.min_frequency, show_progress=sys.stderr.isatty())
  tokenizer.save(output)
  print(f"text tokenizer: {tokenizer.vocab_size} ids (limit {config.vocab.text_size}) -> {output}")
  return 0


_ARGUMENTS: dict[str, Callable[[argparse.ArgumentParser], None]] = {
    "train-text-tokenizer": _args_train_text_tokenizer,
}
_RUNNERS: dict[str, Callable] = {
    "train-text-tokenizer": _run_train_text_tokenizer,
}


def main(argv: Sequence[str] | None = None) -> int:
  argv = list(sys.argv[1:] if argv is None else argv)
  parser = build_parser()
  # --config.a.b=value overrides are not argparse options: pull them out first.
  overrides, rest = [], []
  i = 0
  while i < len(argv):
    arg = argv[i]
    if arg.startswith("--config."):
      if "=" not in arg and i + 1 < len(argv):
        arg = f"{arg}={argv[i + 1]}"
        i += 1
      overrides.append(arg)
    else:
      rest.append(arg)
    i += 1
  args = parser.parse_args(rest)
  if not args.command:
    parser.print_help()
    return EXIT_INPUT_ERROR
  _, issue = COMMANDS[args.command]
  try:
    config = configs.load(args.config, overrides)
    if issue is not None:
      print(f"cm3leon {args.command}: not built yet (issue {issue}); see `issues show` for "
            "its status.", file=sys.stderr)
      return EXIT_NOT_BUILT
    return _RUNNERS[args.command](args, config)
  except InputError as e:
    print(f"error: {e}", file=sys.stderr)
    return EXIT_INPUT_ERROR

"""The `cm3leon` command line: one subcommand per arrow of DESIGN.md's data flow.

    cm3leon <command> [--config PRESET] [--config.section.field=value ...] [options]

Every command takes a preset (`--config quickstart`, default) and overrides. Bad input
(missing files, config typos) prints one `error:` line and exits with status 2. Commands
whose issue has not landed yet say so and exit with status 3.
"""

from __future__ import annotations

import argparse
import importlib
import sys
from typing import Sequence

from cm3leon_jax import configs, hugepages
from cm3leon_jax.errors import InputError

EXIT_INPUT_ERROR = 2
EXIT_NOT_BUILT = 3

# name -> (one-line help, where it lives). "where" is the module that implements the command
# (it defines add_arguments(parser) and run(args, config) -> exit status), or, while the
# command's issue has not landed, the issue that builds it. Order follows the data flow.
COMMANDS = {
    "data": ("build a TFDS dataset (shapes | coco_captions | image_text_folder)",
             "cm3leon_jax.data.build"),
    "train-text-tokenizer": ("train the byte-level BPE text tokenizer",
                             "cm3leon_jax.tokenizers.train_text"),
    "train-vq": ("train the VQ image tokenizer", "cm3leon_jax.tokenizers.vq_train"),
    "encode": ("turn an image-text dataset into token documents", "cm3leon_jax.tokenizers.encode"),
    "train-retriever": ("train the CLIP-style dual encoder",
                        "cm3leon_jax.retrieval.train_encoder"),
    "index": ("build the ScaNN index over the memory bank", "cm3leon_jax.retrieval.build_index"),
    "retrieve": ("compute static neighbours for every training document",
                 "cm3leon_jax.retrieval.retrieve"),
    "train": ("pretrain the decoder on retrieval-augmented CM3 batches",
              "cm3leon_jax.train.train_cli"),
    "sft": ("instruction-tune the decoder on the Shapes task mixture", "cm3leon_jax.train.sft"),
    "generate": ("sample text and images (CFG, CD-K, retrieval, re-ranking)",
                 "cm3leon_jax.decode.generate_cli"),
    "eval": ("run an evaluation suite on a checkpoint", "cm3leon_jax.eval.eval_cli"),
    "export": ("export an inference bundle (decoder parameters, tokenizers, retriever)",
               "cm3leon_jax.export"),
    "quickstart": ("the whole recipe end to end on Shapes (the main job)",
                   "cm3leon_jax.quickstart"),
}


def _is_built(where: str) -> bool:
  return where.startswith("cm3leon_jax.")


def _add_config_arg(parser: argparse.ArgumentParser) -> None:
  parser.add_argument(
      "--config", default="quickstart",
      help=f"preset ({', '.join(configs.PRESETS)}) or a .py file with get_config(); "
           "override fields with --config.section.field=value")


def build_parser(command: str | None = None) -> argparse.ArgumentParser:
  """The full parser; only `command`'s module is imported (so `--help` stays fast)."""
  parser = argparse.ArgumentParser(
      prog="cm3leon", description="CM3Leon in JAX: retrieval-augmented multimodal decoder.",
      epilog="Config overrides: --config.model.num_layers=4 (any field of the preset).")
  sub = parser.add_subparsers(dest="command", metavar="command")
  for name, (help_text, where) in COMMANDS.items():
    suffix = "" if _is_built(where) else f" [not built yet: {where}]"
    p = sub.add_parser(name, help=help_text + suffix, description=help_text + suffix)
    _add_config_arg(p)
    if name == command and _is_built(where):
      importlib.import_module(where).add_arguments(p)
  return parser


def _split_overrides(argv: Sequence[str]) -> tuple[list[str], list[str]]:
  """Pull `--config.a.b=value` (or `--config.a.b value`) out of argv: they are not options."""
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
  return overrides, rest


def main(argv: Sequence[str] | None = None) -> int:
  if argv is None:  # the real command line, not a test calling main([...])
    hugepages.reexec_with_hugepages()  # returns where it cannot help; see hugepages.py
  argv = list(sys.argv[1:] if argv is None else argv)
  overrides, rest = _split_overrides(argv)
  command = next((a for a in rest if a in COMMANDS), None)
  args = build_parser(command).parse_args(rest)
  if not args.command:
    build_parser().print_help()
    return EXIT_INPUT_ERROR
  _, where = COMMANDS[args.command]
  try:
    config = configs.load(args.config, overrides)
    if not _is_built(where):
      print(f"cm3leon {args.command}: not built yet ({where}); `issues show` tells its status.",
            file=sys.stderr)
      return EXIT_NOT_BUILT
    args.overrides = overrides  # for commands that run other commands (quickstart)
    return int(importlib.import_module(where).run(args, config) or 0)
  except InputError as e:
    print(f"error: {e}", file=sys.stderr)
    return EXIT_INPUT_ERROR

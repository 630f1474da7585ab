"""`cm3leon eval`: run a named evaluation suite on the latest decoder checkpoint.

    cm3leon eval --suite quickstart                 # writes report.md, metrics.json,
                                                    # samples.png, infill.png into the workdir
    cm3leon eval --suite captioning --config.eval.num_captions=500
    cm3leon eval --bundle outputs/quickstart/export --config.data.data_dir=outputs/quickstart/data

Suites and what they measure: cm3leon_jax/eval/suite.py. Counts come from `config.eval`.
The quickstart suite writes into `config.workdir` (where `cm3leon quickstart` looks for its
report); the others into `<workdir>/eval/<suite>` unless `--output` says otherwise. With
`--bundle` (a `cm3leon export` bundle) the decoder and tokenizers come from the bundle, the
dataset from `--config.data.data_dir`, and the report goes to `--output` (default
`eval/<suite>` in the current directory, never into the bundle).
"""

from __future__ import annotations

import argparse
import os
import sys
import time

from cm3leon_jax.errors import InputError
from cm3leon_jax.paths import artifacts


def add_arguments(p: argparse.ArgumentParser) -> None:
  from cm3leon_jax.eval.suite import SUITES
  p.add_argument("--suite", default="quickstart", help=f"one of: {', '.join(SUITES)}")
  p.add_argument("--output", default=None,
                 help="output folder (default: the workdir for quickstart, else "
                      "<workdir>/eval/<suite>; with --decoder <workdir>/eval/<suite>-<run>)")
  p.add_argument("--step", type=int, default=None,
                 help="decoder checkpoint step (default: the latest)")
  p.add_argument("--decoder", default=None, metavar="DIR",
                 help="the run directory of the decoder (default: <workdir>/decoder; "
                      "<workdir>/sft is the instruction-tuned one of `cm3leon sft`)")
  p.add_argument("--bundle", default=None, metavar="DIR",
                 help="evaluate a `cm3leon export` bundle (its config; the dataset from "
                      "--config.data.data_dir)")


def output_dir(config, suite: str, output: str | None, decoder: str | None = None) -> str:
  """--output, else the workdir (quickstart suite) or <workdir>/eval/<suite>; another decoder
  run (--decoder) gets <workdir>/eval/<suite>-<run name>, so it never overwrites the
  pretrained decoder's report."""
  if output:
    return output
  if decoder:
    name = os.path.basename(os.path.normpath(decoder))
    return os.path.join(artifacts(config).eval, f"{suite}-{name}")
  return config.workdir if suite == "quickstart" else os.path.join(artifacts(config).eval, suite)


def load_embedder(config, generator):
  """The dual encoder: the retriever's, else a trained one on disk, else None."""
  if generator.retriever is not None:
    return generator.retriever.embedder
  if os.path.isdir(artifacts(config).retriever):
    from cm3leon_jax.retrieval.encoder import Embedder
    return Embedder.load(config)
  return None


def run(args, config) -> int:
  from cm3leon_jax import export
  from cm3leon_jax.decode.api import Generator
  from cm3leon_jax.eval import report
  from cm3leon_jax.eval.features import feature_extractor
  from cm3leon_jax.eval.suite import SUITES, run_suite

  if args.suite not in SUITES:
    raise InputError(f"--suite {args.suite}: unknown suite (choose from {', '.join(SUITES)})")
  config = export.cli_config(args, config)
  if args.bundle:
    if not os.path.isdir(artifacts(config).data_dir):
      raise InputError(f"{artifacts(config).data_dir}: no dataset; a bundle holds none: pass "
                       "--config.data.data_dir=<the built dataset's directory>")
    out_dir = args.output or os.path.join("eval", args.suite)
  else:
    out_dir = output_dir(config, args.suite, args.output, args.decoder)
  start = time.time()
  generator = (Generator.load_bundle(config) if args.bundle
               else Generator.load(config, step=args.step, decoder_dir=args.decoder))
  embedder = load_embedder(config, generator)
  if "text_to_image" in SUITES[args.suite]:
    feature_extractor(config, embedder)  # a bad fid_features fails before any decoding
  loaded = time.time() - start
  log = lambda line: print(line, file=sys.stderr, flush=True)
  log(f"eval {args.suite}: loaded the decoder, tokenizers and retriever in {loaded:.1f} s")
  metrics, figures = run_suite(args.suite, config, generator, embedder, log=log)
  metrics["seconds"] = {"load": loaded, **metrics["seconds"]}
  if not args.bundle:  # a run whose length was fitted to a time budget says so in the report
    from cm3leon_jax.train import time_budget
    fitted = time_budget.load(args.decoder or artifacts(config).decoder)
    if fitted is not None:
      metrics["time_budget"] = fitted
  written = report.write(out_dir, metrics, figures, report.quickstart_seconds(config.workdir))
  for line in report.markdown(metrics).splitlines():
    if line.startswith("Headline: "):
      print(line[len("Headline: "):])
  print(f"eval {args.suite}: wrote {', '.join(written)}")
  return 0

"""`cm3leon export`: a training workdir -> a self-contained inference bundle.

    cm3leon export --config quickstart                       # -> outputs/quickstart/export
    cm3leon export --config quickstart --dtype bfloat16 --out /tmp/bundle
    cm3leon generate --bundle /tmp/bundle --prompt "a small red circle at the top left"
    cm3leon export --check /tmp/bundle                       # verify every file's checksum

    gen = Generator.from_bundle("/tmp/bundle")               # Python (decode/api.py)

A bundle is everything inference reads and nothing else, laid out like a workdir so the
loaders of every part work on it unchanged:

    bundle.json          format, versions, source, steps, dtype, parameter count, and every
                         file below with its size and SHA-256
    config.json          the full config the parts were built with (`model.param_dtype` = the
                         exported dtype)
    decoder/             the decoder's parameters only (Orbax; no optimizer moments, no data
                         iterator: a third of a train checkpoint at AdamW), cast to `--dtype`
                         while they are read
    text_tokenizer.json  the BPE tokenizer
    vq/                  the VQ tokenizer's latest checkpoint (its model item) + vq_config.json
    retriever/           the dual encoder's latest checkpoint (its model item): prompt
                         retrieval and candidate re-ranking
    index/, tokens/      the ScaNN memory-bank index and the bank's token documents

`--no-retrieval` leaves out retriever/, index/ and tokens/ (and sets retrieval.enabled =
False in the bundle's config: no retrieval, no re-ranking). The bundle is written into a
temporary directory and renamed when complete, so an interrupted export leaves no half
bundle; an existing one is replaced only with `--overwrite`. Loading checks the format and
every file's size (a missing or truncated file is one error naming it); `--check` also
compares the checksums. Multi-process: every process reads and writes its shards of the
parameters (Orbax); process 0 writes the rest and renames.
"""

from __future__ import annotations

import argparse
import datetime
import hashlib
import json
import os
import shutil

import jax
import ml_collections
import numpy as np

from cm3leon_jax.errors import InputError
from cm3leon_jax.paths import artifacts

FORMAT = "cm3leon_jax.bundle/1"
MANIFEST = "bundle.json"
CONFIG = "config.json"
DECODER = "decoder"
DTYPES = ("float32", "bfloat16")
# Files of an Orbax step directory that its CheckpointManager needs besides the items.
_STEP_FILES = ("_CHECKPOINT_METADATA", "commit_success.txt")


def add_arguments(p: argparse.ArgumentParser) -> None:
  p.add_argument("--out", default=None, metavar="DIR",
                 help="the bundle's directory (default: <workdir>/export)")
  p.add_argument("--decoder", default=None, metavar="DIR",
                 help="the decoder's run directory (default: <workdir>/decoder; <workdir>/sft "
                      "exports the instruction-tuned one)")
  p.add_argument("--step", type=int, default=None, help="decoder checkpoint step (default: latest)")
  p.add_argument("--dtype", default=None, choices=DTYPES,
                 help="parameter dtype of the bundle (default: model.param_dtype)")
  p.add_argument("--no-retrieval", action="store_true",
                 help="leave out the dual encoder, index and memory bank (no retrieval, no "
                      "re-ranking at inference)")
  p.add_argument("--overwrite", action="store_true", help="replace an existing bundle at --out")
  p.add_argument("--check", default=None, metavar="BUNDLE",
                 help="verify an existing bundle (sizes and SHA-256 of every file) and exit")
  p.add_argument("--coordinator", default=None, metavar="HOST:PORT",
                 help="jax.distributed coordinator (with --num-processes/--process-id): every "
                      "process of a multi-host job runs export; each reads and writes its shards")
  p.add_argument("--num-processes", type=int, default=None)
  p.add_argument("--process-id", type=int, default=None)


def run(args, config) -> int:
  if args.check:
    manifest = verify(args.check, checksums=True)
    print(f"export --check: {args.check}: {len(manifest['files'])} files, sizes and SHA-256 "
          f"match ({manifest['format']}, decoder step {manifest['decoder']['step']}, "
          f"{manifest['decoder']['dtype']})")
    return 0
  from cm3leon_jax.train.trainer import maybe_initialize_distributed
  if args.num_processes is not None and args.num_processes > 1 and (
      args.process_id is None or args.coordinator is None):
    raise InputError("--num-processes > 1 needs --process-id and --coordinator")
  maybe_initialize_distributed(args.coordinator, args.num_processes, args.process_id)
  out = args.out or os.path.join(config.workdir, "export")
  manifest = export(config, out, decoder_dir=args.decoder, step=args.step, dtype=args.dtype,
                    retrieval=not args.no_retrieval, overwrite=args.overwrite)
  if jax.process_index() != 0:
    return 0
  size = sum(f["bytes"] for f in manifest["files"].values())
  print(f"export: decoder step {manifest['decoder']['step']} "
        f"({manifest['decoder']['num_params']:,} parameters, {manifest['decoder']['dtype']}), "
        f"{len(manifest['files'])} files, {size / 2**20:.1f} MiB -> {out}")
  print(f"  cm3leon generate --bundle {out} --prompt \"...\"")
  return 0


# --- export --------------------------------------------------------------------------------
def _latest_step_dir(directory: str, what: str, command: str) -> tuple[int, str]:
  steps = sorted(int(d) for d in os.listdir(directory) if d.isdigit()) \
      if os.path.isdir(directory) else []
  if not steps:
    raise InputError(f"{directory}: no {what} checkpoint; run `cm3leon {command}` first")
  return steps[-1], os.path.join(directory, str(steps[-1]))


def _copy_model_step(src_dir: str, dst_dir: str, what: str, command: str) -> int:
  """The latest step of an Orbax CheckpointManager directory, its model item only."""
  step, step_dir = _latest_step_dir(src_dir, what, command)
  if not os.path.isdir(os.path.join(step_dir, "model")):
    raise InputError(f"{step_dir}: no model item in this {what} checkpoint")
  target = os.path.join(dst_dir, str(step))
  shutil.copytree(os.path.join(step_dir, "model"), os.path.join(target, "model"))
  for name in _STEP_FILES:
    if os.path.isfile(os.path.join(step_dir, name)):
      shutil.copy2(os.path.join(step_dir, name), target)
  return step


def _require(path: str, what: str, command: str) -> str:
  if not os.path.exists(path):
    raise InputError(f"{path}: no {what}; run `cm3leon {command}` first")
  return path


def _file_table(root: str) -> dict:
  table = {}
  for dirpath, dirnames, filenames in os.walk(root):
    dirnames.sort()
    for name in sorted(filenames):
      path = os.path.join(dirpath, name)
      rel = os.path.relpath(path, root)
      if rel == MANIFEST:
        continue
      table[rel] = {"bytes": os.path.getsize(path), "sha256": _sha256(path)}
  return table


def _sha256(path: str) -> str:
  h = hashlib.sha256()
  with open(path, "rb") as f:
    for block in iter(lambda: f.read(1 << 22), b""):
      h.update(block)
  return h.hexdigest()


def bundle_config(config, dtype: str, retrieval: bool) -> ml_collections.ConfigDict:
  """The config a bundle is loaded with: the training config, params in `dtype`."""
  c = _from_json(config.to_json())
  c.model.param_dtype = dtype
  if not retrieval:
    c.retrieval.enabled = False
  return c


def export(config, out: str, *, decoder_dir: str | None = None, step: int | None = None,
           dtype: str | None = None, retrieval: bool | None = None,
           overwrite: bool = False) -> dict:
  """Write the bundle of `config`'s workdir into `out`; returns its manifest."""
  import orbax.checkpoint as ocp
  from flax import nnx
  from jax.experimental import multihost_utils

  from cm3leon_jax.train.checkpoint import Checkpointer, adopt_budget_depth
  from cm3leon_jax.train.mesh import make_mesh
  from cm3leon_jax.train.state import abstract_model

  dtype = dtype or str(config.model.param_dtype)
  if dtype not in DTYPES:
    raise InputError(f"--dtype={dtype}: choose from {', '.join(DTYPES)}")
  retrieval = bool(config.retrieval.enabled) if retrieval is None else retrieval
  paths = artifacts(config)
  out = os.path.abspath(out)
  run_dir = decoder_dir or paths.decoder
  ckpt_dir = os.path.join(run_dir, "checkpoints")
  # Every input is checked before anything is read or written.
  if os.path.exists(out) and not os.path.isdir(out):
    raise InputError(f"--out={out}: is a file, not a directory")
  if os.path.exists(out) and os.listdir(out) and not overwrite:
    raise InputError(f"{out}: exists and is not empty; pass --overwrite to replace it")
  if not os.path.isdir(ckpt_dir):
    raise InputError(f"{ckpt_dir}: no decoder checkpoints; run `cm3leon train` first")
  sources = [run_dir, paths.vq, paths.retriever, paths.index, paths.tokens]
  inside = lambda d: os.path.commonpath([out, os.path.abspath(d)]) == os.path.abspath(d)
  if out == os.path.abspath(paths.root) or any(inside(d) for d in sources):
    raise InputError(f"--out={out}: must not be the workdir or inside what is exported")
  _require(paths.text_tokenizer, "text tokenizer", "train-text-tokenizer")
  _require(os.path.join(paths.vq, "vq_config.json"), "VQ tokenizer", "train-vq")
  _latest_step_dir(paths.vq, "VQ tokenizer", "train-vq")
  if retrieval:
    _latest_step_dir(paths.retriever, "dual encoder", "train-retriever")
    _require(paths.index, "memory-bank index", "index")
    _require(paths.tokens, "token documents (the memory bank)", "encode")

  config = adopt_budget_depth(config, ckpt_dir, step)  # the bundle records the depth trained
  mesh = make_mesh(config.mesh)
  _, abstract = abstract_model(config, mesh)
  checkpointer = Checkpointer(ckpt_dir, config, async_save=False)
  try:
    step = checkpointer.latest_step() if step is None else step
    params = checkpointer.restore_params(abstract, step=step, dtype=jax.numpy.dtype(dtype))
  finally:
    checkpointer.close()
  num_params = int(sum(np.prod(x.shape) for x in jax.tree.leaves(params)))

  primary = jax.process_index() == 0
  tmp = f"{out.rstrip('/')}.tmp-export"
  if primary:
    shutil.rmtree(tmp, ignore_errors=True)
    os.makedirs(tmp)
  multihost_utils.sync_global_devices("cm3leon export: temp dir")
  try:
    with ocp.StandardCheckpointer() as saver:  # collective: each process writes its shards
      saver.save(os.path.join(tmp, DECODER), nnx.to_pure_dict(params))
      saver.wait_until_finished()
    del params
    multihost_utils.sync_global_devices("cm3leon export: decoder saved")
    if primary:
      manifest = _write_rest(config, tmp, paths, dtype, retrieval, run_dir, step, num_params)
      if os.path.exists(out):
        shutil.rmtree(out)
      os.replace(tmp, out)
  except BaseException:
    if primary:
      shutil.rmtree(tmp, ignore_errors=True)
    raise
  multihost_utils.sync_global_devices("cm3leon export: done")
  return read_manifest(out)


def _write_rest(config, tmp, paths, dtype, retrieval, run_dir, step, num_params) -> dict:
  shutil.copy2(paths.text_tokenizer, os.path.join(tmp, "text_tokenizer.json"))
  os.makedirs(os.path.join(tmp, "vq"))
  shutil.copy2(os.path.join(paths.vq, "vq_config.json"), os.path.join(tmp, "vq"))
  parts = {"vq_step": _copy_model_step(paths.vq, os.path.join(tmp, "vq"), "VQ tokenizer",
                                       "train-vq")}
  if retrieval:
    parts["retriever_step"] = _copy_model_step(paths.retriever, os.path.join(tmp, "retriever"),
                                               "dual encoder", "train-retriever")
    shutil.copytree(paths.index, os.path.join(tmp, "index"))
    shutil.copytree(paths.tokens, os.path.join(tmp, "tokens"))
  with open(os.path.join(tmp, CONFIG), "w") as f:
    f.write(bundle_config(config, dtype, retrieval).to_json(indent=1))
  import flax
  import orbax.checkpoint
  manifest = {
      "format": FORMAT,
      "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
      "versions": {"jax": jax.__version__, "flax": flax.__version__,
                   "orbax-checkpoint": getattr(orbax.checkpoint, "__version__", "unknown")},
      "source": {"workdir": os.path.abspath(paths.root), "decoder": os.path.abspath(run_dir),
                 "config": config.name},
      "decoder": {"step": int(step), "dtype": dtype, "num_params": num_params},
      "parts": {**parts, "retrieval": retrieval},
      "files": _file_table(tmp),
  }
  with open(os.path.join(tmp, MANIFEST), "w") as f:
    json.dump(manifest, f, indent=1)
  return manifest


# --- loading -------------------------------------------------------------------------------
def read_manifest(bundle: str) -> dict:
  path = os.path.join(bundle, MANIFEST)
  if not os.path.isfile(path):
    raise InputError(f"{bundle}: not an export bundle ({MANIFEST} missing); make one with "
                     "`cm3leon export`")
  try:
    with open(path) as f:
      manifest = json.load(f)
  except (OSError, json.JSONDecodeError) as e:
    raise InputError(f"{path}: unreadable manifest ({e})") from None
  if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
    got = manifest.get("format") if isinstance(manifest, dict) else type(manifest).__name__
    raise InputError(f"{path}: format {got!r}, this version reads {FORMAT!r}")
  for key in ("decoder", "files", "parts"):
    if not isinstance(manifest.get(key), dict):
      raise InputError(f"{path}: field {key!r} missing or not an object")
  return manifest


def verify(bundle: str, checksums: bool = False) -> dict:
  """The manifest, after checking that every listed file exists with its size (and, with
  `checksums`, its SHA-256). One InputError naming the first bad file."""
  manifest = read_manifest(bundle)
  for rel, meta in manifest["files"].items():
    path = os.path.join(bundle, rel)
    if not os.path.isfile(path):
      raise InputError(f"{path}: missing from the bundle (listed in {MANIFEST})")
    size = os.path.getsize(path)
    if size != meta.get("bytes"):
      raise InputError(f"{path}: {size} bytes, the manifest says {meta.get('bytes')} (truncated "
                       "or modified)")
    if checksums and _sha256(path) != meta.get("sha256"):
      raise InputError(f"{path}: SHA-256 differs from the manifest's (modified or corrupt)")
  return manifest


def _from_json(text: str) -> ml_collections.ConfigDict:
  def tuples(x):  # JSON has no tuples; the presets' sequence fields are tuples
    if isinstance(x, dict):
      return {k: tuples(v) for k, v in x.items()}
    if isinstance(x, list):
      return tuple(tuples(v) for v in x)
    return x
  return ml_collections.ConfigDict(tuples(json.loads(text)))


def load_config(bundle: str, overrides=()) -> ml_collections.ConfigDict:
  """The bundle's config with `overrides` (`decoding.cfg_weight=3`, ...) applied, its workdir
  the bundle. Overrides that would change what the saved parts are shaped by are refused."""
  from cm3leon_jax import configs
  from cm3leon_jax.train.checkpoint import state_signature
  from cm3leon_jax.tokenizers.vq import arch_dict

  bundle = os.path.abspath(bundle)
  verify(bundle)
  path = os.path.join(bundle, CONFIG)
  try:
    with open(path) as f:
      config = _from_json(f.read())
  except (OSError, json.JSONDecodeError) as e:
    raise InputError(f"{path}: unreadable config ({e})") from None
  shaped = lambda c: (state_signature(c), arch_dict(c.vq), c.vocab.to_dict(),
                      c.retrieval.enabled, _encoder_shape(c))
  before = shaped(config)
  for override in overrides:
    configs.apply_override(config, override)
  if shaped(config) != before:
    raise InputError(f"{', '.join(overrides)}: an exported bundle's model, tokenizer, vocabulary "
                     "and retriever fields are fixed; override decoding or eval fields only")
  config.workdir = bundle
  configs.validate(config)
  config.lock()
  return config


def cli_config(args, config):
  """The config a `generate` / `eval` run uses: with `--bundle`, the bundle's (this run's
  overrides applied; --step / --decoder refused: a bundle holds one decoder), else `config`."""
  if not getattr(args, "bundle", None):
    return config
  if args.step is not None or args.decoder:
    raise InputError("--bundle holds one decoder: --step and --decoder do not apply")
  return load_config(args.bundle, getattr(args, "overrides", ()))


def _encoder_shape(c) -> tuple:
  r = c.retrieval
  return (r.embed_dim, r.text_layers, r.text_width, r.text_heads, r.text_max_len, r.image_patch,
          r.image_layers, r.image_width, r.image_heads, r.image_stem)


def load_model(config):
  """The bundle's decoder (`config` from `load_config`), sharded on the config's mesh."""
  import orbax.checkpoint as ocp
  from flax import nnx

  from cm3leon_jax.train.mesh import make_mesh
  from cm3leon_jax.train.state import abstract_model

  graphdef, abstract = abstract_model(config, make_mesh(config.mesh))
  path = os.path.join(config.workdir, DECODER)
  try:
    with ocp.StandardCheckpointer() as reader:
      restored = reader.restore(path, nnx.to_pure_dict(abstract))
  except (ValueError, KeyError, FileNotFoundError) as e:
    raise InputError(f"{path}: cannot restore the decoder ({str(e).splitlines()[0][:300]})") \
        from None
  nnx.replace_by_pure_dict(abstract, restored)
  return nnx.merge(graphdef, abstract)

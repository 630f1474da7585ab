"""Config presets (ml_collections) and command-line overrides.

    load("quickstart", ["model.num_layers=4", "optimizer.peak_lr=1e-3"])

A preset is a name from PRESETS or a path to a Python file with `get_config(arg)`;
`name:arg` passes `arg`. Overrides must name an existing field and parse to its type;
anything else is an InputError naming the field.
"""

from __future__ import annotations

import ast
import difflib
import importlib
import importlib.util
import os
from typing import Iterable

import ml_collections

from cm3leon_jax.errors import InputError

PRESETS = ("tiny", "quickstart", "bench", "cm3leon_350m", "cm3leon_760m", "cm3leon_7b")


def load(preset: str, overrides: Iterable[str] = ()) -> ml_collections.ConfigDict:
  """Load a preset (name or .py path, optionally `:arg`), apply `a.b=value` overrides, lock."""
  name, _, arg = preset.partition(":")
  if name in PRESETS:
    module = importlib.import_module(f"cm3leon_jax.configs.{name}")
  elif name.endswith(".py"):
    if not os.path.isfile(name):
      raise InputError(f"--config {name}: file not found")
    spec = importlib.util.spec_from_file_location("cm3leon_user_config", name)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    if not hasattr(module, "get_config"):
      raise InputError(f"--config {name}: the file defines no get_config(arg)")
  else:
    hint = difflib.get_close_matches(name, PRESETS, n=1)
    raise InputError(f"--config {name}: unknown preset (choose from {', '.join(PRESETS)}"
                     + (f"; did you mean {hint[0]!r}?)" if hint else ")"))
  config = module.get_config(arg or None)
  for override in overrides:
    apply_override(config, override)
  validate(config)
  config.lock()
  return config


def apply_override(config: ml_collections.ConfigDict, override: str) -> None:
  """Apply one `a.b.c=value` override; `value` is parsed to the existing field's type."""
  if override.startswith("--config."):
    override = override[len("--config."):]
  path, sep, raw = override.partition("=")
  if not sep:
    raise InputError(f"--config.{override}: expected --config.<field>=<value>")
  keys = path.split(".")
  node = config
  for depth, key in enumerate(keys):
    if not isinstance(node, ml_collections.ConfigDict) or key not in node:
      where = ".".join(keys[:depth]) or "the config"
      options = list(node.keys()) if isinstance(node, ml_collections.ConfigDict) else []
      hint = difflib.get_close_matches(key, options, n=1)
      raise InputError(f"--config.{path}: unknown field {key!r} in {where}"
                       + (f" (did you mean {hint[0]!r}?)" if hint else ""))
    if depth < len(keys) - 1:
      node = node[key]
  current = node[keys[-1]]
  if isinstance(current, ml_collections.ConfigDict):
    raise InputError(f"--config.{path}: is a section, not a field")
  value = _parse_as(raw, current, path)
  with node.unlocked():
    node[keys[-1]] = value


def _parse_as(raw: str, current, path: str):
  expected = type(current).__name__
  fail = InputError(f"--config.{path}={raw}: expected {expected} (current value {current!r})")
  if isinstance(current, bool):
    lowered = raw.strip().lower()
    if lowered in ("true", "1", "yes"):
      return True
    if lowered in ("false", "0", "no"):
      return False
    raise fail
  if isinstance(current, int):
    try:
      return int(raw)
    except ValueError:
      raise fail from None
  if isinstance(current, float):
    try:
      return float(raw)
    except ValueError:
      raise fail from None
  if isinstance(current, str):
    return raw
  if isinstance(current, (tuple, list)) or current is None:
    try:
      value = ast.literal_eval(raw)
    except (ValueError, SyntaxError):
      if current is None:
        return raw
      raise fail from None
    if current is not None and not isinstance(value, (tuple, list)):
      raise fail
    return type(current)(value) if current is not None else value
  raise fail


# Fields with a closed set of values, checked when a config is loaded so a typo fails before
# anything compiles.
CHOICES = {
    "text_tokenizer.normalization": ("nfkc", "none"),
    "vq.downsample": (4, 8, 16),
    "vq.recon_loss": ("l1", "l2"),
    "data.dataset": ("shapes", "coco_captions", "image_text_folder"),
    "model.activation": ("relu", "gelu", "swiglu"),
    "model.dtype": ("float32", "bfloat16"),
    "model.param_dtype": ("float32", "bfloat16"),
    "model.remat_policy": ("none", "dots_saveable", "nothing_saveable"),
    "model.attention": ("auto", "xla", "cudnn", "cudnn_packed", "splash"),
    "optimizer.decay": ("cosine", "linear", "constant"),
    "decoding.pool": ("top_p", "cdk", "mixed"),
}


def validate(config: ml_collections.ConfigDict) -> None:
  """Raise InputError for a field outside its allowed values or inconsistent sizes."""
  for path, allowed in CHOICES.items():
    section, field = path.split(".")
    value = config[section][field]
    if value not in allowed:
      raise InputError(f"--config.{path}={value!r}: expected one of {allowed}")
  if config.vq.image_size % config.vq.downsample:
    raise InputError(f"--config.vq.image_size={config.vq.image_size} is not divisible by "
                     f"vq.downsample={config.vq.downsample}")
  for path in ("model.num_layers", "model.d_model", "model.num_heads", "model.head_dim",
               "model.seq_len", "train.batch_size", "train.grad_accum", "train.steps",
               "vq.codebook_size", "vq.batch_size", "vq.steps", "retrieval.batch_size",
               "retrieval.steps", "retrieval.embed_dim", "decoding.max_text_tokens"):
    section, field = path.split(".")
    if config[section][field] < 1:
      raise InputError(f"--config.{path}={config[section][field]}: must be >= 1")
  if "sft" in config:
    sft = config.sft
    for field, ok, rule in (("steps", sft.steps >= 1, ">= 1"),
                            ("records_per_task", sft.records_per_task >= 1, ">= 1"),
                            ("eval_records_per_task", sft.eval_records_per_task >= 0, ">= 0"),
                            ("peak_lr", sft.peak_lr > 0, "> 0"),
                            ("warmup_steps", sft.warmup_steps >= 0, ">= 0"),
                            ("balance_up", sft.balance_up >= 1, ">= 1"),
                            ("balance_down", 0 < sft.balance_down <= 1, "in (0, 1]"),
                            ("pretrain_weight", sft.pretrain_weight >= 0, ">= 0"),
                            ("eval_every", sft.eval_every >= 0, ">= 0"),
                            ("checkpoint_every", sft.checkpoint_every >= 0, ">= 0")):
      if not ok:
        raise InputError(f"--config.sft.{field}={sft[field]}: must be {rule}")
  if config.vq.get("warmup_steps", 0) < 0:
    raise InputError(f"--config.vq.warmup_steps={config.vq.warmup_steps}: must be >= 0")

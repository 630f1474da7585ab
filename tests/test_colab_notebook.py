"""experiments/colab_tpu.ipynb keeps working as the code changes (no Colab, no TPU: seconds, CPU).

What is checked, without running the notebook:
- the file is nbformat-4 JSON (checked by hand: nbformat is not a dependency) with no stored
  outputs;
- its first code cell (the helpers) runs as plain Python, and for 1, 4 and 8 devices its
  `tpu_overrides` makes every batch the project splits over the mesh (every `check_batch` call
  in cm3leon_jax/) divide by the mesh's data x fsdp size, checked with the project's own
  `mesh_shape`, `make_mesh` and `check_batch` on the 8 fake CPU devices of conftest.py;
- every `!cm3leon ...` shell line, after substituting the notebook's variables, parses with
  `cli.build_parser(command)` and its `--config.*` overrides load with `configs.load`;
- the notebook's own process opens no device before the last `!cm3leon` command (a TPU belongs
  to the first process that opens it; the commands are other processes);
- the paths its cells read are where the commands write; the files, config fields, presets and
  preset values its text names exist; its calls of the Python API bind to their signatures;
  an empty REPO_URL stops the get-the-code cell with an error naming it.

How variables are substituted: a `!` line may use `{NAME}` (IPython's expansion) only for a
variable some code cell assigns. The test execs the helpers cell, replaces its
`probe_devices()` (a child process's `jax.devices()`) by a stand-in reporting N TPU devices,
then execs, in notebook order, every cell that assigns a variable the `!` lines use or that
such a cell reads. Anything else IPython would expand (`{...}` of an unknown name, `$`) fails.
"""

from __future__ import annotations

import argparse
import ast
import dataclasses
import inspect
import json
import os
import pathlib
import re
import shlex
import subprocess
import sys

import jax
import pytest

from cm3leon_jax import cli, configs
from cm3leon_jax.decode.api import Generator, TextToImageResult
from cm3leon_jax.paths import artifacts
from cm3leon_jax.train import mesh as mesh_lib

ROOT = pathlib.Path(__file__).resolve().parents[1]
NOTEBOOK = ROOT / "experiments" / "colab_tpu.ipynb"
DEVICE_COUNTS = (1, 4, 8)
PRESET = "quickstart"
REQUIRED_COMMANDS = {"quickstart", "generate", "export"}
CELL_KEYS = {"code": {"cell_type", "execution_count", "id", "metadata", "outputs", "source"},
             "markdown": {"cell_type", "id", "metadata", "source", "attachments"},
             "raw": {"cell_type", "id", "metadata", "source", "attachments"}}


def _notebook() -> dict:
  with open(NOTEBOOK, encoding="utf-8") as f:
    return json.load(f)


def _source(cell) -> str:
  src = cell["source"]
  return src if isinstance(src, str) else "".join(src)


def _code_cells() -> list[str]:
  return [_source(c) for c in _notebook()["cells"] if c["cell_type"] == "code"]


def _shell_lines(source: str) -> list[str]:
  """The `!` lines of a cell (a trailing backslash continues a line)."""
  out, pending = [], None
  for line in source.splitlines():
    stripped = line.strip()
    if pending is not None:
      pending += " " + stripped
    elif stripped.startswith("!"):
      pending = stripped[1:].strip()
    else:
      continue
    if pending.endswith("\\"):
      pending = pending[:-1].rstrip()
    else:
      out.append(pending)
      pending = None
  assert pending is None, f"a `!` line ends with a backslash: {pending!r}"
  return out


def _python(source: str) -> str:
  """A cell's source with its IPython lines (`!`, `%`) replaced by `pass`."""
  lines = []
  for line in source.splitlines():
    stripped = line.lstrip()
    lines.append(line[:len(line) - len(stripped)] + "pass" if stripped.startswith(("!", "%"))
                 else line)
  return "\n".join(lines)


def _assigned(source: str) -> set[str]:
  return {t.id for node in ast.walk(ast.parse(_python(source))) if isinstance(node, ast.Assign)
          for t in node.targets if isinstance(t, ast.Name)}


def _read(source: str) -> set[str]:
  return {n.id for n in ast.walk(ast.parse(_python(source)))
          if isinstance(n, ast.Name) and isinstance(n.ctx, ast.Load)}


def _fake_probe(num_devices: int):
  return lambda: {"backend": "tpu", "device_count": num_devices, "device_kind": "TPU v3",
                  "devices": [f"TpuDevice(id={i})" for i in range(num_devices)]}


def _helpers() -> dict:
  ns: dict = {}
  exec(compile(_code_cells()[0], "helpers cell", "exec"), ns)
  return ns


def _namespace(num_devices: int) -> dict:
  """The notebook's variables on a runtime with `num_devices` TPU devices (module docstring)."""
  cells = _code_cells()
  ns = _helpers()
  ns["probe_devices"] = _fake_probe(num_devices)
  used = {name for c in cells for line in _shell_lines(c)
          for name in re.findall(r"\{(\w+)\}", line)}
  needed, run = set(used), set()
  while True:  # the cells assigning what is needed, and what those cells read, to a fixpoint
    more = {i for i, c in enumerate(cells[1:], 1) if _assigned(c) & needed} - run
    if not more:
      break
    run |= more
    for i in more:
      needed |= _read(cells[i])
  saved = dict(os.environ)  # the devices cell sets JAX_PLATFORMS=tpu for the commands
  try:
    for i in sorted(run):
      exec(compile(_python(cells[i]), f"code cell {i + 1}", "exec"), ns)
  finally:
    os.environ.clear()
    os.environ.update(saved)
  missing = used - ns.keys()
  assert not missing, f"`!` lines use {sorted(missing)}, which no code cell assigns"
  return ns


def _expand(line: str, ns: dict) -> str:
  expanded = re.sub(r"\{(\w+)\}", lambda m: str(ns[m.group(1)]), line)
  assert not re.search(r"[{}$]", expanded), (
      f"`!{line}`: only {{NAME}} of a notebook variable is substituted here; IPython would "
      f"expand the rest")
  return expanded


def _cm3leon_commands(num_devices: int) -> list[list[str]]:
  ns = _namespace(num_devices)
  return [shlex.split(_expand(line, ns))[1:] for c in _code_cells() for line in _shell_lines(c)
          if shlex.split(line)[:1] == ["cm3leon"]]


def _sharded_batch_fields() -> set[str]:
  """The config field of every `check_batch(...)` call in the package (its third argument or
  `field=`; the default is train.batch_size)."""
  default = inspect.signature(mesh_lib.check_batch).parameters["field"].default
  fields = set()
  for path in (ROOT / "cm3leon_jax").rglob("*.py"):
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
      if not isinstance(node, ast.Call):
        continue
      func = node.func
      name = func.attr if isinstance(func, ast.Attribute) else getattr(func, "id", None)
      if name != "check_batch":
        continue
      arg = node.args[2] if len(node.args) > 2 else next(
          (k.value for k in node.keywords if k.arg == "field"), None)
      if arg is None:
        fields.add(default)
      else:
        assert isinstance(arg, ast.Constant), f"{path}: check_batch's field is not a literal"
        fields.add(arg.value)
  return fields


# --- the file --------------------------------------------------------------------------------
def test_notebook_is_nbformat4_json_without_outputs():
  nb = _notebook()
  assert nb["nbformat"] == 4 and isinstance(nb["nbformat_minor"], int)
  assert isinstance(nb["metadata"], dict) and nb["metadata"]["kernelspec"]["language"] == "python"
  assert isinstance(nb["cells"], list) and nb["cells"]
  ids = [c.get("id") for c in nb["cells"]]
  if nb["nbformat_minor"] >= 5:  # cell ids are required from 4.5 on
    assert all(isinstance(i, str) and re.fullmatch(r"[a-zA-Z0-9-_]{1,64}", i) for i in ids), ids
    assert len(set(ids)) == len(ids), "duplicate cell ids"
  for i, cell in enumerate(nb["cells"]):
    kind = cell["cell_type"]
    assert kind in CELL_KEYS, f"cell {i}: cell_type {kind!r}"
    assert set(cell) <= CELL_KEYS[kind] and {"cell_type", "metadata", "source"} <= set(cell), (
        f"cell {i}: keys {sorted(cell)}")
    assert isinstance(cell["metadata"], dict)
    src = cell["source"]
    assert isinstance(src, str) or (isinstance(src, list) and all(isinstance(s, str) for s in src))
    assert _source(cell).strip(), f"cell {i} is empty"
    if kind == "code":
      assert cell["outputs"] == [] and cell["execution_count"] is None, f"cell {i} has outputs"


def test_code_cells_are_python_and_helpers_cell_is_plain():
  cells = _code_cells()
  for i, cell in enumerate(cells, 1):
    compile(_python(cell), f"code cell {i}", "exec")
  assert not any(line.lstrip().startswith(("!", "%")) for line in cells[0].splitlines()), (
      "the first code cell (the helpers) must be plain Python: the test execs it")
  assert "tpu_overrides" in _namespace(1)


def test_probe_devices_reports_the_child_process_devices():
  """The real probe (a child process; conftest.py's 8 fake CPU devices are inherited)."""
  info = _helpers()["probe_devices"]()
  assert info["device_count"] == jax.device_count() == len(info["devices"])
  assert info["backend"] == jax.default_backend() and info["device_kind"]


def test_notebook_process_opens_no_device_before_the_commands():
  """Cells up to the last `!cm3leon` command use no `jax` name, and what they import and call
  (the helpers, the project modules they import) initialises no JAX backend."""
  cells = _code_cells()
  last = max(i for i, c in enumerate(cells) for line in _shell_lines(c)
             if shlex.split(line)[:1] == ["cm3leon"])
  imports = []
  for i, cell in enumerate(cells[:last + 1]):
    tree = ast.parse(_python(cell))
    names = {n.id for n in ast.walk(tree) if isinstance(n, ast.Name)}
    assert "jax" not in names, f"code cell {i + 1} uses jax before the commands have run"
    for node in ast.walk(tree):
      if isinstance(node, ast.Import):
        imports += [a.name for a in node.names]
      elif isinstance(node, ast.ImportFrom) and node.module:
        imports.append(node.module)
  assert not any(m == "jax" or m.startswith("jax.") for m in imports), imports
  script = "\n".join([
      *[f"import {m}" for m in sorted(set(imports)) if m.split(".")[0] == "cm3leon_jax"],
      cells[0],
      "for n in (1, 4, 8): tpu_overrides(n)",
      "from jax._src import xla_bridge",
      "assert not xla_bridge._backends, sorted(xla_bridge._backends)",
  ])
  run = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                       cwd=ROOT)
  assert run.returncode == 0, run.stderr[-2000:]


def test_empty_repo_url_is_a_clear_error(tmp_path):
  """No placeholder that pretends to work: the get-the-code cell refuses an empty REPO_URL."""
  cell = next(c for c in _code_cells() if "REPO_URL" in _assigned(c))
  source, n = re.subn(r'^REPO_DIR = .*$', f"REPO_DIR = {str(tmp_path / 'none')!r}", cell,
                      flags=re.M)
  assert n == 1 and re.search(r'^REPO_URL = ""', cell, flags=re.M), "REPO_URL must ship empty"
  with pytest.raises(ValueError, match="REPO_URL"):
    exec(compile(source, "get-the-code cell", "exec"), {})


# --- the batch overrides ---------------------------------------------------------------------
def test_helpers_round_every_batch_the_code_shards():
  ns = _namespace(1)
  assert set(ns["SHARDED_BATCHES"]) == _sharded_batch_fields(), (
      "the notebook's SHARDED_BATCHES must list every field the package passes to check_batch")


@pytest.mark.parametrize("num_devices", DEVICE_COUNTS)
def test_overrides_make_every_sharded_batch_divide(num_devices):
  assert num_devices <= jax.device_count(), "conftest.py gives 8 fake CPU devices"
  overrides = _namespace(num_devices)["tpu_overrides"](num_devices, PRESET)
  config = configs.load(PRESET, overrides)
  data, fsdp, _ = mesh_lib.mesh_shape(config.mesh, num_devices)
  assert config.train.batch_size % (data * fsdp) == 0
  assert config.train.batch_size % num_devices == 0  # the presets' mesh: data=-1, fsdp=1
  mesh = mesh_lib.make_mesh(config.mesh, jax.devices()[:num_devices])
  for field in _sharded_batch_fields():
    section, name = field.split(".")
    mesh_lib.check_batch(config[section][name], mesh, field)  # InputError if not divisible
  # Only what must change changes: no override on a preset that already divides.
  base = configs.load(PRESET)
  for field in _sharded_batch_fields():
    section, name = field.split(".")
    if base[section][name] % (data * fsdp) == 0:
      assert config[section][name] == base[section][name], field


def test_overrides_on_8_devices_raise_the_decoder_batch():
  """The case the notebook exists for: the quickstart's batch 4 on a v2-8 / v3-8 runtime."""
  base = configs.load(PRESET)
  assert base.train.batch_size % 8, "the quickstart's batch now divides 8: update the notebook"
  assert "--config.train.batch_size=8" in _namespace(8)["tpu_overrides"](8, PRESET)


# --- the shell commands ----------------------------------------------------------------------
@pytest.mark.parametrize("num_devices", DEVICE_COUNTS)
def test_cm3leon_commands_parse_and_their_overrides_load(num_devices):
  commands = _cm3leon_commands(num_devices)
  assert REQUIRED_COMMANDS <= {argv[0] for argv in commands if argv}
  for argv in commands:
    overrides, rest = cli._split_overrides(argv)
    command = rest[0]
    assert command in cli.COMMANDS and cli._is_built(cli.COMMANDS[command][1]), command
    parser = cli.build_parser(command)
    try:
      args = parser.parse_args(rest)
    except SystemExit as e:
      pytest.fail(f"`cm3leon {shlex.join(argv)}` does not parse (exit {e.code})")
    # argparse also takes unambiguous prefixes (`--prompts` for `--prompts-file`): the notebook
    # spells every option in full.
    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    options = sub.choices[command]._option_string_actions
    for token in rest:
      if token.startswith("--"):
        assert token.split("=")[0] in options, f"cm3leon {command}: {token} is not an option"
    config = configs.load(args.config, overrides)  # InputError on a bad field or value
    assert args.config == PRESET
    mesh = mesh_lib.make_mesh(config.mesh, jax.devices()[:num_devices])
    mesh_lib.check_batch(config.train.batch_size, mesh)


def test_paths_in_the_notebook_match_the_workdir():
  """Paths the cells read (report, samples, the bundle) are where the commands write them."""
  config = configs.load(PRESET)
  code = "\n".join(_code_cells())
  paths = set(re.findall(r"outputs/[\w./-]+", code))
  assert paths and all(p.startswith(config.workdir + "/") for p in paths), paths
  for expected in (os.path.join(config.workdir, "report.md"),
                   os.path.join(config.workdir, "samples.png"),
                   os.path.join(config.workdir, "infill.png"),
                   os.path.join(artifacts(config).samples, "grid.png"),  # generate's default
                   os.path.join(config.workdir, "export")):  # export's default --out
    assert expected in paths, expected


def test_text_mentions_existing_files_fields_and_presets():
  text = "\n".join(_source(c) for c in _notebook()["cells"])
  files = set(re.findall(r"\b((?:cm3leon_jax|tpu|experiments)/[\w/-]+\.py|requirements[\w-]*\.txt"
                         r"|pyproject\.toml)\b", text))
  assert files and all((ROOT / f).is_file() for f in files), sorted(f for f in files
                                                                    if not (ROOT / f).is_file())
  config = configs.load(PRESET)
  for field in set(re.findall(r"--config\.([\w.]+)", text)):
    node = config
    for key in field.split("."):
      assert key in node, f"--config.{field}: no such field in the {PRESET} preset"
      node = node[key]
  for override in set(re.findall(r"(--config\.[\w.]+=[\w.+-]+)", text)):
    configs.load(PRESET, [override])
  # the preset's values, e.g. `vq.batch_size=16`
  quoted = re.findall(r"`(\w+\.\w+)=([\w.+-]+)`", text)
  assert quoted
  for field, value in quoted:
    section, name = field.split(".")
    assert str(config[section][name]) == value, f"the text says {field}={value}"
  presets = set(re.findall(r"(?:cm3leon |compile_check\.py)[^\n`]*?--config (\w+)", text))
  assert presets
  for preset in presets:
    assert preset in configs.PRESETS, preset


def test_python_api_used_by_the_notebook_exists():
  tree = ast.parse("\n".join(_python(c) for c in _code_cells()))
  for node in ast.walk(tree):
    if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("cm3leon_jax"):
      module = __import__(node.module, fromlist=["_"])
      for alias in node.names:
        assert hasattr(module, alias.name), f"{node.module}.{alias.name}"
    if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute):
      if isinstance(node.func.value, ast.Name) and node.func.value.id == "Generator":
        method = getattr(Generator, node.func.attr)  # AttributeError names it
        inspect.signature(method).bind(*[None] * len(node.args),
                                       **{k.arg: None for k in node.keywords})
      if node.func.attr == "text_to_image":
        inspect.signature(Generator.text_to_image).bind(
            None, *[None] * len(node.args), **{k.arg: None for k in node.keywords})
  fields = {f.name for f in dataclasses.fields(TextToImageResult)}
  used = {n.attr for n in ast.walk(tree) if isinstance(n, ast.Attribute)
          and isinstance(n.value, ast.Name) and n.value.id == "result"}
  assert used and used <= fields, used - fields

"""tpu/pod.py builds the documented gcloud commands for one slice and for multislice, runs the
user's command word for word on every worker, and turns bad input into one clear error."""

from __future__ import annotations

import ast
import importlib.util
import os
import shlex
import shutil
import subprocess
import sys

import pytest

_PATH = os.path.join(os.path.dirname(__file__), "..", "tpu", "pod.py")
_SPEC = importlib.util.spec_from_file_location("tpu_pod", _PATH)
pod = importlib.util.module_from_spec(_SPEC)
_SPEC.loader.exec_module(pod)

TPUS = ["gcloud", "compute", "tpus"]
TRAIN = ["cm3leon", "train", "--config", "cm3leon_350m", "--config.workdir=/mnt/bucket/run1"]


def steps(*argv: str):
  args = pod.parse(list(argv))
  return pod.STEPS[args.action](args)


def command_value(cmd: list[str]) -> str:
  (value,) = [a for a in cmd if a.startswith("--command=")]
  return value.removeprefix("--command=")


def test_module_imports_only_the_standard_library():
  tree = ast.parse(open(_PATH).read())
  imported = {alias.name.split(".")[0] for node in ast.walk(tree)
              if isinstance(node, ast.Import) for alias in node.names}
  imported |= {node.module.split(".")[0] for node in ast.walk(tree)
               if isinstance(node, ast.ImportFrom)}
  assert imported <= set(sys.stdlib_module_names) | {"__future__"}


# ---------------------------------------------------------------- create

def test_create_one_slice_is_a_tpu_vm():
  assert steps("create", "--name", "run1", "--zone", "us-east5-a", "--type", "v5p-128") == [[
      TPUS + ["tpu-vm", "create", "run1", "--zone=us-east5-a", "--accelerator-type=v5p-128",
              "--version=v2-alpha-tpuv5"]]]


@pytest.mark.parametrize("accelerator, version", [
    ("v4-32", "tpu-ubuntu2204-base"), ("v5p-128", "v2-alpha-tpuv5"),
    ("v5litepod-16", "v2-alpha-tpuv5-lite"), ("v6e-256", "v2-alpha-tpuv6e")])
def test_default_software_version_follows_the_generation(accelerator, version):
  assert pod.default_version(accelerator) == version


def test_create_passes_version_project_and_spot():
  assert steps("create", "--name", "r", "--zone", "z", "--project", "p", "--type", "v4-8",
               "--version", "tpu-vm-base", "--spot") == [[
      TPUS + ["tpu-vm", "create", "r", "--zone=z", "--project=p", "--accelerator-type=v4-8",
              "--version=tpu-vm-base", "--spot"]]]


def test_create_multislice_is_one_queued_resource_of_n_nodes():
  assert steps("create", "--name", "ms1", "--zone", "z", "--type", "v5p-128",
               "--slices", "2") == [[
      TPUS + ["queued-resources", "create", "ms1", "--zone=z", "--accelerator-type=v5p-128",
              "--runtime-version=v2-alpha-tpuv5", "--node-count=2", "--node-prefix=ms1"]]]


def test_multislice_nodes_are_prefix_dash_index():
  assert pod.node_names(pod.parse(["status", "--name", "ms1", "--zone", "z", "--slices", "3"])) \
      == ["ms1-0", "ms1-1", "ms1-2"]


# ---------------------------------------------------------------- run

def test_run_is_one_ssh_per_slice_node_in_one_step():
  ssh0, ssh1 = [TPUS + ["tpu-vm", "ssh", node, "--zone=z", "--worker=all"] for node in
                ("ms1-0", "ms1-1")]
  (step,) = steps("run", "--name", "ms1", "--zone", "z", "--slices", "2", "--", *TRAIN)
  assert [cmd[:-1] for cmd in step] == [ssh0, ssh1]  # the last word is --command=...
  assert command_value(step[0]) == command_value(step[1]) == (
      "set -o pipefail; cd ~/cm3leon_jax && . .venv/bin/activate && "
      "export CM3LEON_DISTRIBUTED=1 && mkdir -p logs && "
      "cm3leon train --config cm3leon_350m --config.workdir=/mnt/bucket/run1"
      " 2>&1 | tee -a logs/run-$(hostname).log")


def test_run_quotes_a_word_with_a_space_and_a_quote():
  (step,) = steps("run", "--name", "r", "--zone", "z", "--", "echo", "it's one word", "x")
  script = command_value(step[0])
  assert "echo 'it'\"'\"'s one word' x 2>&1" in script
  words = shlex.split(script)
  assert words[words.index("echo") + 1:words.index("echo") + 3] == ["it's one word", "x"]


@pytest.mark.skipif(not (shutil.which("bash") and shutil.which("hostname")),
                    reason="needs bash and hostname")
def test_run_script_on_a_worker_keeps_words_logs_and_exit_status(tmp_path):
  venv = tmp_path / "cm3leon_jax" / ".venv" / "bin"
  venv.mkdir(parents=True)
  (venv / "activate").write_text("export ACTIVATED=yes\n")
  command = ["sh", "-c", 'printf "%s|" "$@" "$ACTIVATED"; exit 3', "sh", "a b'c", '--x="q"']
  out = subprocess.run(["bash", "-c", pod.run_script(command, "job", background=False)],
                       env={**os.environ, "HOME": str(tmp_path)}, capture_output=True, text=True)
  assert (out.returncode, out.stdout) == (3, "a b'c|--x=\"q\"|yes|")
  (log,) = (tmp_path / "cm3leon_jax" / "logs").iterdir()
  assert log.name.startswith("job-") and log.read_text() == out.stdout


def test_run_background_starts_under_nohup_and_returns():
  assert pod.run_script(["cm3leon", "train"], "run1", background=True) == (
      "cd ~/cm3leon_jax && . .venv/bin/activate && export CM3LEON_DISTRIBUTED=1 && "
      "mkdir -p logs && "
      "(nohup cm3leon train >> logs/run1-$(hostname).log 2>&1 < /dev/null &)")


# ---------------------------------------------------------------- setup, status, ssh, delete

def test_setup_packs_copies_and_installs_on_every_node():
  archive = ["git", "-C", pod.REPO_ROOT, "archive", "--format=tar.gz",
             f"--output={pod.TARBALL}", "HEAD"]
  scp = [TPUS + ["tpu-vm", "scp", pod.TARBALL, f"{node}:cm3leon_jax.tar.gz", "--zone=z",
                 "--worker=all"] for node in ("ms1-0", "ms1-1")]
  install = [TPUS + ["tpu-vm", "ssh", node, "--zone=z", "--worker=all",
                     "--command=" + pod.install_script("python3.11")]
             for node in ("ms1-0", "ms1-1")]
  assert steps("setup", "--name", "ms1", "--zone", "z", "--slices", "2") == [
      [archive], scp, install]


def test_install_script_unpacks_and_pip_installs_the_tpu_requirements():
  script = pod.install_script("python3.11")
  assert "tar -xzf ~/cm3leon_jax.tar.gz -C ~/cm3leon_jax && cd ~/cm3leon_jax" in script
  assert script.endswith("python3.11 -m venv .venv && .venv/bin/pip install --upgrade pip"
                         " && .venv/bin/pip install -r requirements-tpu.txt -e .")


def test_setup_with_a_bucket_mounts_it_on_every_node():
  *_, mount = steps("setup", "--name", "r", "--zone", "z", "--bucket", "gs://my-bucket",
                    "--mount", "/mnt/data")
  assert mount == [TPUS + ["tpu-vm", "ssh", "r", "--zone=z", "--worker=all",
                           "--command=" + pod.mount_script("my-bucket", "/mnt/data")]]
  assert pod.mount_script("my-bucket", "/mnt/data").endswith(
      "(mountpoint -q /mnt/data || gcsfuse --implicit-dirs my-bucket /mnt/data)")


def test_status_describes_the_node_or_the_queued_resource():
  assert steps("status", "--name", "r", "--zone", "z") == [
      [TPUS + ["tpu-vm", "describe", "r", "--zone=z"]]]
  assert steps("status", "--name", "r", "--zone", "z", "--slices", "2") == [
      [TPUS + ["queued-resources", "describe", "r", "--zone=z"]]]


def test_ssh_opens_one_worker_of_one_slice():
  assert steps("ssh", "--name", "ms1", "--zone", "z", "--slices", "2", "--slice", "1",
               "--worker", "3") == [[TPUS + ["tpu-vm", "ssh", "ms1-1", "--zone=z", "--worker=3"]]]


def test_delete_one_slice_deletes_the_tpu_vm():
  assert steps("delete", "--name", "r", "--zone", "z") == [
      [TPUS + ["tpu-vm", "delete", "r", "--zone=z", "--quiet"]]]


def test_delete_multislice_force_deletes_the_queued_resource_and_its_nodes():
  assert steps("delete", "--name", "ms1", "--zone", "z", "--slices", "4") == [
      [TPUS + ["queued-resources", "delete", "ms1", "--zone=z", "--force", "--quiet"]]]


# ---------------------------------------------------------------- main: dry run and execution

@pytest.fixture
def no_subprocess(monkeypatch):
  def refuse(*args, **kwargs):
    raise AssertionError(f"ran {args}")
  monkeypatch.setattr(subprocess, "run", refuse)
  monkeypatch.setattr(subprocess, "Popen", refuse)


@pytest.mark.parametrize("flag_first", [True, False])
def test_dry_run_prints_every_command_and_runs_nothing(no_subprocess, capsys, flag_first):
  argv = ["setup", "--name", "ms1", "--zone", "z", "--slices", "2"]
  argv = ["--dry-run"] + argv if flag_first else argv + ["--dry-run"]
  assert pod.main(argv) == 0
  printed = capsys.readouterr().out.splitlines()
  expected = [shlex.join(cmd) for step in steps(*argv) for cmd in step]
  assert printed == expected and len(printed) == 5


def test_gcloud_missing_from_path_is_one_clear_error(no_subprocess, monkeypatch, capsys):
  monkeypatch.setattr(shutil, "which", lambda program: None)
  assert pod.main(["delete", "--name", "r", "--zone", "z"]) == 2
  assert capsys.readouterr().err.startswith(
      "pod.py: gcloud not found: install the Google Cloud SDK")


def test_a_failing_node_fails_the_run_and_is_named(monkeypatch, capsys):
  events = []

  class FakeProcess:
    def __init__(self, cmd):
      self.node = cmd[5]  # gcloud compute tpus tpu-vm ssh NODE ...
      events.append(("start", self.node))

    def wait(self):
      events.append(("wait", self.node))
      return 5 if self.node == "ms1-1" else 0

  monkeypatch.setattr(shutil, "which", lambda program: "/usr/bin/" + program)
  monkeypatch.setattr(subprocess, "Popen", FakeProcess)
  assert pod.main(["run", "--name", "ms1", "--zone", "z", "--slices", "2", "--", "true"]) == 5
  # Both slices start before either is waited for, and both are waited for.
  assert events == [("start", "ms1-0"), ("start", "ms1-1"), ("wait", "ms1-0"), ("wait", "ms1-1")]
  (line,) = capsys.readouterr().err.splitlines()
  assert line.startswith("pod.py: command failed (exit 5): gcloud compute tpus tpu-vm ssh ms1-1 ")


# ---------------------------------------------------------------- bad input

@pytest.mark.parametrize("argv, message", [
    (["create", "--name", "r", "--zone", "z", "--type", "v5p"],
     "argument --type: 'v5p' is not <generation>-<count>"),
    (["create", "--name", "r", "--zone", "z", "--type", "v5p-128", "--slices", "0"],
     "argument --slices: '0': need a whole number of slices >= 1"),
    (["create", "--name", "r", "--zone", "z", "--type", "v9x-8"],
     "--type v9x-8: no default software version for this generation; pass --version"),
    (["run", "--name", "r", "--zone", "z", "--"], "run: give the command after --"),
    (["run", "--name", "r", "--zone", "z"], "run: give the command after --"),
    (["delete", "--zone", "z"], "the following arguments are required: --name"),
    (["delete", "--name", "r"], "the following arguments are required: --zone"),
    (["status", "--name", "r", "--zone", "z", "--", "ls"], "status: only run takes a command"),
    (["ssh", "--name", "r", "--zone", "z", "--slice", "1"], "--slice 1: must be in 0..0"),
    (["setup", "--name", "r", "--zone", "z", "--bucket", "gs://b/dir"], "argument --bucket"),
    (["setup", "--name", "r", "--zone", "z", "--mount", "mnt"], "argument --mount: 'mnt'"),
])
def test_bad_input_is_one_usage_error(no_subprocess, capsys, argv, message):
  with pytest.raises(SystemExit) as exit_:
    pod.main(argv)
  assert exit_.value.code == 2
  err = capsys.readouterr().err
  assert err.count("error:") == 1 and message in err

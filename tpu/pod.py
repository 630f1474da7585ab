"""Create, set up, run on and delete Cloud TPU VMs, pod slices and multislice jobs with gcloud.

    # One v5p-128 pod slice (16 hosts), data and checkpoints in a GCS bucket:
    python tpu/pod.py create --name run1 --zone us-east5-a --type v5p-128
    python tpu/pod.py setup  --name run1 --zone us-east5-a --bucket my-bucket --mount /mnt/bucket
    python tpu/pod.py run    --name run1 --zone us-east5-a -- cm3leon train --config cm3leon_350m \\
        --config.workdir=/mnt/bucket/run1 --config.data.data_dir=/mnt/bucket/data
    python tpu/pod.py delete --name run1 --zone us-east5-a

    # Two v5p-128 slices joined over the data-center network (multislice, queued resources):
    python tpu/pod.py create --name ms1 --zone us-east5-a --type v5p-128 --slices 2
    python tpu/pod.py status --name ms1 --zone us-east5-a --slices 2    # until state is ACTIVE
    python tpu/pod.py setup  --name ms1 --zone us-east5-a --slices 2 --bucket my-bucket
    python tpu/pod.py run    --name ms1 --zone us-east5-a --slices 2 --background -- \\
        cm3leon train --config cm3leon_350m --config.workdir=/mnt/bucket/ms1 \\
        --config.data.data_dir=/mnt/bucket/data
    python tpu/pod.py delete --name ms1 --zone us-east5-a --slices 2

    python tpu/pod.py --dry-run setup --name run1 --zone us-east5-a   # print the commands only

One slice is one TPU VM node NAME (`gcloud compute tpus tpu-vm create`); N > 1 slices are one
queued resource NAME whose nodes are NAME-0 ... NAME-(N-1) (`queued-resources create
--node-count=N --node-prefix=NAME`). Every command that touches the workers goes to every
worker of every node (`--worker=all`, one gcloud per node, started together). `setup` packs the
committed tree (`git archive HEAD`: uncommitted edits are not shipped), unpacks it into
~/cm3leon_jax on every worker, makes a Python 3.11 venv there and runs
`pip install -r requirements-tpu.txt -e .`. `run` runs the command after `--` in ~/cm3leon_jax
with that venv active and tees each worker's output to ~/cm3leon_jax/logs/LOG-HOSTNAME.log, so
a dropped ssh loses nothing; with --background it starts it under nohup and returns. gcloud's
help asks for `ssh-add ~/.ssh/google_compute_engine` before commands that target several
workers.

Storage: every worker must see the same workdir and data directory (Orbax multi-host
checkpoints and the input pipeline use plain file paths). The supported way is a GCS bucket
mounted with gcsfuse at the same path on every worker (`setup --bucket B --mount /mnt/bucket`;
the mount does not survive a reboot: run setup again), or an NFS/Filestore mount you provide.
`run` exports CM3LEON_DISTRIBUTED=1, so the project's multi-host commands (train, sft, export)
call jax.distributed.initialize() without arguments, which finds the workers (and the slices
of a multislice job) from the TPU VM's environment and metadata; `run` adds no coordinator
flags: every worker runs the same command.

These commands were written from gcloud's and gcsfuse's documentation (tpu-vm create / ssh /
scp / delete / describe, queued-resources create / describe / delete, the TPU software versions
page, the multislice node naming of the TPU API) and are checked by unit tests of the
constructed commands (tests/test_tpu_pod.py); they have not been run against a real Cloud TPU
from this project, which has no network to Google Cloud. Only the standard library is imported,
so this runs on a laptop that has gcloud.
"""

from __future__ import annotations

import argparse
import os
import re
import shlex
import shutil
import subprocess
import sys
import tempfile

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TARBALL = os.path.join(tempfile.gettempdir(), "cm3leon_jax.tar.gz")
REMOTE_DIR = "~/cm3leon_jax"
TPUS = ["gcloud", "compute", "tpus"]
# Default runtime (software) version per accelerator generation, from the "PyTorch and JAX"
# table of cloud.google.com/tpu/docs/runtimes: v6e -> v2-alpha-tpuv6e, v5p -> v2-alpha-tpuv5,
# v5e (accelerator type v5litepod-N) -> v2-alpha-tpuv5-lite, v4 and older -> tpu-ubuntu2204-base.
# (Some guides use tpu-ubuntu2204-base for v5p too; the runtimes page lists v2-alpha-tpuv5.)
DEFAULT_VERSIONS = {"v2": "tpu-ubuntu2204-base", "v3": "tpu-ubuntu2204-base",
                    "v4": "tpu-ubuntu2204-base", "v5p": "v2-alpha-tpuv5",
                    "v5litepod": "v2-alpha-tpuv5-lite", "v6e": "v2-alpha-tpuv6e"}
# Waits for the dpkg lock instead of failing: a fresh TPU VM often runs unattended-upgrades.
APT = "sudo apt-get -o DPkg::Lock::Timeout=600"
TOOL_HINTS = {
    "gcloud": "gcloud not found: install the Google Cloud SDK "
              "(https://cloud.google.com/sdk/docs/install), then run `gcloud auth login`",
    "git": "git not found: setup packs the repository with `git archive`",
}

# One step: commands (argv lists) started together; the step ends when all have exited.
Step = list[list[str]]


# ---------------------------------------------------------------- argument checks

def accelerator_type(text: str) -> str:
  if not re.fullmatch(r"v\d+[a-z]*-[1-9]\d*", text):
    raise argparse.ArgumentTypeError(
        f"{text!r} is not <generation>-<count>, e.g. v5p-128, v5litepod-16, v6e-256, v4-32")
  return text


def slice_count(text: str) -> int:
  if not re.fullmatch(r"\d+", text) or int(text) < 1:
    raise argparse.ArgumentTypeError(f"{text!r}: need a whole number of slices >= 1")
  return int(text)


def bucket_name(text: str) -> str:
  name = text.removeprefix("gs://").rstrip("/")
  if not name or "/" in name:
    raise argparse.ArgumentTypeError(f"{text!r}: give a bucket name such as my-bucket (or "
                                     "gs://my-bucket); gcsfuse mounts the whole bucket")
  return name


def mount_path(text: str) -> str:
  if not text.startswith("/"):
    raise argparse.ArgumentTypeError(f"{text!r}: need an absolute path such as /mnt/bucket")
  return text


def python_name(text: str) -> str:
  # The name doubles as the apt package (python3.11, python3.11-venv) installed when missing.
  if not re.fullmatch(r"python3\.\d+", text):
    raise argparse.ArgumentTypeError(f"{text!r}: need an interpreter name such as python3.11")
  return text


def log_name(text: str) -> str:
  if not re.fullmatch(r"[A-Za-z0-9_.-]+", text):
    raise argparse.ArgumentTypeError(f"{text!r}: need a plain file-name stem such as run1")
  return text


# ---------------------------------------------------------------- command construction

def node_names(args) -> list[str]:
  """The TPU VM nodes: NAME for one slice; NAME-0 ... NAME-(N-1) for N, the names the TPU API
  gives the nodes of a multislice queued resource created with node_id_prefix NAME."""
  if args.slices == 1:
    return [args.name]
  return [f"{args.name}-{i}" for i in range(args.slices)]


def location(args) -> list[str]:
  return [f"--zone={args.zone}"] + ([f"--project={args.project}"] if args.project else [])


def ssh(args, node: str, script: str) -> list[str]:
  # --command is one argv element: no local shell sees it; the worker's login shell (bash on
  # the Ubuntu TPU images) runs it.
  return TPUS + ["tpu-vm", "ssh", node] + location(args) + ["--worker=all", f"--command={script}"]


def default_version(accelerator: str) -> str | None:
  return DEFAULT_VERSIONS.get(accelerator.rsplit("-", 1)[0])


def create_steps(args) -> list[Step]:
  version = args.version or default_version(args.type)
  spot = ["--spot"] if args.spot else []
  if args.slices == 1:
    # The Create Node API: fails at once when the zone has no capacity (queued resources wait).
    return [[TPUS + ["tpu-vm", "create", args.name] + location(args)
             + [f"--accelerator-type={args.type}", f"--version={version}"] + spot]]
  # Multislice must use queued resources; the nodes become NAME-0 ... NAME-(N-1).
  return [[TPUS + ["queued-resources", "create", args.name] + location(args)
           + [f"--accelerator-type={args.type}", f"--runtime-version={version}",
              f"--node-count={args.slices}", f"--node-prefix={args.name}"] + spot]]


def install_script(python: str) -> str:
  """Unpack the tarball into ~/cm3leon_jax and install the repo into a venv there. The TPU
  images are Ubuntu 22.04 (Python 3.10) and the project needs 3.11, so the interpreter and its
  venv module come from apt when missing."""
  return " && ".join([
      f"({python} -c 'import ensurepip' 2>/dev/null"
      f" || ({APT} update && {APT} install -y {python} {python}-venv))",
      f"mkdir -p {REMOTE_DIR}/logs",
      f"tar -xzf ~/cm3leon_jax.tar.gz -C {REMOTE_DIR}",
      f"cd {REMOTE_DIR}",
      f"{python} -m venv .venv",
      ".venv/bin/pip install --upgrade pip",
      ".venv/bin/pip install -r requirements-tpu.txt -e .",
  ])


def mount_script(bucket: str, mount: str) -> str:
  """Install gcsfuse from Google's apt repository when missing and mount the bucket as this
  user (gcsfuse's docs: not as root). --implicit-dirs shows folders that exist only as object
  name prefixes, as `gcloud storage cp -r` leaves them."""
  repo = ('echo "deb [signed-by=/usr/share/keyrings/cloud.google.asc] '
          'https://packages.cloud.google.com/apt gcsfuse-$(lsb_release -c -s) main"'
          " | sudo tee /etc/apt/sources.list.d/gcsfuse.list")
  key = ("curl -fsSL https://packages.cloud.google.com/apt/doc/apt-key.gpg"
         " | sudo tee /usr/share/keyrings/cloud.google.asc >/dev/null")
  where = shlex.quote(mount)
  return " && ".join([
      f"(command -v gcsfuse >/dev/null || ({repo} && {key} && {APT} update"
      f" && {APT} install -y gcsfuse))",
      f"sudo mkdir -p {where}",
      f"sudo chown $(id -u):$(id -g) {where}",
      f"(mountpoint -q {where} || gcsfuse --implicit-dirs {shlex.quote(bucket)} {where})",
  ])


def setup_steps(args) -> list[Step]:
  nodes = node_names(args)
  steps = [
      [["git", "-C", REPO_ROOT, "archive", "--format=tar.gz", f"--output={TARBALL}", "HEAD"]],
      [TPUS + ["tpu-vm", "scp", TARBALL, f"{node}:cm3leon_jax.tar.gz"] + location(args)
       + ["--worker=all"] for node in nodes],
      [ssh(args, node, install_script(args.python)) for node in nodes],
  ]
  if args.bucket:
    steps.append([ssh(args, node, mount_script(args.bucket, args.mount)) for node in nodes])
  return steps


def run_script(command: list[str], log: str, background: bool) -> str:
  """The worker-side shell line: the command's words are shell-quoted, so they arrive as typed."""
  words = shlex.join(command)
  log_file = f"logs/{log}-$(hostname).log"
  # CM3LEON_DISTRIBUTED: the trainer's jax.distributed.initialize() (cm3leon_jax/train/trainer.py)
  # even where the worker list lives only in the VM metadata, not in the environment.
  enter = (f"cd {REMOTE_DIR} && . .venv/bin/activate && export CM3LEON_DISTRIBUTED=1 && "
           "mkdir -p logs && ")
  if background:
    # Detached from the ssh session's stdio so the ssh returns while the job runs.
    return enter + f"(nohup {words} >> {log_file} 2>&1 < /dev/null &)"
  # pipefail: the exit status is the command's, not tee's.
  return "set -o pipefail; " + enter + f"{words} 2>&1 | tee -a {log_file}"


def run_steps(args) -> list[Step]:
  script = run_script(args.command, args.log, args.background)
  return [[ssh(args, node, script) for node in node_names(args)]]


def status_steps(args) -> list[Step]:
  kind = ["tpu-vm"] if args.slices == 1 else ["queued-resources"]
  return [[TPUS + kind + ["describe", args.name] + location(args)]]


def ssh_steps(args) -> list[Step]:
  node = node_names(args)[args.slice]
  return [[TPUS + ["tpu-vm", "ssh", node] + location(args) + [f"--worker={args.worker}"]]]


def delete_steps(args) -> list[Step]:
  if args.slices == 1:
    return [[TPUS + ["tpu-vm", "delete", args.name] + location(args) + ["--quiet"]]]
  # --force deletes the running nodes first, then the queued resource.
  return [[TPUS + ["queued-resources", "delete", args.name] + location(args)
           + ["--force", "--quiet"]]]


STEPS = {"create": create_steps, "setup": setup_steps, "run": run_steps,
         "status": status_steps, "ssh": ssh_steps, "delete": delete_steps}


# ---------------------------------------------------------------- command line

def build_parser() -> argparse.ArgumentParser:
  p = argparse.ArgumentParser(prog="pod.py", description=__doc__,
                              formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--dry-run", action="store_true", help="print the commands, run nothing")
  common = argparse.ArgumentParser(add_help=False)
  common.add_argument("--name", required=True, help="TPU VM (1 slice) or queued resource name")
  common.add_argument("--zone", required=True, help="e.g. us-east5-a")
  common.add_argument("--project", help="Google Cloud project (default: gcloud's)")
  common.add_argument("--slices", type=slice_count, default=1,
                      help="number of slices; > 1 is a multislice queued resource")
  # Also accepted after the subcommand; SUPPRESS keeps it from resetting a global --dry-run.
  common.add_argument("--dry-run", action="store_true", default=argparse.SUPPRESS,
                      help="print the commands, run nothing")
  sub = p.add_subparsers(dest="action", required=True,
                         metavar="{create,setup,run,status,ssh,delete}")

  create = sub.add_parser("create", parents=[common], help="create the TPU VM(s)")
  create.add_argument("--type", required=True, type=accelerator_type,
                      help="accelerator type, e.g. v5p-128, v5litepod-16, v6e-256, v4-32")
  create.add_argument("--version", help="TPU software (runtime) version "
                      "(default by generation: " + ", ".join(
                          f"{k}: {v}" for k, v in DEFAULT_VERSIONS.items()) + ")")
  create.add_argument("--spot", action="store_true", help="Spot capacity (can be preempted)")

  setup = sub.add_parser("setup", parents=[common],
                         help="copy and install the repo on every worker")
  setup.add_argument("--bucket", type=bucket_name, help="GCS bucket to mount with gcsfuse")
  setup.add_argument("--mount", type=mount_path, default="/mnt/bucket",
                     help="where --bucket is mounted on every worker (default /mnt/bucket)")
  setup.add_argument("--python", type=python_name, default="python3.11",
                     help="interpreter of the venv (default python3.11)")

  run = sub.add_parser("run", parents=[common], help="run the command after -- on every worker",
                       usage="pod.py run --name NAME --zone ZONE [options] -- COMMAND ...")
  run.add_argument("--background", action="store_true", help="start under nohup and return")
  run.add_argument("--log", type=log_name, default="run",
                   help="log file stem: ~/cm3leon_jax/logs/LOG-HOSTNAME.log (default run)")

  sub.add_parser("status", parents=[common], help="describe the TPU VM or queued resource")
  ssh_p = sub.add_parser("ssh", parents=[common], help="interactive shell on one worker")
  ssh_p.add_argument("--worker", default="0", help="worker index (default 0)")
  ssh_p.add_argument("--slice", type=int, default=0, help="slice index (default 0)")
  sub.add_parser("delete", parents=[common], help="delete the TPU VM or queued resource")
  return p


def parse(argv: list[str]) -> argparse.Namespace:
  """Everything after the first `--` is the remote command of `run`, kept word for word."""
  split = argv.index("--") if "--" in argv else len(argv)
  parser = build_parser()
  args = parser.parse_args(argv[:split])
  args.command = argv[split + 1:]
  if args.action == "run" and not args.command:
    parser.error("run: give the command after --, e.g. run --name N --zone Z -- cm3leon train ...")
  if args.action != "run" and split < len(argv):
    parser.error(f"{args.action}: only run takes a command after --")
  if args.action == "create" and not (args.version or default_version(args.type)):
    parser.error(f"--type {args.type}: no default software version for this generation; "
                 "pass --version (see cloud.google.com/tpu/docs/runtimes)")
  if args.action == "ssh" and not 0 <= args.slice < args.slices:
    parser.error(f"--slice {args.slice}: must be in 0..{args.slices - 1} "
                 f"for --slices {args.slices}")
  return args


def missing_tool(steps: list[Step]) -> str | None:
  for program in dict.fromkeys(cmd[0] for step in steps for cmd in step):
    if shutil.which(program) is None:
      return TOOL_HINTS.get(program, f"{program} not found on PATH")
  return None


def execute(steps: list[Step]) -> int:
  """Runs the steps in order; the commands of one step run at once and all are waited for.
  Returns 0, or the exit status of the first failed command of the first failing step."""
  for step in steps:
    started = [(cmd, subprocess.Popen(cmd)) for cmd in step]
    failed = [(cmd, code) for cmd, code in ((c, p.wait()) for c, p in started) if code != 0]
    for cmd, code in failed:
      print(f"pod.py: command failed (exit {code}): {shlex.join(cmd)}", file=sys.stderr)
    if failed:
      code = failed[0][1]
      return code if code > 0 else 1  # a negative code is a signal
  return 0


def main(argv: list[str] | None = None) -> int:
  args = parse(sys.argv[1:] if argv is None else argv)
  steps = STEPS[args.action](args)
  if args.dry_run:
    for step in steps:
      for cmd in step:
        print(shlex.join(cmd))
    return 0
  problem = missing_tool(steps)
  if problem:
    print(f"pod.py: {problem}", file=sys.stderr)
    return 2
  return execute(steps)


if __name__ == "__main__":
  sys.exit(main())

"""Transparent huge pages for XLA's CPU buffers: the `cm3leon` command restarts itself once
with glibc's `glibc.malloc.hugetlb=1` tunable.

Why: XLA on the CPU gets fresh host memory for every step's temporaries and outputs (strace:
one ~110 MB mmap and munmap per quickstart train step), and the kernel maps each 4 KiB page
on first touch. On the quickstart decoder (d=128, batch 4 x 384) that was ~28,000 page
faults and ~45 ms of kernel CPU time (both threads) per 86 ms train step (`/usr/bin/time -v`:
2.8M minor faults over ~100 steps). With `glibc.malloc.hugetlb=1` (glibc >= 2.35),
malloc asks for transparent huge pages (`madvise(MADV_HUGEPAGE)`), which the kernel maps
2 MiB at a time: 0.21M faults, and on this project's 2-core AMD EPYC (Debian 12, glibc 2.36,
THP mode `madvise`) the quickstart train step went 0.085 -> 0.064-0.077 s and the `bench`
preset's 4.19 -> 3.64 s and 4.78 -> 4.00 s (experiments/bench/train_step.py, same machine,
back to back).

The tunable is read when the process starts, so it cannot be switched on from inside Python:
`main()` re-executes the same command line once with it set. Nothing happens where it cannot
help: not Linux/glibc, glibc < 2.35, THP mode `never` (no huge pages) or `always` (already
huge), the tunable already set by the user, or `CM3LEON_HUGEPAGES=0` (opt out).
"""

from __future__ import annotations

import os
import platform
import sys
from typing import Mapping, Sequence

TUNABLE = "glibc.malloc.hugetlb"
OPT_OUT = "CM3LEON_HUGEPAGES"
THP_MODE_FILE = "/sys/kernel/mm/transparent_hugepage/enabled"
MIN_GLIBC = (2, 35)  # the first glibc with glibc.malloc.hugetlb


def thp_mode(path: str = THP_MODE_FILE) -> str | None:
  """The kernel's transparent-huge-page mode ('always', 'madvise', 'never'), None if unknown."""
  try:
    with open(path) as f:
      text = f.read()
  except OSError:
    return None
  # The file lists every mode with the active one in brackets: "always [madvise] never".
  start, end = text.find("["), text.find("]")
  return text[start + 1:end] if 0 <= start < end else None


def glibc_version() -> tuple[int, ...] | None:
  name, version = platform.libc_ver()
  if name != "glibc" or not version:
    return None
  try:
    return tuple(int(part) for part in version.split("."))
  except ValueError:
    return None


def tunable_setting(environ: Mapping[str, str]) -> str | None:
  """The value GLIBC_TUNABLES gives glibc.malloc.hugetlb ("name=value:name=value"), or None."""
  for item in environ.get("GLIBC_TUNABLES", "").split(":"):
    name, _, value = item.partition("=")
    if name == TUNABLE:
      return value
  return None


def should_reexec(environ: Mapping[str, str], system: str, glibc: tuple[int, ...] | None,
                  thp: str | None) -> bool:
  """Whether restarting with the tunable would change how this process gets memory."""
  if environ.get(OPT_OUT, "1") == "0" or tunable_setting(environ) is not None:
    return False
  return system == "Linux" and glibc is not None and glibc >= MIN_GLIBC and thp == "madvise"


def with_tunable(environ: Mapping[str, str]) -> dict[str, str]:
  """A copy of environ with the tunable appended to any tunables already there."""
  env = dict(environ)
  existing = env.get("GLIBC_TUNABLES", "")
  env["GLIBC_TUNABLES"] = f"{existing}:{TUNABLE}=1" if existing else f"{TUNABLE}=1"
  return env


def reexec_with_hugepages(orig_argv: Sequence[str] | None = None) -> None:
  """Replace this process with the same command line plus the tunable; return if not needed.

  Call it first thing in an entry point, before JAX allocates anything (afterwards the restart
  would only waste the work done so far). The restarted process sees the tunable set and does
  not restart again.
  """
  argv = list(sys.orig_argv if orig_argv is None else orig_argv)
  if len(argv) < 2 or not should_reexec(os.environ, platform.system(), glibc_version(),
                                        thp_mode()):
    return
  sys.stdout.flush()
  sys.stderr.flush()
  os.execve(sys.executable, [sys.executable, *argv[1:]], with_tunable(os.environ))


def active(environ: Mapping[str, str], thp: str | None) -> bool:
  """Whether this process's malloc gets transparent huge pages."""
  return thp == "always" or (thp == "madvise" and tunable_setting(environ) == "1")


def slow_memory_note(environ: Mapping[str, str] | None = None, system: str | None = None,
                     thp: str | None = None) -> str | None:
  """One line for long CPU jobs when huge pages are off on Linux (None when on, or elsewhere)."""
  environ = os.environ if environ is None else environ
  system = platform.system() if system is None else system
  thp = thp_mode() if thp is None else thp
  if system != "Linux" or active(environ, thp):
    return None
  if environ.get(OPT_OUT) == "0":
    why = f"{OPT_OUT}=0"
  elif thp != "madvise":
    why = f"transparent huge pages: {thp or 'unknown'}"
  else:  # THP on request but the restart did not ask: an older glibc, or not via `cm3leon`
    why = f"{TUNABLE} not set; it needs glibc >= 2.35"
  return (f"note: no huge pages for XLA's CPU buffers ({why}); train steps run ~1.25x slower "
          "(cm3leon_jax/hugepages.py)")

"""The CLI's restart with glibc's huge-page tunable (cm3leon_jax/hugepages.py)."""

import os
import platform
import subprocess
import sys

import pytest

from cm3leon_jax import hugepages

LINUX, GLIBC = "Linux", (2, 36)


@pytest.mark.parametrize("text, mode", [("always [madvise] never\n", "madvise"),
                                        ("[always] madvise never\n", "always"),
                                        ("always madvise [never]\n", "never"),
                                        ("garbage\n", None)])
def test_thp_mode_is_the_bracketed_word(tmp_path, text, mode):
  path = tmp_path / "enabled"
  path.write_text(text)
  assert hugepages.thp_mode(str(path)) == mode


def test_thp_mode_of_a_missing_file_is_unknown(tmp_path):
  assert hugepages.thp_mode(str(tmp_path / "absent")) is None


def test_restarts_on_linux_glibc_with_thp_on_request():
  assert hugepages.should_reexec({}, LINUX, GLIBC, "madvise")
  assert hugepages.should_reexec({}, LINUX, (2, 35), "madvise")


@pytest.mark.parametrize("environ, system, glibc, thp", [
    ({"CM3LEON_HUGEPAGES": "0"}, LINUX, GLIBC, "madvise"),  # opted out
    ({"GLIBC_TUNABLES": "glibc.malloc.hugetlb=0"}, LINUX, GLIBC, "madvise"),  # user's choice
    ({"GLIBC_TUNABLES": "glibc.malloc.hugetlb=1"}, LINUX, GLIBC, "madvise"),  # restarted
    ({}, "Darwin", None, None),
    ({}, LINUX, None, "madvise"),  # musl
    ({}, LINUX, (2, 31), "madvise"),  # glibc without the tunable
    ({}, LINUX, GLIBC, "always"),  # every page already huge
    ({}, LINUX, GLIBC, "never"),  # no huge pages to ask for
    ({}, LINUX, GLIBC, None),
])
def test_no_restart_where_it_cannot_help(environ, system, glibc, thp):
  assert not hugepages.should_reexec(environ, system, glibc, thp)


def test_the_tunable_is_appended_to_the_users_tunables():
  assert hugepages.with_tunable({})["GLIBC_TUNABLES"] == "glibc.malloc.hugetlb=1"
  env = hugepages.with_tunable({"GLIBC_TUNABLES": "glibc.malloc.arena_max=2", "A": "b"})
  assert env == {"GLIBC_TUNABLES": "glibc.malloc.arena_max=2:glibc.malloc.hugetlb=1", "A": "b"}


PROBE = ("import os, sys; from cm3leon_jax import hugepages; hugepages.reexec_with_hugepages(); "
         "print(os.environ.get('GLIBC_TUNABLES'), sys.argv[1:])")


def _probe(extra_env):
  env = {k: v for k, v in os.environ.items() if k not in ("GLIBC_TUNABLES", "CM3LEON_HUGEPAGES")}
  env.update(extra_env)
  out = subprocess.run([sys.executable, "-c", PROBE, "arg1", "--flag=2"], env=env,
                       capture_output=True, text=True, timeout=60, check=True)
  return out.stdout.strip()


def test_the_restarted_process_has_the_tunable_and_the_same_arguments_once():
  expected = ("glibc.malloc.hugetlb=1" if hugepages.should_reexec(
      {}, platform.system(), hugepages.glibc_version(), hugepages.thp_mode()) else "None")
  # One line: the restarted process did not restart again (or nothing restarted).
  assert _probe({}) == f"{expected} ['arg1', '--flag=2']"


def test_opting_out_leaves_the_environment_alone():
  assert _probe({"CM3LEON_HUGEPAGES": "0"}) == "None ['arg1', '--flag=2']"


def test_active_means_thp_always_or_the_tunable_under_madvise():
  assert hugepages.active({}, "always")
  assert hugepages.active({"GLIBC_TUNABLES": "a=1:glibc.malloc.hugetlb=1"}, "madvise")
  assert not hugepages.active({"GLIBC_TUNABLES": "glibc.malloc.hugetlb=0"}, "madvise")
  assert not hugepages.active({}, "madvise")
  assert not hugepages.active({"GLIBC_TUNABLES": "glibc.malloc.hugetlb=1"}, "never")


def test_a_note_names_why_huge_pages_are_off_and_nothing_when_on():
  on = {"GLIBC_TUNABLES": "glibc.malloc.hugetlb=1"}
  assert hugepages.slow_memory_note(on, LINUX, "madvise") is None
  assert hugepages.slow_memory_note({}, "Darwin", None) is None
  assert "CM3LEON_HUGEPAGES=0" in hugepages.slow_memory_note({"CM3LEON_HUGEPAGES": "0"}, LINUX,
                                                             "madvise")
  assert "transparent huge pages: never" in hugepages.slow_memory_note({}, LINUX, "never")
  assert "glibc.malloc.hugetlb not set" in hugepages.slow_memory_note({}, LINUX, "madvise")

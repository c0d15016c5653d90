"""A worker's child dies with its parent, and still starts when routerd is PID 1."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

SPAWN = ("import subprocess, sys; from routerd.workers.process import child_setup; "
         "r = subprocess.run([sys.executable, '-c', 'print(\"child ran\")'], "
         "preexec_fn=child_setup(), capture_output=True, text=True, timeout=30); "
         "print(r.returncode, r.stdout.strip())")


def test_a_child_starts_under_a_normal_parent() -> None:
    r = subprocess.run([sys.executable, "-c", SPAWN], capture_output=True, text=True,
                       timeout=60)
    assert r.stdout.strip() == "0 child ran", r.stderr


def test_a_child_starts_when_routerd_is_pid_1() -> None:
    # a container without an init: routerd is PID 1, so "parent is 1" does not mean orphaned
    if os.geteuid() != 0:  # unshare is util-linux, on every Debian machine
        pytest.skip("needs root for a PID namespace")
    r = subprocess.run(["unshare", "--pid", "--fork", "--kill-child", sys.executable, "-c",
                        "import os; assert os.getpid() == 1; " + SPAWN],
                       capture_output=True, text=True, timeout=60)
    assert r.stdout.strip() == "0 child ran", r.stderr

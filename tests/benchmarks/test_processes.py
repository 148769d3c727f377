"""The benchmark's children die with it, even when it is killed with SIGKILL.

A stand-in benchmark (a real process) starts a child through ``services.Processes``; the child
forks a grandchild into its process group, as uvicorn's workers are. Killing the stand-in with
SIGKILL, which no handler sees, must take both with it: the child by its parent-death signal,
the grandchild by the watchdog killing the group.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import pytest

SCRIPTS = Path(__file__).resolve().parents[2] / "scripts" / "benchmarks"

pytestmark = pytest.mark.skipif(sys.platform != "linux", reason="prctl and /proc are Linux's")

# The child: forks a grandchild into its own group, writes both pids, then waits forever.
CHILD = """
import os, sys, time
pid = os.fork()
if pid == 0:
    while True:
        time.sleep(60)
with open(sys.argv[1] + ".tmp", "w") as f:
    f.write(f"{os.getpid()} {pid}")
os.replace(sys.argv[1] + ".tmp", sys.argv[1])
while True:
    time.sleep(60)
"""

# The stand-in benchmark: starts the child the way the orchestrator starts every server.
PARENT = """
import sys, time
from pathlib import Path
sys.path.insert(0, sys.argv[1])
from services import Processes
procs = Processes()
procs.start([sys.executable, "-c", sys.argv[2], sys.argv[3]], {}, Path(sys.argv[3] + ".log"))
while True:
    time.sleep(60)
"""


def _gone(pid: int) -> bool:
    """True once ``pid`` has exited (a zombie waiting for its reaper counts as exited)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return True
    return stat[stat.rindex(")") + 2] in "ZX"


def _wait_for(predicate: Callable[[], bool], timeout: float) -> bool:
    """Poll ``predicate`` until it holds or ``timeout`` seconds pass (a bound, not a wait)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.05)
    return bool(predicate())


def test_children_die_when_the_benchmark_is_killed(tmp_path: Path) -> None:
    pids_file = tmp_path / "pids"
    parent = subprocess.Popen(
        [sys.executable, "-c", PARENT, str(SCRIPTS), CHILD, str(pids_file)],
        start_new_session=True,
    )
    try:
        assert _wait_for(pids_file.exists, 30), "the child never reported its pids"
        child, grandchild = (int(p) for p in pids_file.read_text().split())
        assert os.getpgid(grandchild) == child  # same group, as uvicorn's workers
        assert not _gone(child)
        assert not _gone(grandchild)

        parent.kill()  # SIGKILL: no handler, no finally, no atexit
        parent.wait(10)

        assert _wait_for(lambda: _gone(child), 10), "the child outlived the benchmark"
        assert _wait_for(lambda: _gone(grandchild), 10), "the grandchild outlived it"
    finally:
        for pid in _read_pids(pids_file):
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(pid, signal.SIGKILL)
        if parent.poll() is None:
            parent.kill()
            parent.wait(10)


def _read_pids(path: Path) -> list[int]:
    try:
        return [int(p) for p in path.read_text().split()[:1]]
    except (OSError, ValueError):
        return []

"""The benchmark's watchdog: when the benchmark dies, however it dies, its children die too.

    python scripts/benchmarks/watchdog.py --parent PID --groups FILE

``services.Processes`` starts it once, in a session of its own, and keeps ``FILE`` up to date:
one line per process group it started (``group PGID``) and per git worktree it made
(``worktree REPO<TAB>PATH``). The watchdog polls the benchmark's pid; once it is gone (even
after SIGKILL, which no handler sees) it kills every listed group with SIGKILL, removes the
listed worktrees, deletes ``FILE`` and exits. The parent-death signal each child gets
(``services._child_setup``) covers the group leaders at once; this covers what they forked.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import signal
import subprocess
import time
from pathlib import Path

POLL_S = 0.2


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    # A zombie still answers kill(0): the benchmark has died but is not reaped yet.
    with contextlib.suppress(OSError):
        stat = Path(f"/proc/{pid}/stat").read_text()
        return stat[stat.rindex(")") + 2] != "Z"
    return True


def clean_up(groups_file: Path) -> None:
    try:
        lines = groups_file.read_text().splitlines()
    except OSError:
        return
    for line in lines:
        kind, _, value = line.partition(" ")
        if kind == "group":
            with contextlib.suppress(ProcessLookupError, PermissionError, ValueError):
                os.killpg(int(value), signal.SIGKILL)
    for line in lines:
        kind, _, value = line.partition(" ")
        if kind == "worktree":
            repo, _, path = value.partition("\t")
            subprocess.run(
                ["git", "-C", repo, "worktree", "remove", "--force", path],
                check=False,
                capture_output=True,
                timeout=60,
            )
    with contextlib.suppress(OSError):
        groups_file.unlink()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--parent", type=int, required=True)
    parser.add_argument("--groups", type=Path, required=True)
    args = parser.parse_args()
    # Stopped on purpose by the benchmark (SIGKILL) once it has cleaned up itself; anything
    # else (a terminal's SIGINT or SIGHUP) must not stop it before its parent is gone.
    for sig in (signal.SIGINT, signal.SIGHUP, signal.SIGTERM):
        signal.signal(sig, signal.SIG_IGN)
    while _alive(args.parent) and os.getppid() == args.parent:
        time.sleep(POLL_S)
    clean_up(args.groups)


if __name__ == "__main__":
    main()

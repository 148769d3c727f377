"""The code a benchmark measures: one commit, checked out in a git worktree of its own.

The servers, the reference servers and the load client all run from that worktree, so a commit
made in the main checkout while a benchmark runs changes nothing it measures, and every figure
can name the commit it came from. The worktree is detached (no branch to clean up) and removed
when the benchmark ends; if the benchmark is killed, its watchdog removes it
(``services.Processes.add_cleanup``).

Its environment is either built there from ``uv.lock`` (``uv sync --locked --extra bench``, uv
from PATH or the Makefile's ``.uv-bootstrap``) or an existing interpreter given with
``--python``, which then imports threadline from the worktree's ``src`` (checked before the
run: an interpreter that would import another copy is refused).
"""

from __future__ import annotations

import os
import shutil
import subprocess
import tempfile
from dataclasses import dataclass
from pathlib import Path

from services import Processes, tail


@dataclass(frozen=True, slots=True)
class Checkout:
    repo: Path
    path: Path
    sha: str
    python: str

    @property
    def scripts(self) -> Path:
        return self.path / "scripts" / "benchmarks"

    def env(self, base: dict[str, str]) -> dict[str, str]:
        """``base`` with the worktree's threadline first on the import path."""
        env = {k: v for k, v in base.items() if not k.startswith("THREADLINE_")}
        env.pop("VIRTUAL_ENV", None)
        # Harmless for the worktree's own environment (its editable install points here too);
        # decisive for a borrowed one.
        env["PYTHONPATH"] = str(self.path / "src")
        return env

    def threadline_command(self) -> list[str]:
        # `python -m threadline`, not a console script: the script of a borrowed interpreter
        # would import whichever threadline that environment installed.
        return [self.python, "-m", "threadline"]


def _git(repo: Path, *args: str) -> str:
    done = subprocess.run(
        ["git", "-C", str(repo), *args], check=True, capture_output=True, text=True, timeout=120
    )
    return done.stdout.strip()


def find_uv(repo: Path) -> str | None:
    """uv from PATH, else the one the Makefile bootstraps in this checkout or in the main
    checkout of its repository (``repo`` may itself be a linked worktree without one)."""
    found = shutil.which("uv")
    if found:
        return found
    common = Path(_git(repo, "rev-parse", "--path-format=absolute", "--git-common-dir"))
    for root in (repo, common.parent):
        candidate = root / ".uv-bootstrap" / "bin" / "uv"
        if candidate.exists():
            return str(candidate)
    return None


def create(repo: Path, rev: str, python: str | None, procs: Processes) -> Checkout:
    """Check out ``rev`` of ``repo`` into a new temporary worktree and give it an interpreter."""
    sha = _git(repo, "rev-parse", "--verify", f"{rev}^{{commit}}")
    path = Path(tempfile.mkdtemp(prefix=f"threadline-bench-{sha[:8]}-"))
    path.rmdir()  # git creates it; it refuses an existing directory that is not empty
    _git(repo, "worktree", "add", "--detach", str(path), sha)
    procs.add_cleanup(repo, path)
    try:
        if python is None:
            uv = find_uv(repo)
            if uv is None:
                raise RuntimeError("no uv on PATH or in .uv-bootstrap: give --python")
            env = {k: v for k, v in os.environ.items() if k != "VIRTUAL_ENV"}
            cmd = [
                uv,
                "sync",
                "--locked",
                "--compile-bytecode",
                "--extra",
                "bench",
                "--directory",
                str(path),
            ]
            # A child like any other: it dies with the benchmark.
            with tempfile.NamedTemporaryFile(prefix="bench-uv-sync-", suffix=".log") as log:
                sync = procs.start(cmd, env, Path(log.name))
                try:
                    returncode = sync.wait(900)
                except subprocess.TimeoutExpired:
                    returncode = None
                finally:
                    procs.stop(sync)
                if returncode != 0:
                    raise RuntimeError(f"uv sync failed in {path}:\n{tail(Path(log.name))}")
            checkout = Checkout(repo, path, sha, str(path / ".venv" / "bin" / "python"))
        else:
            checkout = Checkout(repo, path, sha, python)
        _check_imports(checkout)
    except BaseException:
        remove(checkout_path=path, repo=repo)
        raise
    return checkout


def _check_imports(checkout: Checkout) -> None:
    """The interpreter must import threadline from the worktree, not from another copy."""
    done = subprocess.run(
        [checkout.python, "-c", "import threadline; print(threadline.__file__)"],
        env=checkout.env(dict(os.environ)),
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    where = Path(done.stdout.strip() or "?").resolve()
    if done.returncode != 0 or not where.is_relative_to(checkout.path.resolve()):
        raise RuntimeError(
            f"{checkout.python} imports threadline from {where} (not the worktree "
            f"{checkout.path}): {done.stderr.strip()[-500:]}"
        )


def remove(checkout_path: Path, repo: Path) -> None:
    subprocess.run(
        ["git", "-C", str(repo), "worktree", "remove", "--force", str(checkout_path)],
        check=False,
        capture_output=True,
        timeout=120,
    )
    shutil.rmtree(checkout_path, ignore_errors=True)

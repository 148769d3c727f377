"""Chaos run: three threadline processes under load while processes die, Redis and PostgreSQL go
down and a process is cut off; then every invariant of ``tests/chaos/checker.py`` is checked.

    python scripts/chaos.py --duration 600 --sessions 1000 --json chaos.json

Needs ``redis-server`` and PostgreSQL's server binaries (``initdb``, ``pg_ctl``) installed; it
starts private instances of both on free ports and never touches the machine's own services.
Exits 1 if any invariant was violated. Server logs stay in ``--logs`` (a new temporary
directory by default) for looking up the ids of the examples printed.
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import json
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT), str(ROOT / "src")]

from tests.chaos.faults import PHASES  # noqa: E402
from tests.chaos.load import LoadConfig  # noqa: E402
from tests.chaos.soak import ChaosConfig, run_chaos  # noqa: E402


def parse(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--duration",
        type=float,
        default=600.0,
        help="seconds of chaos; every phase runs at least once (default 600)",
    )
    parser.add_argument("--sessions", type=int, default=300, help="sessions (default 300)")
    parser.add_argument("--seed", type=int, default=1, help="random seed (default 1)")
    parser.add_argument(
        "--phases",
        default=",".join(PHASES),
        help=f"comma-separated, in order (default {','.join(PHASES)})",
    )
    parser.add_argument(
        "--workers", type=int, default=16, help="sessions in flight at once (default 16)"
    )
    parser.add_argument("--json", type=Path, help="write figures and violations here")
    parser.add_argument("--logs", type=Path, help="directory for server logs (default: temp)")
    args = parser.parse_args(argv)
    unknown = set(args.phases.split(",")) - set(PHASES)
    if unknown:
        parser.error(f"unknown phases {sorted(unknown)}; choose from {', '.join(PHASES)}")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse(argv)
    config = ChaosConfig(
        duration_s=args.duration,
        sessions=args.sessions,
        seed=args.seed,
        phases=tuple(args.phases.split(",")),
        load=LoadConfig(workers=args.workers),
    )
    rundir = args.logs or Path(tempfile.mkdtemp(prefix="threadline-chaos-"))
    rundir.mkdir(parents=True, exist_ok=True)
    result = asyncio.run(run_chaos(config, rundir))
    summary = result.summary()
    summary["command"] = " ".join(["python scripts/chaos.py", *(argv or sys.argv[1:])])
    if args.json:
        args.json.write_text(json.dumps(summary, indent=2, default=str) + "\n")
    print(json.dumps({k: v for k, v in summary.items() if k != "config"}, indent=2, default=str))
    print(f"config: {dataclasses.asdict(config)}", file=sys.stderr)
    return 0 if result.report.ok else 1


if __name__ == "__main__":
    sys.exit(main())

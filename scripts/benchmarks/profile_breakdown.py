"""Where a server's CPU goes, by component, from a py-spy profile in raw (collapsed) format.

    py-spy record --pid PID --duration 10 --rate 200 --nonblocking --format raw -o prof.txt
    python scripts/benchmarks/profile_breakdown.py prof.txt [--cpu-ms-per-request 7.6]

``agent_run_bench.py --profile DIR`` records and splits profiles this way. Each sample is one
stack; it goes to the first component that claims it, in this order, so that work is charged
to whoever asked for it:

1. pydantic-ai agent run: any frame in pydantic_ai or pydantic_graph (their own pydantic and
   anyio calls included);
2. asyncpg / store: asyncpg, or threadline's store, or the reference servers' queries;
3. pydantic validation: pydantic or pydantic_core (FastAPI's body parsing and response
   serialisation, threadline's dataclass conversions);
4. threadline queue / runner: threadline.queue, threadline.runner, threadline.agents;
5. FastAPI / HTTP: uvicorn, httptools, h11, starlette, fastapi, anyio, threadline.api and app;
6. event loop: the loop's own work (selecting, timers, task steps) and asyncio helpers;
7. other.

py-spy sees Python frames only (without ``--native``), so time in a C extension counts for the
Python function that called it, which is what this split wants.
"""

from __future__ import annotations

import argparse
import collections
from pathlib import Path

COMPONENTS: tuple[tuple[str, tuple[str, ...]], ...] = (
    ("pydantic-ai agent run", ("pydantic_ai/", "pydantic_graph/")),
    ("asyncpg / store", ("asyncpg/", "threadline/store/", "psycopg/", "reference.py")),
    ("pydantic validation", ("pydantic/", "pydantic_core/")),
    ("threadline queue / runner", ("threadline/queue/", "threadline/runner", "threadline/agents/")),
    (
        "FastAPI / HTTP",
        (
            "uvicorn/",
            "httptools/",
            "h11/",
            "starlette/",
            "fastapi/",
            "anyio/",
            "threadline/api/",
            "threadline/app",
            "ceiling_server.py",
            "baseline_server.py",
        ),
    ),
    ("event loop", ("asyncio/", "uvloop/", "selectors", "threading")),
)
OTHER = "other"
LOOP_DISPATCH = ("asyncio/runners.py", "asyncio/base_events.py", "asyncio/events.py")
# Threads parked on a lock or a queue: py-spy's --nonblocking mode cannot always tell them from
# running ones, and they use no CPU.
IDLE_LEAVES = ("threading.py", "queue.py", "selectors.py")


def _location(frame: str) -> str:
    """``func (path/file.py:12)`` -> ``path/file.py``."""
    start = frame.rfind(" (")
    return frame[start + 2 : frame.rfind(":")] if start >= 0 else frame


def component(stack: list[str]) -> str:
    locations = [_location(frame) for frame in stack]
    # Drop the process's own frames (cli, uvicorn.run, asyncio.run, the loop's dispatch):
    # every sample has them, and what runs on top of them is the callback being charged.
    roots = [i for i, loc in enumerate(locations) if loc.startswith(LOOP_DISPATCH)]
    if roots:
        locations = locations[roots[-1] + 1 :]
    if not locations:
        return "event loop"
    for name, prefixes in COMPONENTS:
        for location in locations:
            # Paths are package-relative ("asyncpg/pool.py") or, for scripts, absolute.
            if any(location.startswith(p) or f"/{p}" in location for p in prefixes):
                return name
    return OTHER


def breakdown(path: Path) -> tuple[dict[str, int], int]:
    """Samples per component, and the total, from a py-spy raw profile."""
    counts: collections.Counter[str] = collections.Counter()
    for line in path.read_text(errors="replace").splitlines():
        stack_text, _, count = line.rpartition(" ")
        if not stack_text or not count.isdigit():
            continue
        stack = stack_text.split(";")
        if _location(stack[-1]).startswith(IDLE_LEAVES):
            continue
        counts[component(stack)] += int(count)
    return dict(counts), sum(counts.values())


def table(counts: dict[str, int], total: int, cpu_ms_per_request: float | None = None) -> str:
    head = "| component | share of CPU |" + (" ms per request |" if cpu_ms_per_request else "")
    lines = [head, "|---|---|" + ("---|" if cpu_ms_per_request else "")]
    order = [name for name, _ in COMPONENTS] + [OTHER]
    for name in order:
        share = counts.get(name, 0) / total if total else 0.0
        row = f"| {name} | {share:.0%} |"
        if cpu_ms_per_request:
            row += f" {share * cpu_ms_per_request:.2f} |"
        lines.append(row)
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("profile", type=Path)
    parser.add_argument("--cpu-ms-per-request", type=float)
    args = parser.parse_args()
    counts, total = breakdown(args.profile)
    print(f"{total} samples")
    print(table(counts, total, args.cpu_ms_per_request))


if __name__ == "__main__":
    main()

"""Interleaved A/B of threadline variants: which change cuts CPU per turn, measured fairly.

    python scripts/benchmarks/ab_compare.py \\
        --variant A= \\
        --variant B=/tmp/threadline-async-deps/src \\
        --variant B32=/tmp/threadline-async-deps/src:THREADLINE_MAX_CONCURRENT_RUNS=32 \\
        --ceiling

A variant is ``NAME=[SRC_DIR][:THREADLINE_X=V,...]``: ``threadline serve`` with ``SRC_DIR`` first
on ``PYTHONPATH`` (a copy of ``src/`` with the change applied; empty for the code as installed)
and extra settings. All variants run at once, each on its own database, and short loads
alternate between them ``--reps`` times, so each meets the same share of whatever else the
machine does; the table gives medians. Mind PostgreSQL's ``max_connections``: every variant
holds a pool of up to ``--pool-max-size`` connections.

With ``--openai``, every variant (and the ceiling) runs the ``assistant`` agent on a real
provider client against one ``fake_openai_server.py`` (its own process, ``--model-delay-ms``),
as the benchmark's ``openai`` scenario does: the way to measure the provider-path settings
(``THREADLINE_PROVIDER_HTTP``, ``THREADLINE_PROVIDER_CLIENTS``,
``THREADLINE_DIRECT_MODEL_REQUESTS``).

Used for the figures in docs/performance.md, "What would cut CPU per turn in threadline".
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

from agent_run_bench import DEFAULT_DATABASE_URL, HERE, python_env, threadline_command
from services import Processes, free_port, reachable_postgres, wait_healthy, with_database


def _variant(text: str) -> tuple[str, str, dict[str, str]]:
    name, sep, rest = text.partition("=")
    if not sep or not name:
        raise argparse.ArgumentTypeError(f"expected NAME=[SRC][:SETTINGS], got {text!r}")
    src, _, settings = rest.partition(":")
    env = dict(item.split("=", 1) for item in settings.split(",") if item)
    return name, src, env


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--variant", type=_variant, action="append", default=[], required=True)
    parser.add_argument("--ceiling", action="store_true", help="also run ceiling_server.py")
    parser.add_argument(
        "--openai", action="store_true", help="the assistant agent on a fake OpenAI server"
    )
    parser.add_argument(
        "--agent",
        help="the agent route to load (default: assistant with --openai, else echo); "
        "bench_agents.py's agents load with THREADLINE_AGENTS_MODULE=bench_agents",
    )
    parser.add_argument(
        "--stream", action="store_true", help="streamed requests (SSE; a streamed provider call)"
    )
    parser.add_argument(
        "--tool-call", action="store_true", help="echo agent: every turn calls a tool first"
    )
    parser.add_argument("--reps", type=int, default=5)
    parser.add_argument("--requests", type=int, default=800, help="per load")
    parser.add_argument("--concurrency", type=int, default=200)
    parser.add_argument("--model-delay-ms", type=int, default=50)
    parser.add_argument("--pool-max-size", type=int, default=20)
    args = parser.parse_args()
    postgres = reachable_postgres(DEFAULT_DATABASE_URL)
    if postgres is None:
        return 2

    procs = Processes()
    servers: dict[str, tuple[subprocess.Popen[bytes], str]] = {}
    rows: dict[str, list[dict[str, float]]] = {}
    with tempfile.TemporaryDirectory() as tmp, contextlib.ExitStack() as stack:
        stack.callback(procs.stop_all)
        logs = Path(tmp)
        model: str | None = None
        if args.openai:
            port = free_port()
            cmd = [
                sys.executable,
                str(HERE / "fake_openai_server.py"),
                "--port",
                str(port),
                "--delay-ms",
                str(args.model_delay_ms),
            ]
            fake = procs.start(cmd, python_env(), logs / "fake-openai.log")
            wait_healthy(f"http://127.0.0.1:{port}", fake, 60.0)
            model = f"openai-compat:bench@http://127.0.0.1:{port}/v1"
        for name, src, settings in args.variant:
            database = f"ab_{name.lower()}"
            postgres.reset(database)
            env = python_env()
            # The variant's code first; then this folder, for THREADLINE_AGENTS_MODULE=bench_agents.
            env["PYTHONPATH"] = os.pathsep.join(
                p for p in (src, env.get("PYTHONPATH"), str(HERE)) if p
            )
            port = free_port()
            env.update(
                THREADLINE_DATABASE_URL=with_database(postgres.url, database),
                THREADLINE_ECHO_DELAY_MS=str(args.model_delay_ms),
                THREADLINE_POOL_MAX_SIZE=str(args.pool_max_size),
            )
            # A variant's own settings win, THREADLINE_MODEL included (e.g. the echo model on
            # the provider's route, for a ratio measured in one interleaved run).
            env.update({**({"THREADLINE_MODEL": model} if model else {}), **settings})
            cmd = [*threadline_command(), "serve", "--port", str(port)]
            servers[name] = (
                procs.start(cmd, env, logs / f"{name}.log"),
                f"http://127.0.0.1:{port}",
            )
        if args.ceiling:
            postgres.reset("ab_ceiling")
            port = free_port()
            cmd = [
                sys.executable,
                str(HERE / "ceiling_server.py"),
                "--port",
                str(port),
                "--database-url",
                with_database(postgres.url, "ab_ceiling"),
                "--model-delay-ms",
                str(args.model_delay_ms),
                "--pool-max-size",
                str(args.pool_max_size),
                *(["--openai-model", model] if model else []),
            ]
            proc = procs.start(cmd, python_env(), logs / "ceiling.log")
            servers["ceiling"] = (proc, f"http://127.0.0.1:{port}")
        for proc, base in servers.values():
            wait_healthy(base, proc, 60.0)

        for rep in range(args.reps):
            for name, (proc, base) in servers.items():
                out = logs / f"{name}-{rep}.json"
                subprocess.run(
                    [
                        sys.executable,
                        str(HERE / "load_client.py"),
                        "--url",
                        base,
                        "--concurrency",
                        str(args.concurrency),
                        "--requests",
                        str(args.requests),
                        "--warmup",
                        "1" if rep == 0 else "0.3",
                        "--watch-pgid",
                        str(proc.pid),
                        "--tag",
                        f"ab{rep}",
                        "--agent",
                        args.agent or ("assistant" if model else "echo"),
                        "--out",
                        str(out),
                        *(["--stream"] if args.stream else []),
                        *(["--tool-call"] if args.tool_call else []),
                    ],
                    check=True,
                    timeout=args.requests * 0.5 + 120,
                )
                raw: dict[str, Any] = json.loads(out.read_text())
                measured = raw["measured"]
                ok = len(measured["latencies_ms"])
                lags = [r["loop_lag"]["max_ms"] for r in raw["metrics_after"]]
                p99s = [r["loop_lag"]["p99_ms"] for r in raw["metrics_after"]]
                latencies = sorted(measured["latencies_ms"])
                rows.setdefault(name, []).append(
                    {
                        "cpu": raw["cpu_s"]["server"] * 1000 / ok if ok else float("nan"),
                        "rps": ok / measured["elapsed_s"],
                        "lag": max(lags, default=float("nan")),
                        "lag_p99": max(p99s, default=float("nan")),
                        "p99": latencies[int(len(latencies) * 0.99)] if latencies else float("nan"),
                        "errors": sum(measured["errors"].values()),
                    }
                )

    print(
        "| variant | CPU ms/req (median) | req/s (median) | loop lag max / p99 (medians) "
        "| latency p99 (median) | errors |"
    )
    print("|---|---|---|---|---|---|")
    for name, results in rows.items():
        cpu = statistics.median(r["cpu"] for r in results)
        rps = statistics.median(r["rps"] for r in results)
        lag = statistics.median(r["lag"] for r in results)
        lag_p99 = statistics.median(r["lag_p99"] for r in results)
        p99 = statistics.median(r["p99"] for r in results)
        errors = sum(int(r["errors"]) for r in results)
        print(
            f"| {name} | {cpu:.2f} | {rps:.0f} | {lag:.0f} / {lag_p99:.0f} ms | {p99:,.0f} ms "
            f"| {errors} |"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Load benchmark: threadline against a blocking baseline and two ceilings, in one run.

    python scripts/benchmarks/agent_run_bench.py                 # `make bench`, about 8 minutes
    python scripts/benchmarks/agent_run_bench.py --requests 2000 --scenarios main   # quick look
    python scripts/benchmarks/agent_run_bench.py --json bench-results/run.json

Everything it measures it starts itself, as real processes on 127.0.0.1, one server at a time:

* ``threadline`` and ``threadline_w2``: ``threadline serve --workers 1|2`` on PostgreSQL (asyncpg),
  the ``echo`` model with ``--model-delay-ms`` of simulated latency (w2 also needs Redis);
* ``blocking_baseline`` (``baseline_server.py``): the same route, SQL and agent run on a
  synchronous driver called inside the async handler;
* ``ceiling`` and ``ceiling_no_framework`` (``ceiling_server.py``): bare FastAPI + asyncpg doing
  the same round trips and the same agent run (or the model function alone), nothing else.

Each server gets a fresh database of its own on the PostgreSQL server named by
``THREADLINE_BENCH_DATABASE_URL`` (default ``postgresql://postgres@127.0.0.1:5432/postgres``;
its database is only used to create and drop the others). With ``--db-latency-ms`` above zero
every server reaches PostgreSQL through ``latency_proxy.py``, in a process of its own.

Scenarios: ``main`` (``--db-latency-ms``, one new session per request), ``zero_latency`` (the
same with the database reached directly), ``burst`` (each session receives ``--burst K``
messages at once), ``webhook`` (threadline only: background requests, each timed from
sending it to the load client's receiver getting its signed webhook) and ``stream``
(threadline only: SSE requests, timed to the final event, with the time to the first
``text.delta``; the echo model streams its reply in chunks over ``--model-delay-ms``). The
load comes from
``load_client.py`` in its own process. Servers whose services are missing are skipped, with
the reason printed and written to the JSON.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime as dt
import importlib.util
import json
import os
import platform
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from types import FrameType
from typing import Any

from profile_breakdown import breakdown
from profile_breakdown import table as profile_table
from report import Scenario, evaluate, markdown, summarize
from services import (
    Postgres,
    Processes,
    check_redis,
    flush_redis,
    free_port,
    tail,
    upstream_address,
    wait_healthy,
    with_database,
)

HERE = Path(__file__).resolve().parent
REPO = HERE.parent.parent
SERVERS = ("threadline", "threadline_w2", "blocking_baseline", "ceiling", "ceiling_no_framework")
SCENARIOS = ("main", "zero_latency", "burst", "webhook", "stream")
DEFAULT_DATABASE_URL = "postgresql://postgres@127.0.0.1:5432/postgres"
DEFAULT_REDIS_URL = "redis://127.0.0.1:6379/14"
# Burst runs skip the framework-free ceiling: it answers the same way the ceiling does.
BURST_SERVERS = ("threadline", "threadline_w2", "blocking_baseline", "ceiling")
# Only threadline has background runs and webhooks.
WEBHOOK_SERVERS = ("threadline", "threadline_w2")
# Nor do the baselines stream.
STREAM_SERVERS = WEBHOOK_SERVERS
WEBHOOK_SECRET = "bench-webhook-secret"


def _raise_exit(signum: int, frame: FrameType | None) -> None:
    raise SystemExit(f"stopped by signal {signum}")


def python_env() -> dict[str, str]:
    """The environment for every child: no stray THREADLINE_ settings; threadline importable."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("THREADLINE_")}
    if importlib.util.find_spec("threadline") is None:
        env["PYTHONPATH"] = os.pathsep.join(
            p for p in (str(REPO / "src"), env.get("PYTHONPATH")) if p
        )
    return env


def threadline_command() -> list[str]:
    script = Path(sys.executable).with_name("threadline")
    return [str(script)] if script.exists() else [sys.executable, "-m", "threadline"]


@dataclass
class Bench:
    args: argparse.Namespace
    postgres: Postgres
    procs: Processes
    logs: Path

    def server_command(
        self, name: str, port: int, db_url: str, webhook: bool = False
    ) -> tuple[list[str], dict[str, str]]:
        args = self.args
        env = python_env()
        common = ["--host", "127.0.0.1", "--port", str(port)]
        if name.startswith("threadline"):
            workers = 2 if name == "threadline_w2" else 1
            env.update(
                THREADLINE_DATABASE_URL=db_url,
                THREADLINE_MODEL="threadline:echo",
                THREADLINE_ECHO_DELAY_MS=str(args.model_delay_ms),
                THREADLINE_POOL_MAX_SIZE=str(args.pool_max_size),
                THREADLINE_DEBUG_METRICS="true",
            )
            if workers > 1:
                env["THREADLINE_REDIS_URL"] = args.redis_url
            if webhook:
                env["THREADLINE_WEBHOOK_SECRET"] = WEBHOOK_SECRET
                env["THREADLINE_WEBHOOK_ALLOWED_HOSTS"] = "127.0.0.1"
            env.update(args.threadline_env)
            return [*threadline_command(), "serve", *common, "--workers", str(workers)], env
        script = "baseline_server.py" if name == "blocking_baseline" else "ceiling_server.py"
        cmd = [
            sys.executable,
            str(HERE / script),
            *common,
            "--database-url",
            db_url,
            "--model-delay-ms",
            str(args.model_delay_ms),
        ]
        if name != "blocking_baseline":
            cmd += ["--pool-max-size", str(args.pool_max_size)]
        if name == "ceiling_no_framework":
            cmd.append("--no-framework")
        return cmd, env

    @contextlib.contextmanager
    def proxy(self, scenario: Scenario, tag: str) -> Iterator[tuple[int | None, int | None]]:
        """Yield (port, pid) of a latency proxy for the scenario, or (None, None) for none."""
        if scenario.db_latency_ms <= 0:
            yield None, None
            return
        log = self.logs / f"{tag}-proxy.log"
        cmd = [
            sys.executable,
            str(HERE / "latency_proxy.py"),
            "--upstream",
            upstream_address(self.postgres.url),
            "--delay-ms",
            str(scenario.db_latency_ms),
        ]
        proc = self.procs.start(cmd, python_env(), log)
        try:
            deadline = time.monotonic() + 15
            while time.monotonic() < deadline:
                text = log.read_text(errors="replace")
                if "listening on" in text:
                    port = int(text.split("listening on", 1)[1].split()[0].rpartition(":")[2])
                    yield port, proc.pid
                    return
                if proc.poll() is not None:
                    break
                time.sleep(0.05)
            raise RuntimeError(f"latency proxy did not start: {log.read_text(errors='replace')}")
        finally:
            self.procs.stop(proc)

    def run_server(
        self, name: str, scenario: Scenario, profile: Path | None = None
    ) -> dict[str, Any]:
        """Start ``name`` on a fresh database, load it, stop it; with ``profile``, also record
        a py-spy profile of the server during the measured phase."""
        args = self.args
        tag = f"{scenario.name}-{name}"
        database = f"bench_{name}"
        self.postgres.reset(database)
        if name == "threadline_w2":
            flush_redis(args.redis_url)
        with self.proxy(scenario, tag) as (proxy_port, proxy_pid):
            db_url = with_database(self.postgres.url, database, proxy_port)
            rtt = Postgres.round_trip_ms(db_url)
            port = free_port()
            base = f"http://127.0.0.1:{port}"
            cmd, env = self.server_command(name, port, db_url, scenario.webhook)
            log = self.logs / f"{tag}.log"
            server = self.procs.start(cmd, env, log)
            try:
                wait_healthy(base, server, self.args.startup_timeout, log)
                raw = self.load(base, scenario, tag, server.pid, proxy_pid, profile)
            finally:
                self.procs.stop(server)
        self.postgres.drop(database)
        duration = args.profile_seconds + 2 if profile else args.duration
        result = summarize(raw, scenario, duration if not args.requests or profile else None)
        result["db_round_trip_ms"] = round(rtt, 3)
        return result

    def load(
        self,
        base: str,
        scenario: Scenario,
        tag: str,
        pgid: int,
        proxy_pid: int | None,
        profile: Path | None = None,
    ) -> dict[str, Any]:
        args = self.args
        requests, duration = args.requests, args.duration
        if profile is not None:
            requests, duration = None, args.profile_seconds + 2
        out = self.logs / f"{tag}-load.json"
        cmd = [
            sys.executable,
            str(HERE / "load_client.py"),
            "--url",
            base,
            "--concurrency",
            str(args.concurrency),
            "--burst",
            str(scenario.burst),
            "--timeout",
            str(args.request_timeout),
            "--warmup",
            str(args.warmup),
            "--tag",
            tag,
            "--watch-pgid",
            str(pgid),
            "--out",
            str(out),
        ]
        cmd += ["--requests", str(requests)] if requests else ["--duration", str(duration)]
        if scenario.webhook:
            cmd += ["--webhook-secret", WEBHOOK_SECRET]
        if scenario.stream:
            cmd.append("--stream")
        if proxy_pid is not None:
            cmd += ["--watch-pid", str(proxy_pid)]
        # A hard bound on the client: the run, the warm-up, the slowest request, and slack.
        limit = (duration or 0) + args.warmup + args.request_timeout * 2 + 60
        if requests:
            limit += requests * 0.05
        client = self.procs.start(cmd, python_env(), self.logs / f"{tag}-load.log")
        try:
            if profile is not None:
                time.sleep(args.warmup + 1)
                self.record_profile(pgid, profile)
            client.wait(limit)
        except subprocess.TimeoutExpired:
            raise RuntimeError(f"load client did not finish within {limit:.0f}s") from None
        finally:
            self.procs.stop(client)
        if client.returncode != 0 or not out.exists():
            raise RuntimeError(f"load client failed:\n{tail(self.logs / f'{tag}-load.log')}")
        raw: dict[str, Any] = json.loads(out.read_text())
        return raw

    def record_profile(self, pid: int, out: Path) -> None:
        """py-spy on the server process for ``--profile-seconds``, in raw (collapsed) form."""
        cmd = [
            self.args.py_spy,
            "record",
            "--pid",
            str(pid),
            "--duration",
            str(self.args.profile_seconds),
            "--rate",
            "200",
            "--nonblocking",
            "--format",
            "raw",
            "--output",
            str(out),
        ]
        spy = self.procs.start(cmd, dict(os.environ), out.with_suffix(".log"))
        try:
            spy.wait(self.args.profile_seconds + 30)
        except subprocess.TimeoutExpired:
            raise RuntimeError("py-spy did not finish") from None
        finally:
            self.procs.stop(spy)


def machine() -> dict[str, Any]:
    info: dict[str, Any] = {
        "cores": os.cpu_count(),
        "python": platform.python_version(),
        "platform": platform.platform(),
    }
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                info["cpu"] = line.split(":", 1)[1].strip()
                break
    with contextlib.suppress(OSError, ValueError):
        kib = int(Path("/proc/meminfo").read_text().split()[1])
        info["memory_gib"] = round(kib / 1024 / 1024, 1)
    versions = {}
    for package in ("fastapi", "uvicorn", "pydantic", "pydantic-ai-slim", "asyncpg", "psycopg"):
        with contextlib.suppress(Exception):
            from importlib.metadata import version

            versions[package] = version(package)
    info["packages"] = versions
    info["uvloop"] = importlib.util.find_spec("uvloop") is not None
    info["httptools"] = importlib.util.find_spec("httptools") is not None
    return info


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--concurrency", type=int, default=200, help="requests in flight")
    amount = parser.add_mutually_exclusive_group()
    amount.add_argument("--requests", type=int, help="measured requests per server")
    amount.add_argument("--duration", type=float, help="measured seconds per server (default 20)")
    parser.add_argument("--burst", type=int, default=3, metavar="K", help="messages per burst")
    parser.add_argument("--model-delay-ms", type=int, default=50)
    parser.add_argument("--db-latency-ms", type=float, default=1.0, help="added per round trip")
    parser.add_argument(
        "--scenarios",
        default=",".join(SCENARIOS),
        help=f"comma-separated, from {', '.join(SCENARIOS)}",
    )
    parser.add_argument(
        "--servers", default=",".join(SERVERS), help=f"comma-separated, from {', '.join(SERVERS)}"
    )
    parser.add_argument(
        "--repeat",
        type=int,
        default=1,
        help="measure every server this many times, interleaved; report the median run",
    )
    parser.add_argument("--pool-max-size", type=int, default=20)
    parser.add_argument(
        "--threadline-env",
        action="append",
        default=[],
        metavar="NAME=VALUE",
        help="extra setting for the threadline servers, e.g. THREADLINE_MAX_CONCURRENT_RUNS=32",
    )
    parser.add_argument("--warmup", type=float, default=2.0, help="seconds of unmeasured load")
    parser.add_argument("--request-timeout", type=float, default=60.0)
    parser.add_argument("--startup-timeout", type=float, default=60.0)
    parser.add_argument("--json", type=Path, help="write every figure and the settings here")
    parser.add_argument("--markdown", type=Path, help="write the tables here too")
    parser.add_argument("--logs", type=Path, help="keep server and client logs in this folder")
    parser.add_argument(
        "--profile",
        type=Path,
        metavar="DIR",
        help="after the scenarios, profile --profile-servers under the main load with py-spy",
    )
    parser.add_argument("--profile-seconds", type=int, default=10)
    parser.add_argument("--profile-servers", default="threadline,ceiling,ceiling_no_framework")
    args = parser.parse_args(argv)
    if args.requests is None and args.duration is None:
        args.duration = 20.0
    args.scenarios = [s for s in args.scenarios.split(",") if s]
    args.servers = [s for s in args.servers.split(",") if s]
    args.profile_servers = [s for s in args.profile_servers.split(",") if s]
    pairs = [item.partition("=") for item in args.threadline_env]
    if any(not name.startswith("THREADLINE_") or not sep for name, sep, _ in pairs):
        parser.error("--threadline-env takes THREADLINE_NAME=VALUE")
    args.threadline_env = {name: value for name, _, value in pairs}
    args.py_spy = shutil.which("py-spy") or str(Path(sys.executable).with_name("py-spy"))
    if args.profile and not Path(args.py_spy).exists():
        parser.error("--profile needs py-spy (pip install py-spy)")
    for value, known in (
        (args.scenarios, SCENARIOS),
        (args.servers, SERVERS),
        (args.profile_servers, SERVERS),
    ):
        unknown = set(value) - set(known)
        if unknown:
            parser.error(f"unknown: {', '.join(sorted(unknown))}")
    args.database_url = os.environ.get("THREADLINE_BENCH_DATABASE_URL", DEFAULT_DATABASE_URL)
    args.redis_url = os.environ.get("THREADLINE_BENCH_REDIS_URL", DEFAULT_REDIS_URL)
    return args


def run_profiles(bench: Bench, skipped: dict[str, str], failures: dict[str, str]) -> dict[str, Any]:
    """Profile each server under the main scenario's load; split its CPU by component."""
    args = bench.args
    args.profile.mkdir(parents=True, exist_ok=True)
    scenario = Scenario("profile", args.db_latency_ms, 1)
    profiles: dict[str, Any] = {}
    for name in args.profile_servers:
        if name in skipped or name == "threadline_w2":
            continue  # w2: py-spy follows one process; profile the one-worker server instead
        out = args.profile / f"{name}.txt"
        print(f"profile/{name} ...", file=sys.stderr)
        try:
            result = bench.run_server(name, scenario, profile=out)
        except (RuntimeError, OSError) as exc:
            failures[f"profile/{name}"] = str(exc)
            continue
        counts, total = breakdown(out)
        cpu = result["cpu_ms_per_request"].get("server")
        profiles[name] = {
            "file": str(out),
            "samples": total,
            "cpu_ms_per_request": cpu,
            "rps": result["rps"],
            "components": {k: round(v / total, 3) for k, v in counts.items()} if total else {},
            "table": profile_table(counts, total, cpu),
        }
    return profiles


def median_run(done: list[dict[str, Any]]) -> dict[str, Any]:
    """The run with the median throughput, carrying every run's throughput and error count.

    Repeats interleave the servers, so each one meets the same share of whatever else the
    machine is doing; the median run is the one least moved by it.
    """
    chosen = dict(sorted(done, key=lambda r: r["rps"])[len(done) // 2])
    chosen["rps_all_runs"] = [r["rps"] for r in done]
    chosen["errors_all_runs"] = sum(r["errors"] for r in done)
    return chosen


def plan(args: argparse.Namespace) -> list[Scenario]:
    scenarios = []
    if "main" in args.scenarios:
        scenarios.append(Scenario("main", args.db_latency_ms, 1))
    if "zero_latency" in args.scenarios and args.db_latency_ms > 0:
        scenarios.append(Scenario("zero_latency", 0.0, 1))
    if "burst" in args.scenarios and args.burst > 1:
        scenarios.append(Scenario("burst", args.db_latency_ms, args.burst))
    if "webhook" in args.scenarios:
        scenarios.append(Scenario("webhook", args.db_latency_ms, 1, webhook=True))
    if "stream" in args.scenarios:
        scenarios.append(Scenario("stream", args.db_latency_ms, 1, stream=True))
    return scenarios


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    signal.signal(signal.SIGTERM, _raise_exit)
    procs = Processes()
    postgres = Postgres(args.database_url)
    skipped: dict[str, str] = {}
    problem = postgres.check()
    if problem is not None:
        skipped = {name: f"PostgreSQL unavailable: {problem}" for name in args.servers}
    elif "threadline_w2" in args.servers:
        problem = check_redis(args.redis_url)
        if problem is not None:
            skipped["threadline_w2"] = problem
    for name, reason in skipped.items():
        print(f"skipping {name}: {reason}", file=sys.stderr)

    scenarios = plan(args)
    results: dict[str, dict[str, Any]] = {s.name: {} for s in scenarios}
    profiles: dict[str, Any] = {}
    failures: dict[str, str] = {}
    started = time.monotonic()
    with contextlib.ExitStack() as stack:
        logs = args.logs or Path(stack.enter_context(tempfile.TemporaryDirectory()))
        logs.mkdir(parents=True, exist_ok=True)
        bench = Bench(args, postgres, procs, logs)
        stack.callback(procs.stop_all)
        runs: dict[tuple[str, str], list[dict[str, Any]]] = {}
        for repeat in range(args.repeat):
            for scenario in scenarios:
                names = [n for n in args.servers if n not in skipped]
                if scenario.burst > 1:
                    names = [n for n in names if n in BURST_SERVERS]
                if scenario.webhook:
                    names = [n for n in names if n in WEBHOOK_SERVERS]
                if scenario.stream:
                    names = [n for n in names if n in STREAM_SERVERS]
                for name in names:
                    label = f"{scenario.name}/{name}"
                    elapsed = time.monotonic() - started
                    print(f"[{elapsed:5.0f}s] {label} (run {repeat + 1})", file=sys.stderr)
                    try:
                        result = bench.run_server(name, scenario)
                    except (RuntimeError, OSError) as exc:
                        failures[f"{label} (run {repeat + 1})"] = str(exc)
                        print(f"  failed: {exc}", file=sys.stderr)
                        continue
                    runs.setdefault((scenario.name, name), []).append(result)
                    print(
                        f"  {result['rps']} req/s, mean {result['mean_ms']} ms, "
                        f"p99 {result['p99_ms']} ms, {result['errors']} errors, "
                        f"loop lag max {result['loop_lag_max_ms']} ms",
                        file=sys.stderr,
                    )
        for (scenario_name, name), done in runs.items():
            results[scenario_name][name] = median_run(done)
        if args.profile:
            profiles = run_profiles(bench, skipped, failures)

    sections = []
    for scenario in scenarios:
        title = {
            "main": f"database +{scenario.db_latency_ms:g} ms per round trip",
            "zero_latency": "database on loopback, no added latency",
            "burst": f"bursts of {scenario.burst} messages per session, "
            f"database +{scenario.db_latency_ms:g} ms",
            "webhook": "background requests, latency = request sent to webhook received, "
            f"database +{scenario.db_latency_ms:g} ms",
            "stream": "streamed requests (SSE), latency = request sent to the final event, "
            f"database +{scenario.db_latency_ms:g} ms",
        }[scenario.name]
        sections.append(f"### {scenario.name}: {title}\n\n")
        sections[-1] += markdown(scenario, results[scenario.name], skipped)
    targets = evaluate(results)
    lines = [
        f"- {'MET' if t['met'] else 'MISSED' if t['met'] is False else 'NOT MEASURED'}: "
        f"{t['target']} ({t['detail']})"
        for t in targets
    ]
    settings = {
        "concurrency": args.concurrency,
        "requests": args.requests,
        "duration_s": args.duration,
        "warmup_s": args.warmup,
        "repeat": args.repeat,
        "burst": args.burst,
        "model_delay_ms": args.model_delay_ms,
        "db_latency_ms": args.db_latency_ms,
        "pool_max_size": args.pool_max_size,
        "threadline_env": args.threadline_env,
        "request_timeout_s": args.request_timeout,
        "scenarios": [s.name for s in scenarios],
        "database_url": args.database_url,
    }
    for name, profile in profiles.items():
        sections.append(
            f"### CPU profile: {name} ({profile['samples']} samples, "
            f"{profile['cpu_ms_per_request']} ms of server CPU per request)\n\n" + profile["table"]
        )
    report = "\n\n".join(sections) + "\n\n### targets\n\n" + "\n".join(lines) + "\n"
    print(report)
    for label, reason in failures.items():
        print(f"FAILED {label}: {reason}", file=sys.stderr)
    if args.markdown:
        args.markdown.parent.mkdir(parents=True, exist_ok=True)
        args.markdown.write_text(report)
    if args.json:
        document = {
            "date": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
            "settings": settings,
            "machine": machine() | {"postgres": postgres.version() if not problem else None},
            "servers": results.get("main", {}),
            "scenarios": results,
            "skipped": skipped,
            "failed": failures,
            "targets": targets,
            "profiles": {k: {x: v[x] for x in v if x != "table"} for k, v in profiles.items()},
        }
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(document, indent=2) + "\n")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())

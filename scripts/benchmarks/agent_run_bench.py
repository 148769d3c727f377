"""Load benchmark: threadline against a blocking baseline and two ceilings, in one run.

    python scripts/benchmarks/agent_run_bench.py                 # `make bench`
    python scripts/benchmarks/agent_run_bench.py --requests 2000 --scenarios main   # quick look
    python scripts/benchmarks/agent_run_bench.py --commit a86c1ec --json bench-results/run.json

It measures one commit (``--commit``, default HEAD): it checks it out into a git worktree of
its own (``checkout.py``), installs it there (``uv sync --locked --extra bench``, or borrows an
interpreter with ``--python``), runs every process below from that worktree, names the commit
in its output and removes the worktree at the end. Every process it starts runs in a process
group of its own and dies with the benchmark, even when the benchmark is killed with SIGKILL
(``services.Processes``: a parent-death signal and ``watchdog.py``).

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

Scenarios (``--scenarios``; the first is the headline):

* ``openai``: every server runs threadline's ``assistant`` agent on a real provider client
  (pydantic-ai's OpenAI provider, configured by threadline's registry:
  ``THREADLINE_MODEL=openai-compat:bench@URL``) against ``fake_openai_server.py``, a fake
  OpenAI-compatible server in its own process answering after ``--model-delay-ms``; its CPU per
  completion and its own service time are measured, to show it does not bound the run;
* ``stream_openai``: the same, streamed (threadline only: SSE to the client, a streamed
  provider call);
* ``main`` (``--db-latency-ms``, one new session per request, echo model), ``zero_latency``
  (the same with the database reached directly), ``burst`` (each session receives
  ``--burst K`` messages at once);
* ``webhook`` (threadline only: background requests, each timed from sending it to the load
  client's receiver getting its signed webhook) and ``stream`` (threadline only: SSE requests,
  timed to the final event, with the time to the first ``text.delta``; the echo model streams
  its reply in chunks over ``--model-delay-ms``);
* ``long_history`` (threadline only): each of ``--concurrency`` lanes writes to one session of
  its own, once fresh and once seeded beforehand (SQL, straight into the store's tables) with
  ``--history-messages`` stored messages: per-turn cost and latency side by side. For the
  fresh run, as many messages are seeded into sessions no lane writes to, so that both runs
  meet tables of the same size;
* ``streams_10k`` (threadline, one worker; not in the default set): ``--streams`` streams held
  open at once, the echo model spreading its reply over ``--stream-hold-s``: server memory per
  open stream and CPU per delta.

The load comes from ``load_client.py`` in its own process. Servers whose services are missing
are skipped, with the reason printed and written to the JSON.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
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

import checkout
from checkout import Checkout
from profile_breakdown import breakdown
from profile_breakdown import table as profile_table
from report import (
    Scenario,
    evaluate,
    markdown,
    markdown_held,
    provider_note,
    summarize,
    summarize_held,
)
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
SCENARIOS = (
    "openai",
    "stream_openai",
    "main",
    "zero_latency",
    "burst",
    "webhook",
    "stream",
    "long_history",
    "streams_10k",
)
# streams_10k holds 10,000 connections for minutes: asked for by name only.
DEFAULT_SCENARIOS = tuple(s for s in SCENARIOS if s != "streams_10k")
DEFAULT_DATABASE_URL = "postgresql://postgres@127.0.0.1:5432/postgres"
DEFAULT_REDIS_URL = "redis://127.0.0.1:6379/14"
# Burst runs skip the framework-free ceiling: it answers the same way the ceiling does.
BURST_SERVERS = ("threadline", "threadline_w2", "blocking_baseline", "ceiling")
# Only threadline has background runs and webhooks.
WEBHOOK_SERVERS = ("threadline", "threadline_w2")
# Nor do the baselines stream.
STREAM_SERVERS = WEBHOOK_SERVERS
# The framework-free ceiling calls the echo function itself: it has no provider path.
PROVIDER_SERVERS = ("threadline", "threadline_w2", "blocking_baseline", "ceiling")
# One worker: memory per stream and CPU per delta of one process.
HELD_SERVERS = ("threadline",)
HISTORY_SERVERS = ("threadline",)
WEBHOOK_SECRET = "bench-webhook-secret"
# The model name threadline and the reference servers ask the fake provider for.
PROVIDER_MODEL = "bench"
# Filler words per prompt in streams_10k: a reply long enough for the echo model's 8 chunks.
HELD_PROMPT_WORDS = 64
# The echo model's and the fake provider's reply to a benchmark prompt: two words
# ("echo: <marker>"), streamed as two chunks, so the first token comes after half the delay.
STREAM_REPLY_CHUNKS = 2


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
    code: Checkout

    def env(self) -> dict[str, str]:
        return self.code.env(dict(os.environ))

    def server_command(
        self, name: str, port: int, db_url: str, scenario: Scenario, provider: str | None
    ) -> tuple[list[str], dict[str, str]]:
        args = self.args
        env = self.env()
        common = ["--host", "127.0.0.1", "--port", str(port)]
        model = f"openai-compat:{PROVIDER_MODEL}@{provider}" if provider else None
        if name.startswith("threadline"):
            workers = 2 if name == "threadline_w2" else 1
            env.update(
                THREADLINE_DATABASE_URL=db_url,
                THREADLINE_MODEL=model or "threadline:echo",
                THREADLINE_ECHO_DELAY_MS=str(args.model_delay_ms),
                THREADLINE_POOL_MAX_SIZE=str(args.pool_max_size),
                THREADLINE_DEBUG_METRICS="true",
            )
            if scenario.held_streams:
                # Every stream's run in flight at once, its reply spread over the hold.
                env["THREADLINE_ECHO_DELAY_MS"] = str(int(args.stream_hold_s * 1000))
                env["THREADLINE_MAX_CONCURRENT_RUNS"] = str(scenario.held_streams)
                # The default (120 s) would fail every run of a longer hold.
                env["THREADLINE_MODEL_TIMEOUT_S"] = str(args.stream_hold_s + 60)
            if workers > 1:
                env["THREADLINE_REDIS_URL"] = args.redis_url
            if scenario.webhook:
                env["THREADLINE_WEBHOOK_SECRET"] = WEBHOOK_SECRET
                env["THREADLINE_WEBHOOK_ALLOWED_HOSTS"] = "127.0.0.1"
            env.update(args.threadline_env)
            cmd = [*self.code.threadline_command(), "serve", *common, "--workers", str(workers)]
            return cmd, env
        script = "baseline_server.py" if name == "blocking_baseline" else "ceiling_server.py"
        cmd = [
            self.code.python,
            str(self.code.scripts / script),
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
        if model:
            cmd += ["--openai-model", model]
        return cmd, env

    @contextlib.contextmanager
    def proxy(self, scenario: Scenario, tag: str) -> Iterator[tuple[int | None, int | None]]:
        """Yield (port, pid) of a latency proxy for the scenario, or (None, None) for none."""
        if scenario.db_latency_ms <= 0:
            yield None, None
            return
        log = self.logs / f"{tag}-proxy.log"
        cmd = [
            self.code.python,
            str(self.code.scripts / "latency_proxy.py"),
            "--upstream",
            upstream_address(self.postgres.url),
            "--delay-ms",
            str(scenario.db_latency_ms),
        ]
        proc = self.procs.start(cmd, self.env(), log)
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

    @contextlib.contextmanager
    def provider(self, scenario: Scenario, tag: str) -> Iterator[tuple[str | None, int | None]]:
        """Yield (base URL, pid) of a fresh fake OpenAI-compatible server, or (None, None)."""
        if not scenario.provider:
            yield None, None
            return
        port = free_port()
        cmd = [
            self.code.python,
            str(self.code.scripts / "fake_openai_server.py"),
            "--port",
            str(port),
            "--delay-ms",
            str(self.args.model_delay_ms),
        ]
        log = self.logs / f"{tag}-provider.log"
        proc = self.procs.start(cmd, self.env(), log)
        try:
            wait_healthy(f"http://127.0.0.1:{port}", proc, self.args.startup_timeout, log)
            yield f"http://127.0.0.1:{port}/v1", proc.pid
        finally:
            self.procs.stop(proc)

    def run_server(
        self, name: str, scenario: Scenario, profile: Path | None = None, label: str | None = None
    ) -> dict[str, Any]:
        """Start ``name`` on a fresh database, load it, stop it; with ``profile``, also record
        a py-spy profile of the server during the measured phase."""
        args = self.args
        tag = f"{scenario.name}-{label or name}"
        # The pid: two benchmarks sharing one PostgreSQL server never share a database.
        database = f"bench_{os.getpid()}_{name}"
        self.postgres.reset(database)
        try:
            raw, rtt, used = self._measure(name, scenario, tag, database, profile)
        finally:
            # Also after a failure: a failed run must not leave its database behind.
            self.postgres.drop(database)
        if scenario.held_streams:
            result = summarize_held(raw)
        else:
            duration = args.profile_seconds + 2 if profile else args.duration
            result = summarize(raw, scenario, duration if not args.requests or profile else None)
        result["db_round_trip_ms"] = round(rtt, 3)
        result["commit"] = self.code.sha
        if used is not None:
            # Proof that the measured turns went to the seeded sessions.
            result["seeded_sessions_answered"] = used
        return result

    def _measure(
        self, name: str, scenario: Scenario, tag: str, database: str, profile: Path | None
    ) -> tuple[dict[str, Any], float, str | None]:
        """The raw load results, the database round trip, and (``long_history``) how many
        seeded sessions the measured turns answered."""
        args = self.args
        if name == "threadline_w2":
            flush_redis(args.redis_url)
        with (
            self.proxy(scenario, tag) as (proxy_port, proxy_pid),
            self.provider(scenario, tag) as (provider_url, provider_pid),
        ):
            db_url = with_database(self.postgres.url, database, proxy_port)
            rtt = Postgres.round_trip_ms(db_url)
            port = free_port()
            base = f"http://127.0.0.1:{port}"
            cmd, env = self.server_command(name, port, db_url, scenario, provider_url)
            log = self.logs / f"{tag}.log"
            server = self.procs.start(cmd, env, log)
            try:
                wait_healthy(base, server, self.args.startup_timeout, log)
                # The lanes' own sessions, or (the fresh run) as many that no lane writes to.
                for prefix, messages in (
                    (f"{tag}-run-lane-", scenario.history),
                    (f"{tag}-ballast-", scenario.ballast),
                ):
                    if messages:
                        seed_history(
                            with_database(self.postgres.url, database),
                            prefix,
                            args.concurrency,
                            messages,
                        )
                watch = Watch(server.pid, proxy_pid, provider_pid, provider_url)
                raw = self.load(base, scenario, tag, watch, profile)
            finally:
                self.procs.stop(server)
        used = None
        if scenario.history:
            used = seeded_sessions_used(
                with_database(self.postgres.url, database), f"{tag}-run-lane-", scenario.history
            )
        return raw, rtt, used

    def load(
        self,
        base: str,
        scenario: Scenario,
        tag: str,
        watch: Watch,
        profile: Path | None = None,
    ) -> dict[str, Any]:
        args = self.args
        requests, duration = args.requests, args.duration
        if profile is not None:
            requests, duration = None, args.profile_seconds + 2
        out = self.logs / f"{tag}-load.json"
        timeout = args.request_timeout
        if scenario.held_streams:
            # Each stream lasts the hold, after waiting its turn to connect.
            timeout = args.stream_hold_s + args.request_timeout
            requests, duration = None, args.duration or 20.0
        cmd = [
            self.code.python,
            str(self.code.scripts / "load_client.py"),
            "--url",
            base,
            "--concurrency",
            str(args.concurrency),
            "--burst",
            str(scenario.burst),
            "--timeout",
            str(timeout),
            "--warmup",
            str(args.warmup),
            "--tag",
            tag,
            "--watch-pgid",
            str(watch.pgid),
            "--out",
            str(out),
        ]
        cmd += ["--requests", str(requests)] if requests else ["--duration", str(duration)]
        if scenario.webhook:
            cmd += ["--webhook-secret", WEBHOOK_SECRET]
        if scenario.stream:
            cmd.append("--stream")
        if watch.proxy_pid is not None:
            cmd += ["--watch-pid", str(watch.proxy_pid)]
        if watch.provider_pid is not None and watch.provider_url is not None:
            cmd += [
                "--watch-provider-pgid",
                str(watch.provider_pid),
                "--provider-url",
                watch.provider_url.removesuffix("/v1"),
                "--agent",
                "assistant",
            ]
        if scenario.lane_sessions:
            cmd.append("--lane-sessions")
        if scenario.held_streams:
            cmd += [
                "--open-streams",
                str(scenario.held_streams),
                "--prompt-words",
                str(HELD_PROMPT_WORDS),
            ]
        # A hard bound on the client: the run, the warm-up, the slowest request, and slack.
        limit = (duration or 0) + args.warmup + timeout * 2 + 60
        if requests:
            limit += requests * 0.05
        client = self.procs.start(cmd, self.env(), self.logs / f"{tag}-load.log")
        try:
            if profile is not None:
                time.sleep(args.warmup + 1)
                self.record_profile(watch.pgid, profile)
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


@dataclass(frozen=True, slots=True)
class Watch:
    """The processes a load run accounts CPU to."""

    pgid: int
    proxy_pid: int | None
    provider_pid: int | None
    provider_url: str | None


# Alternating user and assistant rows 1..n, as threadline stores a conversation's plain-text
# turns (no payload: such rows rebuild from ``content``), every turn answered.
_SEED_SESSIONS = """
INSERT INTO sessions (id, name, agent, user_id, last_seq, answered_seq)
SELECT gen_random_uuid(), %(prefix)s || i, 'echo', 'bench', %(n)s, %(n)s
FROM generate_series(0, %(lanes)s - 1) AS i
"""
_SEED_MESSAGES = """
INSERT INTO messages (id, session_id, seq, role, content)
SELECT gen_random_uuid(), s.id, k,
       CASE WHEN k %% 2 = 1 THEN 'user' ELSE 'assistant' END,
       CASE WHEN k %% 2 = 1 THEN 'an earlier question, number ' ELSE 'echo: an earlier answer ' END
           || k
FROM sessions AS s, generate_series(1, %(n)s) AS k
WHERE s.name LIKE %(prefix)s || '%%'
"""


def seeded_sessions_used(db_url: str, prefix: str, messages: int) -> str:
    """How many seeded sessions got turns beyond their seeded history, of how many."""
    import psycopg

    with psycopg.connect(db_url, connect_timeout=10) as conn:
        row = conn.execute(
            "SELECT count(*) FILTER (WHERE answered_seq > %(n)s), count(*) FROM sessions "
            "WHERE name LIKE %(prefix)s || '%%'",
            {"prefix": prefix, "n": messages},
        ).fetchone()
    return f"{row[0]} of {row[1]}" if row else "?"


def seed_history(db_url: str, prefix: str, lanes: int, messages: int) -> None:
    """Give sessions ``{prefix}0`` .. ``{prefix}{lanes-1}`` ``messages`` stored messages each,
    straight into the store's tables (on the running server's migrated database, before any
    load), then refresh the planner's statistics as autovacuum eventually would."""
    import psycopg

    params = {"prefix": prefix, "lanes": lanes, "n": messages}
    try:
        with psycopg.connect(db_url, autocommit=True, connect_timeout=10) as conn:
            conn.execute(_SEED_SESSIONS, params)
            conn.execute(_SEED_MESSAGES, params)
            conn.execute("ANALYZE sessions, messages")
    except psycopg.Error as exc:
        raise RuntimeError(f"seeding {lanes} sessions of {messages} messages: {exc}") from exc


# Run by the measured interpreter: the versions the servers import, not the orchestrator's.
_VERSIONS = """
import importlib.metadata, importlib.util, json, platform
packages = ("fastapi", "uvicorn", "pydantic", "pydantic-ai-slim", "openai", "httpx", "asyncpg",
            "psycopg", "aiohttp", "uvloop", "httptools")
found = {}
for name in packages:
    try:
        found[name] = importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
        pass
print(json.dumps({"python": platform.python_version(), "packages": found}))
"""


def machine(code: Checkout) -> dict[str, Any]:
    info: dict[str, Any] = {"cores": os.cpu_count(), "platform": platform.platform()}
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                info["cpu"] = line.split(":", 1)[1].strip()
                break
    with contextlib.suppress(OSError, ValueError):
        kib = int(Path("/proc/meminfo").read_text().split()[1])
        info["memory_gib"] = round(kib / 1024 / 1024, 1)
    with contextlib.suppress(OSError, ValueError, subprocess.SubprocessError):
        done = subprocess.run(
            [code.python, "-c", _VERSIONS],
            env=code.env(dict(os.environ)),
            capture_output=True,
            text=True,
            timeout=60,
            check=True,
        )
        info.update(json.loads(done.stdout))
    info["interpreter"] = code.python
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
        default=",".join(DEFAULT_SCENARIOS),
        help=f"comma-separated, from {', '.join(SCENARIOS)} (default: all but streams_10k)",
    )
    parser.add_argument(
        "--commit",
        default="HEAD",
        metavar="REV",
        help="the commit to measure, checked out into a temporary git worktree (default HEAD)",
    )
    parser.add_argument(
        "--python",
        metavar="PATH",
        help="run the worktree's code with this interpreter (threadline imported from the "
        "worktree's src) instead of installing one there with uv sync --locked --extra bench",
    )
    parser.add_argument(
        "--streams", type=int, default=10_000, help="streams_10k: streams held open at once"
    )
    parser.add_argument(
        "--stream-hold-s",
        type=float,
        # Long enough to open 10,000 streams (each a turn of its own) before the first close.
        default=300.0,
        help="streams_10k: how long each stream stays open (the echo model's delay)",
    )
    parser.add_argument(
        "--history-messages",
        type=int,
        default=10_000,
        help="long_history: stored messages per session before the run",
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
        help="after the scenarios, profile --profile-servers with py-spy under --profile-scenario",
    )
    parser.add_argument("--profile-seconds", type=int, default=10)
    parser.add_argument(
        "--profile-scenario",
        choices=("main", "openai"),
        default="main",
        help="the load the profiles run under: the echo model, or the fake provider",
    )
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
    """Profile each server under the ``--profile-scenario`` load; split its CPU by component."""
    args = bench.args
    args.profile.mkdir(parents=True, exist_ok=True)
    provider = args.profile_scenario == "openai"
    scenario = Scenario(
        "profile", args.db_latency_ms, 1, provider=provider, model_delay_ms=args.model_delay_ms
    )
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
    machine is doing; the median run is the one least moved by it. Held streams have no
    throughput: their median is by CPU per delta.
    """
    if "rps" not in done[0]:
        ordered = sorted(done, key=lambda r: r["server_cpu_ms_per_delta"] or 0)
        chosen = dict(ordered[len(done) // 2])
    else:
        chosen = dict(sorted(done, key=lambda r: r["rps"])[len(done) // 2])
        chosen["rps_all_runs"] = [r["rps"] for r in done]
    chosen["errors_all_runs"] = sum(r["errors"] for r in done)
    return chosen


def plan(args: argparse.Namespace) -> list[Scenario]:
    """The scenarios asked for, in ``SCENARIOS`` order (the headline first)."""
    lat, delay = args.db_latency_ms, args.model_delay_ms
    first_token = delay / STREAM_REPLY_CHUNKS
    every = {
        "openai": Scenario("openai", lat, 1, provider=True, model_delay_ms=delay),
        "stream_openai": Scenario(
            "stream_openai",
            lat,
            1,
            stream=True,
            provider=True,
            model_delay_ms=delay,
            first_token_ms=first_token,
        ),
        "main": Scenario("main", lat, 1, model_delay_ms=delay),
        "zero_latency": Scenario("zero_latency", 0.0, 1, model_delay_ms=delay),
        "burst": Scenario("burst", lat, args.burst, model_delay_ms=delay),
        "webhook": Scenario("webhook", lat, 1, webhook=True, model_delay_ms=delay),
        "stream": Scenario(
            "stream", lat, 1, stream=True, model_delay_ms=delay, first_token_ms=first_token
        ),
        "long_history": Scenario("long_history", lat, 1, model_delay_ms=delay, lane_sessions=True),
        "streams_10k": Scenario(
            "streams_10k",
            lat,
            1,
            stream=True,
            model_delay_ms=args.stream_hold_s * 1000,
            held_streams=args.streams,
        ),
    }
    skip = {"zero_latency": lat <= 0, "burst": args.burst <= 1}
    return [every[name] for name in SCENARIOS if name in args.scenarios and not skip.get(name)]


def servers_for(scenario: Scenario, names: list[str]) -> list[str]:
    for applies, allowed in (
        (scenario.burst > 1, BURST_SERVERS),
        (scenario.webhook, WEBHOOK_SERVERS),
        (scenario.stream, STREAM_SERVERS),
        (scenario.provider, PROVIDER_SERVERS),
        (bool(scenario.held_streams), HELD_SERVERS),
        (scenario.lane_sessions, HISTORY_SERVERS),
    ):
        if applies:
            names = [n for n in names if n in allowed]
    return names


def variants(scenario: Scenario, name: str, history: int) -> list[tuple[str, Scenario]]:
    """(row label, scenario) per measured run of ``name``: ``long_history`` runs each server
    on fresh sessions, then on sessions holding ``history`` messages. The fresh run's database
    holds as many messages in sessions no lane writes to: a table of 2 million rows costs
    PostgreSQL more per statement than a new one (its cache), which is not what a session's
    own history costs."""
    if not scenario.lane_sessions:
        return [(name, scenario)]
    return [
        (f"{name}_fresh", dataclasses.replace(scenario, ballast=history)),
        (f"{name}_history_{history}", dataclasses.replace(scenario, history=history)),
    ]


TITLES = {
    "openai": "threadline's assistant agent on a real OpenAI provider client against a fake "
    "OpenAI-compatible server ({delay:g} ms), database +{lat:g} ms per round trip",
    "stream_openai": "the same, streamed (SSE to the client, a streamed provider call); latency "
    "= request sent to the final event",
    "main": "echo model ({delay:g} ms), database +{lat:g} ms per round trip",
    "zero_latency": "database on loopback, no added latency",
    "burst": "bursts of {burst} messages per session, database +{lat:g} ms",
    "webhook": "background requests, latency = request sent to webhook received, "
    "database +{lat:g} ms",
    "stream": "streamed requests (SSE), latency = request sent to the final event, "
    "database +{lat:g} ms",
    "long_history": "each lane writes to one session: fresh, or holding {history:,} stored "
    "messages; database +{lat:g} ms",
    "streams_10k": "{streams:,} streams held open at once on one worker, each reply spread "
    "over {hold:g} s",
}


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
        stack.callback(procs.stop_all)
        print(f"checking out {args.commit} ...", file=sys.stderr)
        code = checkout.create(REPO, args.commit, args.python, procs)
        stack.callback(checkout.remove, code.path, REPO)
        print(f"measuring commit {code.sha} from {code.path}", file=sys.stderr)
        info = machine(code)
        logs = args.logs or Path(stack.enter_context(tempfile.TemporaryDirectory()))
        logs.mkdir(parents=True, exist_ok=True)
        bench = Bench(args, postgres, procs, logs, code)
        runs: dict[tuple[str, str], list[dict[str, Any]]] = {}
        for repeat in range(args.repeat):
            for scenario in scenarios:
                names = servers_for(scenario, [n for n in args.servers if n not in skipped])
                for name in names:
                    for row, variant in variants(scenario, name, args.history_messages):
                        label = f"{scenario.name}/{row}"
                        elapsed = time.monotonic() - started
                        print(f"[{elapsed:5.0f}s] {label} (run {repeat + 1})", file=sys.stderr)
                        try:
                            result = bench.run_server(name, variant, label=row)
                        except (RuntimeError, OSError) as exc:
                            failures[f"{label} (run {repeat + 1})"] = str(exc)
                            print(f"  failed: {exc}", file=sys.stderr)
                            continue
                        runs.setdefault((scenario.name, row), []).append(result)
                        print(f"  {one_line(result)}", file=sys.stderr)
        for (scenario_name, name), done in runs.items():
            results[scenario_name][name] = median_run(done)
        if args.profile:
            profiles = run_profiles(bench, skipped, failures)

    sections = []
    for scenario in scenarios:
        title = TITLES[scenario.name].format(
            delay=args.model_delay_ms,
            lat=scenario.db_latency_ms,
            burst=scenario.burst,
            history=args.history_messages,
            streams=args.streams,
            hold=args.stream_hold_s,
        )
        sections.append(f"### {scenario.name}: {title}\n\n")
        if scenario.held_streams:
            sections[-1] += markdown_held(results[scenario.name], skipped)
        else:
            sections[-1] += markdown(scenario, results[scenario.name], skipped)
        if scenario.provider:
            sections[-1] += provider_note(results[scenario.name], args.model_delay_ms)
        used = {
            n: r["seeded_sessions_answered"]
            for n, r in results[scenario.name].items()
            if "seeded_sessions_answered" in r
        }
        if used:
            sections[-1] += "\n\nSeeded sessions the measured turns answered: " + ", ".join(
                f"`{n}` {v}" for n, v in used.items()
            )
    targets = evaluate(results, args.concurrency)
    lines = [
        f"- {'MET' if t['met'] else 'MISSED' if t['met'] is False else 'NOT MEASURED'}: "
        f"{t['target']} ({t['detail']})"
        for t in targets
    ]
    settings = {
        "commit": code.sha,
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
        "streams": args.streams,
        "stream_hold_s": args.stream_hold_s,
        "history_messages": args.history_messages,
        "database_url": args.database_url,
    }
    for name, profile in profiles.items():
        sections.append(
            f"### CPU profile: {name} ({profile['samples']} samples, "
            f"{profile['cpu_ms_per_request']} ms of server CPU per request)\n\n" + profile["table"]
        )
    head = (
        f"Commit `{code.sha}` ({args.commit}), "
        f"{dt.datetime.now(dt.UTC).isoformat(timespec='minutes')}, "
        f"concurrency {args.concurrency}, "
        + (f"{args.requests} requests" if args.requests else f"{args.duration:g} s")
        + " per server\n\n"
    )
    report = head + "\n\n".join(sections) + "\n\n### targets\n\n" + "\n".join(lines) + "\n"
    print(report)
    for label, reason in failures.items():
        print(f"FAILED {label}: {reason}", file=sys.stderr)
    if args.markdown:
        args.markdown.parent.mkdir(parents=True, exist_ok=True)
        args.markdown.write_text(report)
    if args.json:
        headline = results.get("openai") or results.get("main", {})
        document = {
            "date": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
            "commit": code.sha,
            "settings": settings,
            "machine": info | {"postgres": postgres.version() if not problem else None},
            "servers": headline,
            "scenarios": results,
            "skipped": skipped,
            "failed": failures,
            "targets": targets,
            "profiles": {k: {x: v[x] for x in v if x != "table"} for k, v in profiles.items()},
        }
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(document, indent=2) + "\n")
    return 1 if failures else 0


def one_line(result: dict[str, Any]) -> str:
    if "kib_per_stream" in result:
        return (
            f"{result['opened']}/{result['streams']} open, {result['kib_per_stream']} KiB per "
            f"stream, {result['server_cpu_ms_per_delta']} ms CPU per delta, "
            f"{result['errors']} errors"
        )
    return (
        f"{result['rps']} req/s, mean {result['mean_ms']} ms, p99 {result['p99_ms']} ms, "
        f"{result['errors']} errors, loop lag max {result['loop_lag_max_ms']} ms"
    )


if __name__ == "__main__":
    sys.exit(main())

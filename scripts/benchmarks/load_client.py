"""The load generator: bounded aiohttp loops that check every response and keep every latency.

    python scripts/benchmarks/load_client.py --url http://127.0.0.1:8000 --concurrency 200 \\
        --duration 15 --out result.json

``agent_run_bench.py`` runs it in a process of its own (the server under test must not share an
event loop or a GIL with its load), but it works against any server with threadline's route.
It uses aiohttp: on this machine httpx spent 3-5 ms of CPU per request at 200 connections,
aiohttp 0.3 ms, and the client shares the machine's two cores with the server it measures.

Phases: warm-up (pools fill, statements get prepared; not measured), then
POST /debug/metrics/reset (a read that also resets the server's loop-lag window), the measured
phase, and a final read of /debug/metrics. Every request must answer 2xx with a body that
echoes its own prompt; anything else is an error, counted by kind. Latencies are raw
per-request wall times, never a histogram's estimate.

Modes: one new session per request (the default), or ``--burst K``: ``concurrency // K`` lanes
each send K messages to one new session at once, as a user typing fast does. With
``--webhook-secret`` every request is a background one (202) naming a webhook receiver that
runs in this process; its latency is from sending the request to receiving the signed webhook
that answers it (checked: signature, and a reply that echoes the prompt). With ``--stream``
every request asks for Server-Sent Events: the latency is to the final event (a
``run.completed`` whose body passes the same checks), and the time to the first
``text.delta`` is kept too (events parsed with httpx-sse's decoder). ``--agent`` picks the
route (``assistant`` runs on the server's provider model); ``--lane-sessions`` sends each lane's
messages to one session of its own (the ``long_history`` scenario seeds those sessions);
``--prompt-words`` lengthens every prompt, hence the reply and the number of streamed chunks.

``--open-streams N`` (the ``streams_10k`` scenario) opens N streams at once, at most
``--ramp`` connecting at a time, and holds them: the server's resident memory at N/2 and N
open streams gives the memory per stream, and its CPU over ``--duration`` seconds once all are
open, over the deltas received meanwhile, the CPU per delta. The client lifts its own
file-descriptor soft limit to the hard one.

CPU accounting (Linux): with ``--watch-pgid`` / ``--watch-pid`` the client reads /proc before
and after the measured phase, so the report can say how many milliseconds of CPU each request
cost the server, PostgreSQL, the latency proxy and the client itself; with
``--watch-provider-pgid`` and ``--provider-url``, the fake provider too, and its own service
times (``fake_openai_server.py``'s /stats), reset with the server's metrics.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import dataclasses
import hashlib
import hmac
import json
import os
import resource
import time
import uuid
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
from aiohttp import web
from httpx_sse._decoders import SSEDecoder

METRIC_READS = 8  # fresh connections, so that with several workers each one is likely read


@dataclass
class Phase:
    latencies_ms: list[float] = field(default_factory=list)
    # ``--stream``: time from sending to the first text.delta, per successful request.
    first_delta_ms: list[float] = field(default_factory=list)
    deltas: int = 0
    # When each successful request finished, in seconds from the start of the phase.
    finished_s: list[float] = field(default_factory=list)
    errors: dict[str, int] = field(default_factory=dict)
    error_samples: list[str] = field(default_factory=list)
    sent: int = 0
    ok: int = 0
    elapsed_s: float = 0.0
    window_s: float = 0.0
    bursts: int = 0
    bursts_answered: int = 0
    bursts_merged: int = 0

    def error(self, kind: str, detail: str) -> None:
        self.errors[kind] = self.errors.get(kind, 0) + 1
        if len(self.error_samples) < 5:
            self.error_samples.append(f"{kind}: {detail[:300]}")


class Hooks:
    """The webhook receiver of ``--webhook-secret`` runs: when each message's answer came.

    A webhook may arrive before the 202 that announces its message id has been read, so
    arrivals are kept until asked for, and a waiter is woken when its arrival comes later.
    """

    def __init__(self, secret: str) -> None:
        self.secret = secret.encode()
        self.url = ""
        self._arrived: dict[str, tuple[float, str]] = {}
        self._waiting: dict[str, asyncio.Future[tuple[float, str]]] = {}
        self.deliveries = 0
        self.repeats = 0
        self.bad_signatures = 0
        self._seen: set[str] = set()

    async def receive(self, request: web.Request) -> web.Response:
        arrived = time.perf_counter()
        body = await request.read()
        stamp = request.headers.get("Threadline-Webhook-Timestamp", "")
        mac = hmac.new(self.secret, stamp.encode() + b"." + body, hashlib.sha256)
        sent = request.headers.get("Threadline-Webhook-Signature", "").split()
        if not any(hmac.compare_digest("v1=" + mac.hexdigest(), s) for s in sent):
            self.bad_signatures += 1
            return web.Response(status=401)
        delivery = request.headers.get("Threadline-Webhook-Id", "")
        if delivery in self._seen:
            self.repeats += 1  # at least once: a repeat is acknowledged, not counted again
            return web.Response(status=204)
        self._seen.add(delivery)
        self.deliveries += 1
        event = json.loads(body)
        text = (event.get("reply") or {}).get("message") or f"error: {event.get('error')}"
        for message_id in event["message_ids"]:
            waiter = self._waiting.pop(message_id, None)
            if waiter is not None and not waiter.done():
                waiter.set_result((arrived, text))
            else:
                self._arrived[message_id] = (arrived, text)
        return web.Response(status=204)

    async def answer(self, message_id: str) -> tuple[float, str]:
        found = self._arrived.pop(message_id, None)
        if found is not None:
            return found
        waiter: asyncio.Future[tuple[float, str]] = asyncio.get_running_loop().create_future()
        self._waiting[message_id] = waiter
        try:
            return await waiter
        finally:
            self._waiting.pop(message_id, None)

    @contextlib.asynccontextmanager
    async def serving(self) -> Any:
        app = web.Application()
        app.router.add_post("/hook", self.receive)
        runner = web.AppRunner(app, access_log=None)
        await runner.setup()
        site = web.TCPSite(runner, "127.0.0.1", 0)
        await site.start()
        port = runner.addresses[0][1]
        self.url = f"http://127.0.0.1:{port}/hook"
        try:
            yield self
        finally:
            await runner.cleanup()


@dataclass
class Plan:
    url: str
    concurrency: int
    requests: int | None
    duration: float | None
    burst: int
    timeout: float
    tag: str
    hooks: Hooks | None = None
    stream: bool = False
    # The agent whose route is loaded: ``echo``, or ``assistant`` on a provider model.
    agent: str = "echo"
    # Each lane sends every message to one session of its own (``{tag}-{phase}-lane-{i}``)
    # instead of a new session per message.
    lane_sessions: bool = False
    # Filler words after each prompt's marker: a longer reply, streamed in more chunks.
    prompt_words: int = 0
    # Each prompt asks the echo model to call its current_time tool first: every turn runs a
    # tool and makes two model requests.
    tool_call: bool = False

    @property
    def route(self) -> str:
        return f"/api/v1/agent/{self.agent}/run"

    def prompt(self, marker: str) -> str:
        text = f"<{marker}>"
        if self.prompt_words > 0:
            text += " " + " ".join(f"w{i}" for i in range(self.prompt_words))
        return f"/call current_time {{}}\n{text}" if self.tool_call else text


def _check(body: Any, prompts: list[str]) -> str | None:
    """Why ``body`` is not a well-formed answer to ``prompts``; None when it is."""
    if not isinstance(body, dict):
        return "body is not a JSON object"
    message = body.get("message")
    if not isinstance(message, str):
        return "no message"
    if not all(p in message for p in prompts):
        return f"message does not echo {prompts!r}: {message!r}"
    if body.get("success") is not True:
        return "success is not true"
    try:
        uuid.UUID(str(body.get("session_id")))
        uuid.UUID(str(body.get("run_id")))
    except ValueError:
        return "session_id or run_id is not a UUID"
    if not isinstance(body.get("message_ids"), list):
        return "no message_ids"
    return None


async def _send(
    client: aiohttp.ClientSession,
    plan: Plan,
    phase: Phase,
    origin: float,
    session: str,
    prompt: str,
) -> str | None:
    """One request; returns the reply text when it passed every check."""
    if plan.hooks is not None:
        return await _send_background(client, plan, plan.hooks, phase, origin, session, prompt)
    if plan.stream:
        return await _send_streaming(client, plan, phase, origin, session, prompt)
    payload = {"message_content": prompt, "session_name": session, "user_id": "bench"}
    phase.sent += 1
    started = time.perf_counter()
    try:
        async with asyncio.timeout(plan.timeout), client.post(plan.route, json=payload) as response:
            raw = await response.read()
            status = response.status
    except TimeoutError:
        phase.error("timeout", f"no answer within {plan.timeout:g}s")
        return None
    except aiohttp.ClientError as exc:
        phase.error(type(exc).__name__, str(exc))
        return None
    finished = time.perf_counter()
    latency = (finished - started) * 1000
    if not 200 <= status < 300:
        phase.error(f"status {status}", raw.decode(errors="replace"))
        return None
    try:
        body = json.loads(raw)
    except ValueError:
        phase.error("invalid JSON", raw.decode(errors="replace"))
        return None
    problem = _check(body, [prompt])
    if problem is not None:
        phase.error("bad body", problem)
        return None
    phase.latencies_ms.append(latency)
    phase.finished_s.append(finished - origin)
    phase.ok += 1
    message: str = body["message"]
    return message


async def _send_streaming(
    client: aiohttp.ClientSession,
    plan: Plan,
    phase: Phase,
    origin: float,
    session: str,
    prompt: str,
) -> str | None:
    """One streamed request: timed to its first text.delta and to its final event."""
    payload: dict[str, Any] = {
        "message_content": prompt,
        "session_name": session,
        "user_id": "bench",
        "stream": True,
    }
    phase.sent += 1
    started = time.perf_counter()
    first: float | None = None
    final = None
    decoder = SSEDecoder()
    try:
        async with asyncio.timeout(plan.timeout), client.post(plan.route, json=payload) as response:
            if response.status != 200:
                raw = await response.read()
                phase.error(f"status {response.status}", raw.decode(errors="replace"))
                return None
            async for line in response.content:
                event = decoder.decode(line.decode().rstrip("\r\n"))
                if event is None:
                    continue
                if event.event == "text.delta":
                    phase.deltas += 1
                    if first is None:
                        first = time.perf_counter()
                elif event.event in ("run.completed", "run.failed"):
                    final = event
    except TimeoutError:
        phase.error("timeout", f"no answer within {plan.timeout:g}s")
        return None
    except aiohttp.ClientError as exc:
        phase.error(type(exc).__name__, str(exc))
        return None
    finished = time.perf_counter()
    if final is None or final.event != "run.completed":
        phase.error("no run.completed", final.data if final is not None else "stream ended")
        return None
    body = json.loads(final.data)
    problem = _check(body, [prompt]) or (None if first is not None else "no text.delta")
    if problem is not None:
        phase.error("bad stream", problem)
        return None
    assert first is not None
    phase.first_delta_ms.append((first - started) * 1000)
    phase.latencies_ms.append((finished - started) * 1000)
    phase.finished_s.append(finished - origin)
    phase.ok += 1
    message: str = body["message"]
    return message


async def _send_background(
    client: aiohttp.ClientSession,
    plan: Plan,
    hooks: Hooks,
    phase: Phase,
    origin: float,
    session: str,
    prompt: str,
) -> str | None:
    """One background request, timed until the webhook that answers it arrives."""
    payload = {
        "message_content": prompt,
        "session_name": session,
        "user_id": "bench",
        "background": True,
        "webhook_url": hooks.url,
    }
    phase.sent += 1
    started = time.perf_counter()
    try:
        async with asyncio.timeout(plan.timeout):
            async with client.post(plan.route, json=payload) as response:
                raw = await response.read()
                status = response.status
            if status != 202:
                phase.error(f"status {status}", raw.decode(errors="replace"))
                return None
            arrived, message = await hooks.answer(json.loads(raw)["message_id"])
    except TimeoutError:
        phase.error("timeout", f"no webhook within {plan.timeout:g}s")
        return None
    except aiohttp.ClientError as exc:
        phase.error(type(exc).__name__, str(exc))
        return None
    except (ValueError, KeyError) as exc:
        phase.error("bad body", repr(exc))
        return None
    if prompt not in message:
        phase.error("bad webhook", f"reply does not echo {prompt!r}: {message!r}")
        return None
    phase.latencies_ms.append((arrived - started) * 1000)
    phase.finished_s.append(arrived - origin)
    phase.ok += 1
    return message


async def _drive(client: aiohttp.ClientSession, plan: Plan, name: str, burst: int) -> Phase:
    """Run one phase: lanes take the next unit of work until the count or the clock runs out."""
    phase = Phase()
    started = time.perf_counter()
    deadline = started + plan.duration if plan.duration is not None else None
    units = plan.requests if plan.requests is not None else None
    if units is not None and burst > 1:
        units = max(1, units // burst)
    lanes = max(1, plan.concurrency // burst)
    counter = iter(range(10**9))

    async def lane(number: int) -> None:
        while True:
            index = next(counter)
            if units is not None and index >= units:
                return
            if deadline is not None and time.perf_counter() >= deadline:
                return
            session = f"{plan.tag}-{name}-{index}"
            if plan.lane_sessions:
                session = f"{plan.tag}-{name}-lane-{number}"
            if burst <= 1:
                prompt = plan.prompt(f"{plan.tag}-{name}-{index}")
                await _send(client, plan, phase, started, session, prompt)
                continue
            prompts = [f"<{session}:{k}>" for k in range(burst)]
            replies = await asyncio.gather(
                *(_send(client, plan, phase, started, session, p) for p in prompts)
            )
            phase.bursts += 1
            if all(r is not None for r in replies):
                phase.bursts_answered += 1
                if all(all(p in r for p in prompts) for r in replies if r is not None):
                    phase.bursts_merged += 1

    await asyncio.gather(*(lane(number) for number in range(lanes)))
    phase.elapsed_s = time.perf_counter() - started
    phase.window_s = plan.duration if plan.duration is not None else phase.elapsed_s
    return phase


async def _read_metrics(url: str, reset: bool) -> list[dict[str, Any]]:
    """Several reads on fresh connections: with N workers each read lands on one of them."""
    reads = []
    for _ in range(METRIC_READS):
        with contextlib.suppress(aiohttp.ClientError, TimeoutError, ValueError):
            async with (
                aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=10)) as client,
                client.request(
                    "POST" if reset else "GET",
                    f"{url}/debug/metrics/reset" if reset else f"{url}/debug/metrics",
                ) as r,
            ):
                if r.status == 200:
                    reads.append(await r.json())
    return reads


def _clock_ticks() -> float:
    return float(os.sysconf("SC_CLK_TCK"))


def _proc_stats() -> Iterator[tuple[int, str, list[str]]]:
    """(pid, comm, the fields after comm) of every live process, from /proc/<pid>/stat."""
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit():
            continue
        try:
            with open(f"/proc/{entry.name}/stat", "rb") as f:
                stat = f.read().decode(errors="replace")
        except OSError:
            continue
        # comm may hold spaces and parentheses: split after the last ')'.
        comm = stat[stat.index("(") + 1 : stat.rindex(")")]
        yield int(entry.name), comm, stat[stat.rindex(")") + 2 :].split()


def _proc_cpu(match: Any) -> float:
    """CPU seconds (user + system) of every live process for which ``match(pid, stat)`` holds."""
    total = 0
    for pid, comm, fields in _proc_stats():
        if match(pid, comm, fields):
            total += int(fields[11]) + int(fields[12])
    return total / _clock_ticks()


def _machine_cpu() -> tuple[float, float]:
    """Busy and stolen CPU seconds of the whole machine, all cores, from /proc/stat."""
    with open("/proc/stat") as f:
        fields = [int(v) for v in f.readline().split()[1:]]
    # user nice system idle iowait irq softirq steal (guest time is already in user)
    busy = fields[0] + fields[1] + fields[2] + fields[5] + fields[6]
    steal = fields[7] if len(fields) > 7 else 0
    return busy / _clock_ticks(), steal / _clock_ticks()


def cpu_snapshot(watch: Watch) -> dict[str, float]:
    if not os.path.isdir("/proc"):
        return {}
    groups = set(watch.server_pgids)
    provider = set(watch.provider_pgids)
    proxies = set(watch.proxy_pids)
    times = os.times()
    busy, steal = _machine_cpu()
    snapshot = {
        "machine_busy": busy,
        "machine_steal": steal,
        "server": _proc_cpu(lambda pid, comm, f: int(f[2]) in groups),
        "proxy": _proc_cpu(lambda pid, comm, f: pid in proxies),
        "postgres": _proc_cpu(lambda pid, comm, f: comm.startswith("postgres")),
        "client": times.user + times.system,
    }
    if provider:
        snapshot["provider"] = _proc_cpu(lambda pid, comm, f: int(f[2]) in provider)
    return snapshot


@dataclass
class Watch:
    """What the client accounts CPU to: the server's process groups, the latency proxy's pid,
    the fake provider's group (and its /stats URL, read like /debug/metrics)."""

    server_pgids: list[int] = field(default_factory=list)
    proxy_pids: list[int] = field(default_factory=list)
    provider_pgids: list[int] = field(default_factory=list)
    provider_url: str | None = None


async def _provider_stats(watch: Watch, reset: bool) -> dict[str, Any] | None:
    if watch.provider_url is None:
        return None
    with contextlib.suppress(aiohttp.ClientError, TimeoutError, ValueError):
        async with (
            aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=10)) as client,
            client.request("POST" if reset else "GET", f"{watch.provider_url}/stats") as r,
        ):
            stats: dict[str, Any] = await r.json()
            return stats
    return None


async def run(plan: Plan, warmup_s: float, watch: Watch) -> dict[str, Any]:
    connector = aiohttp.TCPConnector(limit=plan.concurrency)
    async with aiohttp.ClientSession(
        base_url=plan.url, connector=connector, timeout=aiohttp.ClientTimeout(total=plan.timeout)
    ) as client:
        warm = dataclasses.replace(plan, requests=None, duration=warmup_s, burst=1)
        warmup = await _drive(client, warm, "warmup", 1) if warmup_s > 0 else Phase()
        before = await _read_metrics(plan.url, reset=True)
        await _provider_stats(watch, reset=True)
        cpu_before = cpu_snapshot(watch)
        measured = await _drive(client, plan, "run", plan.burst)
        cpu_after = cpu_snapshot(watch)
        provider = await _provider_stats(watch, reset=False)
        after = await _read_metrics(plan.url, reset=False)
    hooks = plan.hooks
    return {
        "warmup": {"sent": warmup.sent, "ok": warmup.ok, "errors": warmup.errors},
        "measured": asdict(measured),
        "metrics_before": before,
        "metrics_after": after,
        "cpu_s": {k: cpu_after[k] - cpu_before[k] for k in cpu_after},
        "provider": provider,
        "webhooks": None
        if hooks is None
        else {
            "deliveries": hooks.deliveries,
            "repeats": hooks.repeats,
            "bad_signatures": hooks.bad_signatures,
        },
    }


@dataclass
class Held:
    """``--open-streams``: how many streams are open, and the deltas they have received."""

    opened: int = 0
    deltas: int = 0
    completed: int = 0
    first_delta_ms: list[float] = field(default_factory=list)
    errors: dict[str, int] = field(default_factory=dict)
    error_samples: list[str] = field(default_factory=list)

    def error(self, kind: str, detail: str) -> None:
        self.errors[kind] = self.errors.get(kind, 0) + 1
        if len(self.error_samples) < 5:
            self.error_samples.append(f"{kind}: {detail[:300]}")


async def _held_stream(
    client: aiohttp.ClientSession, plan: Plan, held: Held, ramp: asyncio.Semaphore, index: int
) -> None:
    """One stream kept open to its end: counted open at ``run.started`` (its model call is in
    flight), each ``text.delta`` counted as it comes."""
    session = f"{plan.tag}-held-{index}"
    prompt = plan.prompt(session)
    payload: dict[str, Any] = {
        "message_content": prompt,
        "session_name": session,
        "user_id": "bench",
        "stream": True,
    }
    decoder = SSEDecoder()
    started = time.perf_counter()
    connecting = True
    delta_seen = False
    await ramp.acquire()
    final = None
    try:
        async with (
            asyncio.timeout(plan.timeout),
            client.post(plan.route, json=payload) as response,
        ):
            if response.status != 200:
                raw = await response.read()
                held.error(f"status {response.status}", raw.decode(errors="replace"))
                return
            async for line in response.content:
                event = decoder.decode(line.decode().rstrip("\r\n"))
                if event is None:
                    continue
                if event.event == "run.started" and connecting:
                    held.opened += 1
                    connecting = False
                    ramp.release()
                elif event.event == "text.delta":
                    if not delta_seen:
                        delta_seen = True
                        held.first_delta_ms.append((time.perf_counter() - started) * 1000)
                    held.deltas += 1
                elif event.event in ("run.completed", "run.failed"):
                    final = event
    except TimeoutError:
        held.error("timeout", f"no final event within {plan.timeout:g}s")
        return
    except aiohttp.ClientError as exc:
        held.error(type(exc).__name__, str(exc))
        return
    finally:
        if connecting:
            ramp.release()
    if final is None or final.event != "run.completed":
        held.error("no run.completed", final.data if final is not None else "stream ended")
        return
    problem = _check(json.loads(final.data), [prompt])
    if problem is not None:
        held.error("bad stream", problem)
        return
    held.completed += 1


def group_rss_kib(pgids: list[int]) -> int:
    """Resident memory of every process in the groups, KiB (Linux /proc)."""
    groups = set(pgids)
    page_kib = os.sysconf("SC_PAGE_SIZE") // 1024
    total = 0
    for pid, _, fields in _proc_stats():
        if int(fields[2]) not in groups:
            continue
        try:
            with open(f"/proc/{pid}/statm") as f:
                total += int(f.read().split()[1]) * page_kib
        except (OSError, ValueError, IndexError):
            continue
    return total


async def hold_streams(plan: Plan, streams: int, ramp: int, watch: Watch) -> dict[str, Any]:
    """``--open-streams N``: open N streams at once and keep them open; measure the server's
    memory per open stream and its CPU per delta while all of them are open.

    Memory per stream is the slope between N/2 and N open streams, so what the server
    allocates once (first use of a code path, pool connections) does not count; the plain
    (RSS at N - RSS before) / N is reported too. CPU per delta is the server's CPU over
    ``plan.duration`` seconds once all N are open, over the deltas received meanwhile.
    """
    held = Held()
    gate = asyncio.Semaphore(max(1, ramp))
    # No connection limit: every stream holds its own connection.
    connector = aiohttp.TCPConnector(limit=0)
    timeout = aiohttp.ClientTimeout(total=None, sock_connect=30)
    async with aiohttp.ClientSession(base_url=plan.url, connector=connector, timeout=timeout) as c:
        await _read_metrics(plan.url, reset=True)
        rss_before = group_rss_kib(watch.server_pgids)
        half = streams // 2
        started = time.perf_counter()
        tasks = [asyncio.create_task(_held_stream(c, plan, held, gate, i)) for i in range(half)]
        await _until_open(held, half, tasks, started + plan.timeout)
        opened_half, rss_half = held.opened, group_rss_kib(watch.server_pgids)
        tasks += [
            asyncio.create_task(_held_stream(c, plan, held, gate, i)) for i in range(half, streams)
        ]
        await _until_open(held, streams, tasks, started + plan.timeout)
        opened_all, rss_all = held.opened, group_rss_kib(watch.server_pgids)
        open_s = time.perf_counter() - started
        deltas_before, completed_before = held.deltas, held.completed
        cpu_before = cpu_snapshot(watch)
        window_started = time.perf_counter()
        await asyncio.sleep(plan.duration or 0)
        cpu_after = cpu_snapshot(watch)
        window_s = time.perf_counter() - window_started
        deltas, completed_in_window = (
            held.deltas - deltas_before,
            held.completed - completed_before,
        )
        after = await _read_metrics(plan.url, reset=False)
        await asyncio.gather(*tasks)
    return {
        "streams": streams,
        "opened_half": opened_half,
        "opened_all": opened_all,
        "open_s": round(open_s, 2),
        "rss_before_kib": rss_before,
        "rss_half_kib": rss_half,
        "rss_all_kib": rss_all,
        "window_s": window_s,
        "deltas_in_window": deltas,
        "completed_in_window": completed_in_window,
        "completed": held.completed,
        "deltas": held.deltas,
        "first_delta_ms": held.first_delta_ms,
        "errors": held.errors,
        "error_samples": held.error_samples,
        "cpu_s": {k: cpu_after[k] - cpu_before[k] for k in cpu_after},
        "metrics_after": after,
    }


async def _until_open(
    held: Held, target: int, tasks: list[asyncio.Task[None]], deadline: float
) -> None:
    """Until ``target`` streams are open, every stream has ended, or the deadline passes."""
    while held.opened < target and time.perf_counter() < deadline:
        if all(t.done() for t in tasks):
            return
        await asyncio.sleep(0.05)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--url", required=True)
    parser.add_argument("--concurrency", type=int, default=200)
    parser.add_argument("--requests", type=int)
    parser.add_argument("--duration", type=float)
    parser.add_argument("--burst", type=int, default=1)
    parser.add_argument("--timeout", type=float, default=60.0, help="per request, seconds")
    parser.add_argument("--warmup", type=float, default=2.0, help="seconds, not measured")
    parser.add_argument("--tag", default=uuid.uuid4().hex[:8])
    parser.add_argument("--watch-pgid", type=int, action="append", default=[])
    parser.add_argument("--watch-pid", type=int, action="append", default=[])
    parser.add_argument(
        "--watch-provider-pgid", type=int, action="append", default=[], help="fake provider"
    )
    parser.add_argument("--provider-url", help="the fake provider's base, for its /stats")
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--agent", default="echo", help="the agent route to load")
    parser.add_argument(
        "--lane-sessions",
        action="store_true",
        help="each lane sends every message to one session of its own",
    )
    parser.add_argument("--prompt-words", type=int, default=0, help="filler words per prompt")
    parser.add_argument(
        "--tool-call", action="store_true", help="echo agent: every turn calls a tool first"
    )
    parser.add_argument(
        "--webhook-secret",
        help="send background requests with a webhook to a receiver here (the server's secret)",
    )
    parser.add_argument(
        "--stream", action="store_true", help="ask for SSE; also time the first text.delta"
    )
    parser.add_argument(
        "--open-streams",
        type=int,
        metavar="N",
        help="hold N streams open at once (--duration: the CPU window once all are open)",
    )
    parser.add_argument(
        "--ramp", type=int, default=500, help="--open-streams: streams connecting at once"
    )
    args = parser.parse_args()
    if (args.requests is None) == (args.duration is None):
        parser.error("give exactly one of --requests and --duration")
    if args.open_streams and args.duration is None:
        parser.error("--open-streams takes --duration")
    plan = Plan(
        args.url.rstrip("/"),
        args.concurrency,
        args.requests,
        args.duration,
        max(1, args.burst),
        args.timeout,
        args.tag,
        stream=args.stream,
        agent=args.agent,
        lane_sessions=args.lane_sessions,
        prompt_words=args.prompt_words,
        tool_call=args.tool_call,
    )
    watch = Watch(args.watch_pgid, args.watch_pid, args.watch_provider_pgid, args.provider_url)
    # 10,000 streams need 10,000 sockets: up to the hard limit.
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft != hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    loop_factory = None
    with contextlib.suppress(ImportError):
        import uvloop

        loop_factory = uvloop.new_event_loop

    async def measure() -> dict[str, Any]:
        if args.open_streams:
            return await hold_streams(plan, args.open_streams, args.ramp, watch)
        if args.webhook_secret is None:
            return await run(plan, args.warmup, watch)
        async with Hooks(args.webhook_secret).serving() as hooks:
            plan.hooks = hooks
            return await run(plan, args.warmup, watch)

    with asyncio.Runner(loop_factory=loop_factory) as runner:
        result = runner.run(measure())
    args.out.write_text(json.dumps(result))


if __name__ == "__main__":
    main()

"""Figures from the load client's raw results: the per-server summary, the tables, the targets.

Latency statistics come from every request's own wall time (nearest-rank percentiles), never
from a histogram's estimate. Throughput in ``--duration`` mode counts the requests finished
inside the window, so the drain after it (fewer requests in flight) does not understate a
saturated server.
"""

from __future__ import annotations

import math
import statistics
from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True, slots=True)
class Scenario:
    name: str
    db_latency_ms: float
    burst: int
    # Background requests answered by webhook: latency is request sent -> webhook received.
    webhook: bool = False
    # Streamed requests (SSE): latency to the final event, plus time to the first delta.
    stream: bool = False
    # The servers call the fake OpenAI-compatible provider (fake_openai_server.py).
    provider: bool = False
    # The simulated model's latency (the echo model's, or the fake provider's).
    model_delay_ms: float = 0.0
    # When the model's first token comes, for the time-to-first-delta target (streams only).
    first_token_ms: float | None = None
    # ``streams_10k``: this many streams held open at once against one worker.
    held_streams: int = 0
    # ``long_history``: each lane writes to one session that already holds this many messages
    # (0: a fresh session).
    history: int = 0
    # ``long_history``: lanes keep one session each.
    lane_sessions: bool = False
    # ``long_history``, fresh sessions: other sessions hold this many messages per lane, so
    # that both runs meet a table of the same size and only the lanes' own history differs.
    ballast: int = 0


def _percentile(ordered: list[float], p: float) -> float:
    """Nearest-rank percentile of an already sorted list."""
    if not ordered:
        return math.nan
    rank = max(1, math.ceil(p / 100 * len(ordered)))
    return ordered[min(rank, len(ordered)) - 1]


def _model_calls(reads: list[dict[str, Any]]) -> tuple[dict[str, int], int]:
    """Model-call counters summed over the distinct workers seen in ``reads``.

    /debug/metrics answers for the one worker that took the connection. Once the load has
    stopped the counters are still, so equal readings come from the same worker.
    """
    distinct = {}
    for read in reads:
        calls = read.get("model_calls", {})
        key = read.get("pid") or (
            calls.get("started"),
            calls.get("completed"),
            calls.get("cancelled"),
        )
        distinct[key] = calls
    total = {"started": 0, "completed": 0, "cancelled": 0}
    for calls in distinct.values():
        for k in total:
            total[k] += int(calls.get(k, 0))
    return total, len(distinct)


def summarize(raw: dict[str, Any], scenario: Scenario, duration: float | None) -> dict[str, Any]:
    measured = raw["measured"]
    latencies = sorted(measured["latencies_ms"])
    ok = len(latencies)
    errors = sum(measured["errors"].values())
    if duration:
        # Requests finished inside the window over the window: the drain after it, when fewer
        # than `concurrency` requests are in flight, would understate a saturated server.
        done = sum(1 for t in measured["finished_s"] if t <= measured["window_s"])
        rps = done / measured["window_s"]
    else:
        rps = ok / measured["elapsed_s"] if measured["elapsed_s"] else 0.0
    lags = [r["loop_lag"] for r in raw["metrics_after"] if "loop_lag" in r]
    before, _ = _model_calls(raw["metrics_before"])
    after, workers_seen = _model_calls(raw["metrics_after"])
    calls = {k: after[k] - before[k] for k in after}
    spent = dict(raw["cpu_s"])
    busy = spent.pop("machine_busy", None)
    steal = spent.pop("machine_steal", None)
    cpu = {k: round(v * 1000 / ok, 3) if ok else None for k, v in spent.items()}
    seconds = measured["elapsed_s"]
    machine: dict[str, Any] = {}
    if busy is not None and seconds:
        # Cores kept busy during the measured phase by anything we did not start: other
        # people's work on a shared machine, which the figures then understate us by.
        machine = {
            "busy_cores": round(busy / seconds, 2),
            "other_cores": round(max(0.0, busy - sum(spent.values())) / seconds, 2),
            "steal_cores": round((steal or 0) / seconds, 2),
        }
    result: dict[str, Any] = {
        "rps": round(rps, 1),
        "mean_ms": round(statistics.fmean(latencies), 1) if latencies else None,
        "p50_ms": round(_percentile(latencies, 50), 1) if latencies else None,
        "p95_ms": round(_percentile(latencies, 95), 1) if latencies else None,
        "p99_ms": round(_percentile(latencies, 99), 1) if latencies else None,
        "max_ms": round(latencies[-1], 1) if latencies else None,
        "errors": errors,
        "error_kinds": measured["errors"],
        "error_samples": measured["error_samples"],
        "requests": ok,
        "sent": measured["sent"],
        "loop_lag_max_ms": round(max((lag["max_ms"] for lag in lags), default=math.nan), 1),
        "loop_lag_p99_ms": round(max((lag["p99_ms"] for lag in lags), default=math.nan), 1),
        "metrics_workers_seen": workers_seen,
        "model_calls": calls,
        # The provider's calls are not counted by the server (only the echo model's are).
        "model_calls_per_message": round(calls["completed"] / measured["sent"], 3)
        if measured["sent"] and not scenario.provider
        else None,
        "cpu_ms_per_request": cpu,
        "machine_cpu": machine,
        "warmup": raw["warmup"],
    }
    if scenario.stream:
        first = sorted(measured["first_delta_ms"])
        result.update(
            first_delta_p50_ms=round(_percentile(first, 50), 1) if first else None,
            first_delta_p99_ms=round(_percentile(first, 99), 1) if first else None,
            deltas_per_request=round(measured.get("deltas", 0) / ok, 2) if ok else None,
            first_token_ms=scenario.first_token_ms,
        )
    if scenario.provider:
        stats = raw.get("provider") or {}
        provider_s = spent.get("provider")
        result["provider"] = {
            "cpu_ms_per_request": round(provider_s * 1000 / stats["requests"], 3)
            if provider_s is not None and stats.get("requests")
            else None,
            # One process, one event loop: at 1.0 it would be the bottleneck.
            "cores": round(provider_s / seconds, 2) if provider_s is not None and seconds else None,
            "delay_ms": scenario.model_delay_ms,
            **stats,
        }
    if scenario.burst > 1:
        result.update(
            bursts=measured["bursts"],
            bursts_answered=measured["bursts_answered"],
            bursts_merged=measured["bursts_merged"],
            model_calls_per_burst=round(calls["completed"] / measured["bursts"], 3)
            if measured["bursts"]
            else None,
        )
    return result


def summarize_held(raw: dict[str, Any]) -> dict[str, Any]:
    """``streams_10k``: memory per open stream and CPU per delta, from ``hold_streams``."""
    half = raw["opened_all"] - raw["opened_half"]
    slope = (raw["rss_all_kib"] - raw["rss_half_kib"]) / half if half > 0 else None
    plain = (
        (raw["rss_all_kib"] - raw["rss_before_kib"]) / raw["opened_all"]
        if raw["opened_all"]
        else None
    )
    cpu = raw["cpu_s"]
    deltas = raw["deltas_in_window"]
    first = sorted(raw["first_delta_ms"])
    lags = [r["loop_lag"] for r in raw["metrics_after"] if "loop_lag" in r]
    return {
        "streams": raw["streams"],
        "opened": raw["opened_all"],
        "open_s": raw["open_s"],
        "rss_mib": round(raw["rss_all_kib"] / 1024, 1),
        "kib_per_stream": round(slope, 1) if slope is not None else None,
        "kib_per_stream_plain": round(plain, 1) if plain is not None else None,
        "window_s": round(raw["window_s"], 2),
        "deltas_in_window": deltas,
        "completed_in_window": raw["completed_in_window"],
        "server_cpu_ms_per_delta": round(cpu["server"] * 1000 / deltas, 3) if deltas else None,
        "server_cores": round(cpu["server"] / raw["window_s"], 2) if raw["window_s"] else None,
        "first_delta_p50_ms": round(_percentile(first, 50), 1) if first else None,
        "first_delta_p99_ms": round(_percentile(first, 99), 1) if first else None,
        "completed": raw["completed"],
        "errors": sum(raw["errors"].values()),
        "error_kinds": raw["errors"],
        "error_samples": raw["error_samples"],
        "loop_lag_max_ms": round(max((lag["max_ms"] for lag in lags), default=math.nan), 1),
    }


def markdown_held(results: dict[str, Any], skipped: dict[str, str]) -> str:
    head = [
        "server",
        "streams open / asked",
        "seconds to open",
        "RSS MiB",
        "KiB per stream (slope N/2->N / plain)",
        "deltas in window",
        "CPU ms per delta",
        "server cores",
        "first delta p50 / p99 ms",
        "completed",
        "errors",
        "loop lag max ms",
    ]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for name, r in results.items():
        row = [
            f"`{name}`",
            f"{r['opened']} / {r['streams']}",
            _fmt(r["open_s"]),
            _fmt(r["rss_mib"]),
            f"{_fmt(r['kib_per_stream'])} / {_fmt(r['kib_per_stream_plain'])}",
            f"{r['deltas_in_window']} in {_fmt(r['window_s'])} s"
            + (f" ({r['completed_in_window']} streams ended)" if r["completed_in_window"] else ""),
            _fmt(r["server_cpu_ms_per_delta"]),
            _fmt(r["server_cores"]),
            f"{_fmt(r['first_delta_p50_ms'])} / {_fmt(r['first_delta_p99_ms'])}",
            _fmt(r["completed"]),
            _fmt(r["errors"]),
            _fmt(r["loop_lag_max_ms"]),
        ]
        lines.append("| " + " | ".join(row) + " |")
    for name, reason in skipped.items():
        lines.append(f"| `{name}` | skipped: {reason} |" + " |" * (len(head) - 2))
    return "\n".join(lines)


def provider_bound(result: dict[str, Any]) -> bool | None:
    """Whether the fake provider may have bounded a run: a core near its one event loop's
    limit, or service time beyond the model delay worth a tenth of the turn's mean latency
    (the extra time a busy or starved provider adds to every turn). None: not measured."""
    p = result.get("provider") or {}
    if not p.get("requests") or p.get("service_mean_ms") is None:
        return None
    extra = p["service_mean_ms"] - (p.get("delay_ms") or 0)
    return (p.get("cores") or 0) >= 0.7 or extra > 0.1 * (result.get("mean_ms") or math.inf)


def provider_note(results: dict[str, Any], delay_ms: float) -> str:
    """How the fake provider did in each run, and whether it may have bounded it."""
    lines = []
    for name, r in results.items():
        p = r.get("provider") or {}
        bound = provider_bound(r)
        if bound is None:
            continue
        lines.append(
            f"- `{name}`: {p['requests']} completions ({p.get('streamed', '?')} streamed), "
            f"{_fmt(p.get('cpu_ms_per_request'))} ms "
            f"of CPU each, {_fmt(p.get('cores'))} cores; service time mean "
            f"{_fmt(p.get('service_mean_ms'))} / p99 {_fmt(p.get('service_p99_ms'))} ms for a "
            f"{delay_ms:g} ms model delay (the turn: mean {_fmt(r.get('mean_ms'))} ms), at most "
            f"{p.get('in_flight_max')} in flight: "
            + ("**may have bounded this run**" if bound else "not the bottleneck")
        )
    if not lines:
        return ""
    return (
        "\n\nThe fake provider, one process and one event loop: it would bound a run at a core "
        "near 1.0, or by a service time beyond the model delay that is a noticeable share "
        "(a tenth) of the turn's latency:\n\n" + "\n".join(lines)
    )


def _fmt(value: Any) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "-"
    if isinstance(value, float):
        return f"{value:,.1f}" if abs(value) >= 10 else f"{value:.2f}"
    return str(value)


def _rps(result: dict[str, Any]) -> str:
    """Throughput of the reported run, with the range over repeats when there were some."""
    runs = result.get("rps_all_runs") or []
    if len(runs) < 2:
        return _fmt(result["rps"])
    return f"{_fmt(result['rps'])} ({_fmt(min(runs))}-{_fmt(max(runs))})"


def markdown(scenario: Scenario, results: dict[str, Any], skipped: dict[str, str]) -> str:
    burst = scenario.burst > 1
    head = [
        "server",
        "req/s",
        "mean ms",
        "p50 ms",
        "p95 ms",
        "p99 ms",
        "errors",
        "loop lag max / p99 ms",
        "CPU ms/req server / db / proxy / client",
        "other load (cores)",
        "model calls/msg",
    ]
    if burst:
        head += ["bursts answered", "model calls/burst"]
    if scenario.stream:
        head += ["first delta p50 / p99 ms"]
    if scenario.provider:
        head += ["provider CPU ms/req / cores"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for name, r in results.items():
        cpu = r["cpu_ms_per_request"]
        parts = ("server", "postgres", "proxy", "client")
        row = [
            f"`{name}`",
            _rps(r),
            _fmt(r["mean_ms"]),
            _fmt(r["p50_ms"]),
            _fmt(r["p95_ms"]),
            _fmt(r["p99_ms"]),
            _fmt(r["errors"]),
            f"{_fmt(r['loop_lag_max_ms'])} / {_fmt(r['loop_lag_p99_ms'])}",
            " / ".join(_fmt(cpu.get(k)) for k in parts),
            _fmt(r["machine_cpu"].get("other_cores")),
            _fmt(r["model_calls_per_message"]),
        ]
        if burst:
            row += [f"{r['bursts_answered']}/{r['bursts']}", _fmt(r["model_calls_per_burst"])]
        if scenario.stream:
            row += [f"{_fmt(r['first_delta_p50_ms'])} / {_fmt(r['first_delta_p99_ms'])}"]
        if scenario.provider:
            p = r.get("provider") or {}
            row += [f"{_fmt(p.get('cpu_ms_per_request'))} / {_fmt(p.get('cores'))}"]
        lines.append("| " + " | ".join(row) + " |")
    for name, reason in skipped.items():
        lines.append(f"| `{name}` | skipped: {reason} |" + " |" * (len(head) - 2))
    return "\n".join(lines)


def evaluate(scenarios: dict[str, dict[str, Any]], concurrency: int) -> list[dict[str, Any]]:
    """The targets of issues 5 and 12, each met, missed, or not measured (and why)."""
    targets: list[dict[str, Any]] = []

    def target(name: str, met: bool | None, detail: str = "not measured") -> None:
        targets.append({"target": name, "met": met, "detail": detail})

    def latency_below(scenario: str, share: float) -> None:
        results = scenarios.get(scenario, {})
        tl, base = results.get("threadline"), results.get("blocking_baseline")
        name = f"{scenario}: mean latency at least {share:.0%} below the blocking baseline"
        if tl and base and tl["mean_ms"] and base["mean_ms"]:
            ratio = tl["mean_ms"] / base["mean_ms"]
            detail = f"{tl['mean_ms']} vs {base['mean_ms']} ms: {(1 - ratio) * 100:.0f}% lower"
            target(name, ratio <= 1 - share, detail)
        else:
            target(name, None)

    def of_ceiling(scenario: str, share: float) -> None:
        results = scenarios.get(scenario, {})
        tl, ceiling = results.get("threadline"), results.get("ceiling")
        name = f"{scenario}: throughput at least {share:.0%} of the ceiling's"
        if tl and ceiling and ceiling["rps"]:
            ratio = tl["rps"] / ceiling["rps"]
            target(name, ratio >= share, f"{tl['rps']} vs {ceiling['rps']} req/s: {ratio:.0%}")
        else:
            target(name, None)

    def loop_lag(scenario: str, limit_ms: float) -> None:
        tl = scenarios.get(scenario, {}).get("threadline")
        name = f"{scenario}: event-loop lag max under {limit_ms:g} ms (threadline)"
        if tl:
            lag = f"max {tl['loop_lag_max_ms']} ms, p99 {tl['loop_lag_p99_ms']} ms"
            target(name, tl["loop_lag_max_ms"] < limit_ms, lag)
        else:
            target(name, None)

    def workers(scenario: str, factor: float) -> None:
        results = scenarios.get(scenario, {})
        tl, w2 = results.get("threadline"), results.get("threadline_w2")
        name = (
            f"{scenario}: --workers 2 at least {factor:g}x --workers 1"
            if factor > 1
            else f"{scenario}: --workers 2 faster than --workers 1"
        )
        if tl and w2 and tl["rps"]:
            ratio = w2["rps"] / tl["rps"]
            met = ratio >= factor if factor > 1 else ratio > 1
            target(name, met, f"{w2['rps']} vs {tl['rps']} req/s: {ratio:.2f}x")
        else:
            target(name, None)

    # openai (the provider path): issue 12.
    of_ceiling("openai", 0.85)
    name = "openai: server CPU per turn at most 1.5x the echo (main) scenario's (threadline)"
    tl_openai = scenarios.get("openai", {}).get("threadline")
    tl_main = scenarios.get("main", {}).get("threadline")
    cpu_openai = tl_openai["cpu_ms_per_request"].get("server") if tl_openai else None
    cpu_main = tl_main["cpu_ms_per_request"].get("server") if tl_main else None
    if cpu_openai and cpu_main:
        ratio = cpu_openai / cpu_main
        target(name, ratio <= 1.5, f"{cpu_openai} vs {cpu_main} ms: {ratio:.2f}x")
    else:
        target(name, None)
    latency_below("openai", 0.6)
    openai_runs = [
        (f"{s}/{n}", r)
        for s in ("openai", "stream_openai")
        for n, r in scenarios.get(s, {}).items()
    ]
    name = "openai: zero errors (every server, streamed or not)"
    failed = [
        f"{label}: {r.get('errors_all_runs', r['errors'])}"
        for label, r in openai_runs
        if r.get("errors_all_runs", r["errors"])
    ]
    if openai_runs:
        target(name, not failed, "; ".join(failed) or f"0 in {len(openai_runs)} runs")
    else:
        target(name, None)
    loop_lag("openai", 20)
    workers("openai", 1.3)
    name = "openai: the fake provider was not the bottleneck (provider_bound)"
    checked = [(label, provider_bound(r)) for label, r in openai_runs]
    checked = [(label, bound) for label, bound in checked if bound is not None]
    if checked:
        bad = [label for label, bound in checked if bound]
        target(name, not bad, "; ".join(bad) or f"in none of {len(checked)} runs")
    else:
        target(name, None)

    # main (echo model): issue 5's targets, raised by issue 12.
    latency_below("main", 0.5)
    of_ceiling("main", 0.85)
    loop_lag("main", 50)
    workers("main", 1.0)
    burst = scenarios.get("burst", {}).get("threadline")
    name = "burst: exactly one completed model call per burst, every caller answered"
    if burst:
        calls = burst["model_calls"]["completed"]
        met = calls == burst["bursts"] == burst["bursts_answered"] and burst["errors"] == 0
        detail = (
            f"{calls} completed model calls for {burst['bursts']} bursts; "
            f"{burst['bursts_answered']} bursts fully answered, {burst['errors']} errors"
        )
        target(name, met, detail)
    else:
        target(name, None)

    # Streaming.
    for scenario in ("stream", "stream_openai"):
        tl = scenarios.get(scenario, {}).get("threadline")
        first_token = (tl or {}).get("first_token_ms")
        name = f"{scenario}: time to first delta p99 under 2x the model's first-token delay"
        if tl and first_token and tl.get("first_delta_p99_ms") is not None:
            detail = (
                f"p99 {tl['first_delta_p99_ms']} ms vs 2 x {first_token:g} ms, "
                f"at {concurrency} streams" + ("" if concurrency == 200 else " (target: 200)")
            )
            target(name, tl["first_delta_p99_ms"] < 2 * first_token, detail)
        else:
            target(name, None)

    # Long history: must stay flat.
    results = scenarios.get("long_history", {})
    fresh = results.get("threadline_fresh")
    old = next((r for n, r in results.items() if n.startswith("threadline_history")), None)
    name = "long_history: server CPU per turn and mean latency within 20% of a fresh session's"
    if fresh and old and fresh["mean_ms"] and fresh["cpu_ms_per_request"].get("server"):
        cpu = old["cpu_ms_per_request"]["server"] / fresh["cpu_ms_per_request"]["server"]
        latency = old["mean_ms"] / fresh["mean_ms"]
        detail = f"CPU {cpu:.2f}x, mean latency {latency:.2f}x"
        target(name, cpu <= 1.2 and latency <= 1.2, detail)
    else:
        target(name, None)

    runs = [
        (f"{s}/{n}", r)
        for s, results in scenarios.items()
        for n, r in results.items()
        if n.startswith("threadline")
    ]
    failed = [
        f"{label}: {r.get('errors_all_runs', r['errors'])} ({r['error_kinds']} in the median run)"
        for label, r in runs
        if r.get("errors_all_runs", r["errors"])
    ]
    name = "zero errors (threadline, every scenario)"
    target(name, not failed if runs else None, "; ".join(failed) or f"0 in {len(runs)} runs")
    return targets

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
        "model_calls_per_message": round(calls["completed"] / measured["sent"], 3)
        if measured["sent"]
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
        )
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
        lines.append("| " + " | ".join(row) + " |")
    for name, reason in skipped.items():
        lines.append(f"| `{name}` | skipped: {reason} |" + " |" * (len(head) - 2))
    return "\n".join(lines)


def evaluate(scenarios: dict[str, dict[str, Any]]) -> list[dict[str, Any]]:
    """The issue's targets, each met, missed, or not measured (and why)."""
    main = scenarios.get("main", {})
    tl, base, ceiling, w2 = (
        main.get(n) for n in ("threadline", "blocking_baseline", "ceiling", "threadline_w2")
    )
    burst = scenarios.get("burst", {}).get("threadline")
    targets: list[dict[str, Any]] = []

    def target(name: str, met: bool | None, detail: str = "not measured") -> None:
        targets.append({"target": name, "met": met, "detail": detail})

    name = "mean latency at least 50% below the blocking baseline"
    if tl and base and tl["mean_ms"] and base["mean_ms"]:
        ratio = tl["mean_ms"] / base["mean_ms"]
        detail = f"{tl['mean_ms']} vs {base['mean_ms']} ms: {(1 - ratio) * 100:.0f}% lower"
        target(name, ratio <= 0.5, detail)
    else:
        target(name, None)
    name = "throughput at least 70% of the ceiling"
    if tl and ceiling and ceiling["rps"]:
        ratio = tl["rps"] / ceiling["rps"]
        target(name, ratio >= 0.7, f"{tl['rps']} vs {ceiling['rps']} req/s: {ratio:.0%}")
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
    name = "event-loop lag max under 50 ms (threadline)"
    if tl:
        lag = f"max {tl['loop_lag_max_ms']} ms, p99 {tl['loop_lag_p99_ms']} ms"
        target(name, tl["loop_lag_max_ms"] < 50, lag)
    else:
        target(name, None)
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
    name = "--workers 2 faster than --workers 1"
    if tl and w2:
        target(name, w2["rps"] > tl["rps"], f"{w2['rps']} vs {tl['rps']} req/s")
    else:
        target(name, None)
    return targets

"""The benchmark's targets (scripts/benchmarks/report.py) read the right figures.

Pure functions over result dicts shaped as ``summarize`` writes them: each target is checked
once on the side of its threshold that meets it and once on the side that misses it.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

# report.py imports nothing from its siblings, so it imports as a namespace module.
from scripts.benchmarks.report import Scenario, evaluate, provider_bound


def _result(rps: float, mean_ms: float, cpu_ms: float = 4.0, **extra: Any) -> dict[str, Any]:
    return {
        "rps": rps,
        "mean_ms": mean_ms,
        "p99_ms": mean_ms * 2,
        "errors": 0,
        "error_kinds": {},
        "loop_lag_max_ms": 10.0,
        "loop_lag_p99_ms": 5.0,
        "cpu_ms_per_request": {"server": cpu_ms},
        **extra,
    }


def _verdicts(scenarios: dict[str, dict[str, Any]], concurrency: int = 200) -> dict[str, Any]:
    return {t["target"]: t["met"] for t in evaluate(scenarios, concurrency)}


def _find(verdicts: dict[str, Any], start: str) -> Any:
    (name,) = [n for n in verdicts if n.startswith(start)]
    return verdicts[name]


@pytest.mark.parametrize(("tl_rps", "met"), [(86.0, True), (84.0, False)])
def test_openai_throughput_is_judged_against_the_ceiling_at_85_percent(
    tl_rps: float, met: bool
) -> None:
    verdicts = _verdicts(
        {"openai": {"threadline": _result(tl_rps, 100), "ceiling": _result(100, 90)}}
    )
    assert _find(verdicts, "openai: throughput at least 85%") is met


@pytest.mark.parametrize(("openai_cpu", "met"), [(6.0, True), (6.1, False)])
def test_openai_cpu_per_turn_is_judged_against_the_echo_scenarios(
    openai_cpu: float, met: bool
) -> None:
    verdicts = _verdicts(
        {
            "openai": {"threadline": _result(100, 100, cpu_ms=openai_cpu)},
            "main": {"threadline": _result(100, 100, cpu_ms=4.0)},
        }
    )
    assert _find(verdicts, "openai: server CPU per turn") is met


@pytest.mark.parametrize(("w2_rps", "met"), [(130.0, True), (129.0, False)])
def test_openai_two_workers_must_give_1_3x(w2_rps: float, met: bool) -> None:
    verdicts = _verdicts(
        {"openai": {"threadline": _result(100, 100), "threadline_w2": _result(w2_rps, 100)}}
    )
    assert _find(verdicts, "openai: --workers 2") is met


@pytest.mark.parametrize(("p99", "met"), [(49.0, True), (50.0, False)])
def test_first_delta_p99_is_judged_against_twice_the_first_token_delay(
    p99: float, met: bool
) -> None:
    stream = _result(100, 100, first_delta_p99_ms=p99, first_token_ms=25.0)
    verdicts = _verdicts({"stream": {"threadline": stream}})
    assert _find(verdicts, "stream: time to first delta") is met


@pytest.mark.parametrize(("mean_ms", "met"), [(119.0, True), (121.0, False)])
def test_long_history_must_stay_within_20_percent_of_fresh(mean_ms: float, met: bool) -> None:
    verdicts = _verdicts(
        {
            "long_history": {
                "threadline_fresh": _result(100, 100),
                "threadline_history_10000": _result(90, mean_ms),
            }
        }
    )
    assert _find(verdicts, "long_history:") is met


def test_a_provider_slower_than_its_delay_by_a_tenth_of_the_turn_bounds_the_run() -> None:
    def with_provider(service_mean_ms: float, cores: float) -> dict[str, Any]:
        provider = {
            "requests": 100,
            "service_mean_ms": service_mean_ms,
            "delay_ms": 50.0,
            "cores": cores,
        }
        return _result(100, 200, provider=provider)

    assert provider_bound(with_provider(60.0, 0.1)) is False
    assert provider_bound(with_provider(75.0, 0.1)) is True  # 25 ms extra > 20 ms
    assert provider_bound(with_provider(50.0, 0.8)) is True  # its one core nearly full
    assert provider_bound(_result(100, 200)) is None


def test_long_history_compares_tables_of_the_same_size(monkeypatch: pytest.MonkeyPatch) -> None:
    """The fresh run's database holds as many seeded messages as the other's, in sessions no
    lane writes to: only the lanes' own history differs between the two runs."""
    monkeypatch.syspath_prepend(str(Path(__file__).resolve().parents[2] / "scripts/benchmarks"))
    from agent_run_bench import variants

    scenario = Scenario("long_history", 1.0, 1, lane_sessions=True)
    (fresh_name, fresh), (seeded_name, seeded) = variants(scenario, "threadline", 10_000)
    assert (fresh_name, fresh.history, fresh.ballast) == ("threadline_fresh", 0, 10_000)
    assert (seeded_name, seeded.history, seeded.ballast) == ("threadline_history_10000", 10_000, 0)

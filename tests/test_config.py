"""Settings: built from the environment once, invalid values named in the error."""

from __future__ import annotations

import pytest

from threadline.config import load_settings
from threadline.coordination.local import concurrency_limit
from threadline.errors import ConfigError
from threadline.queue.limit import AdaptiveLimit


def test_defaults_are_the_embedded_setup(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in ("THREADLINE_DATABASE_URL", "THREADLINE_REDIS_URL", "THREADLINE_MODEL"):
        monkeypatch.delenv(name, raising=False)
    settings = load_settings()
    assert settings.backend == "sqlite"
    assert settings.redis_url is None
    assert settings.model == "threadline:echo"
    assert settings.history_limit == 20
    assert settings.queue_strategy == "merge"


@pytest.mark.parametrize(
    ("variable", "value"),
    [
        ("THREADLINE_POOL_MAX_SIZE", "zero"),
        ("THREADLINE_HISTORY_LIMIT", "-1"),
        ("THREADLINE_DATABASE_URL", "mysql://x"),
        ("THREADLINE_REDIS_URL", "http://x"),
        ("THREADLINE_QUEUE_STRATEGY", "shout"),
        ("THREADLINE_PORT", "70000"),
        ("THREADLINE_MAX_CONCURRENT_RUNS", "lots"),
        ("THREADLINE_MAX_CONCURRENT_RUNS", "0"),
        ("THREADLINE_ADAPTIVE_LAG_TARGET_MS", "0"),
    ],
)
def test_invalid_values_name_the_variable(
    monkeypatch: pytest.MonkeyPatch, variable: str, value: str
) -> None:
    monkeypatch.setenv(variable, value)
    with pytest.raises(ConfigError, match=variable):
        load_settings()


def test_pool_bounds_must_be_ordered(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("THREADLINE_POOL_MIN_SIZE", "10")
    monkeypatch.setenv("THREADLINE_POOL_MAX_SIZE", "5")
    with pytest.raises(ConfigError, match="POOL_MIN_SIZE"):
        load_settings()


def test_concurrent_runs_adapt_unless_pinned(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("THREADLINE_MAX_CONCURRENT_RUNS", raising=False)
    adaptive = load_settings(adaptive_runs_max=100)
    assert (adaptive.max_concurrent_runs, adaptive.adaptive_runs) == ("auto", True)
    assert adaptive.runs_ceiling == 100
    limit = concurrency_limit(adaptive)
    assert isinstance(limit, AdaptiveLimit)
    assert (limit.value, limit.minimum, limit.maximum) == (32, 4, 100)

    for spelling in ("AUTO", " auto ", ""):
        monkeypatch.setenv("THREADLINE_MAX_CONCURRENT_RUNS", spelling)
        assert load_settings().adaptive_runs

    monkeypatch.setenv("THREADLINE_MAX_CONCURRENT_RUNS", "32")  # as before: pins it
    pinned = load_settings()
    assert (pinned.max_concurrent_runs, pinned.adaptive_runs, pinned.runs_ceiling) == (
        32,
        False,
        32,
    )
    assert concurrency_limit(pinned) == 32


def test_adaptive_run_bounds_must_be_ordered(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("THREADLINE_ADAPTIVE_RUNS_MIN", "64")
    monkeypatch.setenv("THREADLINE_ADAPTIVE_RUNS_MAX", "16")
    with pytest.raises(ConfigError, match="ADAPTIVE_RUNS_MIN"):
        load_settings()


def test_no_api_key_means_loopback_only(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("THREADLINE_API_KEY", raising=False)
    with pytest.raises(ConfigError, match="THREADLINE_API_KEY"):
        load_settings(host="0.0.0.0").check_serving()
    load_settings(host="127.0.0.1").check_serving()
    load_settings(host="0.0.0.0", api_key="k").check_serving()


def test_several_workers_need_postgres_and_redis() -> None:
    with pytest.raises(ConfigError, match="WORKERS"):
        load_settings(workers=2).check_serving()
    with pytest.raises(ConfigError, match="WORKERS"):
        load_settings(workers=2, database_url="postgresql://h/db").check_serving()
    load_settings(
        workers=2, database_url="postgresql://h/db", redis_url="redis://h:6379/0"
    ).check_serving()


def test_redis_modes_refuse_what_cannot_work() -> None:
    with pytest.raises(ConfigError, match="database number"):
        load_settings(redis_mode="cluster", redis_url="redis://h1:6379/2")
    with pytest.raises(ConfigError, match="database number"):
        load_settings(redis_mode="cluster", redis_url="redis://h1:6379,h2:6379/1")
    with pytest.raises(ConfigError, match="REDIS_URL"):
        load_settings(redis_mode="cluster")
    with pytest.raises(ConfigError, match="REDIS_SENTINEL_SERVICE"):
        load_settings(redis_mode="sentinel", redis_sentinels="s1:26379")
    with pytest.raises(ConfigError, match="host:port"):
        load_settings(redis_mode="sentinel", redis_sentinels="s1", redis_sentinel_service="m")
    with pytest.raises(ConfigError, match="REDIS_MODE"):
        load_settings(redis_mode="replicated")
    cluster = load_settings(redis_mode="Cluster", redis_url="redis://h1:6379,h2:6379/0")
    assert cluster.redis_mode == "cluster"
    sentinel = load_settings(
        redis_mode="sentinel", redis_sentinels="s1:26379, s2:26379", redis_sentinel_service="m"
    )
    assert sentinel.redis_sentinels == ("s1:26379", "s2:26379")
    # Sentinel mode needs no REDIS_URL to coordinate through Redis.
    assert sentinel.uses_redis
    load_settings(
        workers=2,
        database_url="postgresql://h/db",
        redis_mode="sentinel",
        redis_sentinels="s1:26379",
        redis_sentinel_service="m",
    ).check_serving()

"""Settings, built once at start-up and passed down as a value.

Every field reads from a ``THREADLINE_``-prefixed environment variable. Nothing here is a
module-level instance: ``cli.py`` and ``create_app`` build one and hand it on, so tests can
build as many differently-configured apps as they like in one process.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Literal
from urllib.parse import parse_qs, urlsplit

from pydantic import (
    AliasChoices,
    Field,
    SecretStr,
    ValidationError,
    ValidationInfo,
    field_validator,
    model_validator,
)
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict

from threadline.errors import ConfigError
from threadline.queue.limit import DEFAULT_LAG_TARGET_MS

Strategy = Literal["merge", "enqueue", "reject"]
LogFormat = Literal["text", "json"]
LogLevel = Literal["DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL"]
ProviderHttp = Literal["httpx", "aiohttp"]
ProviderClients = Literal["shared", "per-model"]
JsonEncoder = Literal["orjson", "stdlib"]
RedisMode = Literal["standalone", "cluster", "sentinel"]

LOOPBACK_HOSTS = frozenset({"127.0.0.1", "localhost", "::1"})


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="THREADLINE_", frozen=True, extra="ignore")

    database_url: str = "sqlite:///./threadline.db"
    redis_url: str | None = None
    # How REDIS_URL is read (coordination/connection.py, docs/operations.md "Redis modes"):
    # one server; a Redis Cluster (REDIS_URL names one or more seed nodes, comma-separated);
    # or a master found through Sentinel (REDIS_SENTINELS, host:port list, and
    # REDIS_SENTINEL_SERVICE; REDIS_URL then only gives the db, user and password, if any).
    redis_mode: RedisMode = "standalone"
    redis_sentinels: Annotated[tuple[str, ...], NoDecode] = ()
    redis_sentinel_service: str | None = None
    api_key: SecretStr | None = None
    # Several keys, admin or bound to a user, with rate limits (threadline/keyfile.py); re-read
    # when it changes, checked at most every API_KEYS_RELOAD_S.
    api_keys_file: Path | None = None
    api_keys_reload_s: float = Field(default=5.0, ge=0)
    model: str = "threadline:echo"
    agents_module: str | None = None

    # "pgbouncer-transaction": a pooler in transaction mode (PgBouncer ``pool_mode =
    # transaction`` before 1.21, or without ``max_prepared_statements``) sits between us and
    # PostgreSQL, so a server connection is ours only for one transaction: no statement may be
    # cached on it (asyncpg's named prepared statements), and no session state may outlive a
    # transaction (the migration lock). docs/operations.md says when to put one there.
    database_pooler: Literal["none", "pgbouncer-transaction"] = "none"
    pool_min_size: int = Field(default=2, ge=0)
    pool_max_size: int = Field(default=20, ge=1)
    history_limit: int = Field(default=20, ge=0)
    max_message_chars: int = Field(default=32_000, ge=1)
    max_body_bytes: int = Field(default=1_048_576, ge=1024)
    model_timeout_s: float = Field(default=120.0, gt=0)
    # Runs (model calls) in flight per process; the others wait in FIFO order, costing nothing.
    # "auto": a limit that adapts (queue/limit.py) between ADAPTIVE_RUNS_MIN and _MAX, starting
    # at 32, shrinking when the event loop lags more than ADAPTIVE_LAG_TARGET_MS or run latency
    # climbs above its baseline, growing back while both are healthy (fast while every slot is
    # taken and the loop idles: runs waiting on a slow model cost it little). An integer pins
    # it (size it as target turns/s x model latency: one worker saturates its core at ~150-250
    # turns/s).
    max_concurrent_runs: int | Literal["auto"] = Field(default="auto")
    adaptive_runs_min: int = Field(default=4, ge=1)
    adaptive_runs_max: int = Field(default=256, ge=1)
    # An average over 8 heartbeats, well below the 20 ms worst lag we aim for: a saturated
    # loop's lag comes in spikes, so an average of 10 ms let in runs until the spikes reached
    # 20-25 ms and tail latency rose by a third; at 3 ms the limit holds where the loop serves
    # best (docs/performance.md, "The lag target" under "Reference cycles and retained
    # event logs"). Runs waiting on a slow model leave most heartbeats under a quarter of
    # it, so the limit still grows for them (queue/limit.py).
    adaptive_lag_target_ms: float = Field(default=DEFAULT_LAG_TARGET_MS, gt=0)
    # Requests per process that may take their first step (middlewares, routing, validation,
    # up to their first wait: api/intake.py) in one pass of the event loop; the rest wait in
    # arrival order. Bounds how much of a burst the loop takes on in one go; 0 turns it off. A
    # waiting request holds no slot: this limits neither requests in flight nor an outage's 503s.
    intake_concurrency: int = Field(default=32, ge=0)
    echo_delay_ms: int = Field(default=0, ge=0)
    # Model providers' HTTP transport (agents/clients.py): one shared client per endpoint, its
    # pool sized to the most runs in flight (``runs_ceiling``). aiohttp (the OpenAI SDK's
    # DefaultAioHttpClient; OpenAI and Anthropic) cost less client CPU per call than httpx:
    # 3 % (agent graph) to 14 % (direct request) one at a time, 12 % to 25 % at 32 in flight
    # (one process, loaded machine: ratios only). Google and Groq stay on httpx.
    provider_http: ProviderHttp = "aiohttp"
    # "per-model": the clients pydantic-ai and the SDKs build for themselves, one per model with
    # their default pools (PROVIDER_HTTP then does not apply); for A/B measurements.
    provider_clients: ProviderClients = "shared"
    # A run starts with one direct model request instead of pydantic-ai's agent graph
    # (runner.py) when its agent's tools are plain functions and its history is text turns
    # only: a complete text reply ends the run there, at about half the CPU per turn
    # (docs/performance.md, "Direct model requests, on by default"). Any other reply (a tool
    # call, no text) hands the turn to the graph, which carries on from it; any other history
    # (tool traffic, retries) takes the graph from the start. The same requests, history,
    # usage, deltas, errors and retries either way (tests/agents/test_direct.py); traces
    # differ (no ``invoke_agent`` span; a handed-over reply has two spans). false: the graph.
    direct_model_requests: bool = True
    # The encoder of the OpenAI-compatible API's JSON bodies (api/jsonbody.py).
    json_encoder: JsonEncoder = "orjson"
    # Seconds between keep-alive comments on an idle SSE stream (proxies close idle ones).
    stream_heartbeat_s: float = Field(default=15.0, gt=0)

    queue_strategy: Strategy = "merge"
    merge_window_ms: int = Field(default=0, ge=0)
    merge_max_wait_ms: int = Field(default=10_000, ge=0)
    session_queue_max: int = Field(default=100, ge=1)
    shutdown_grace_s: float = Field(default=10.0, ge=0)

    # Redis coordination (multi-process); see docs/operations.md for why these defaults.
    # A dead owner's sessions are taken over within LEASE_TTL_MS plus one watchdog interval
    # (TTL/4): 7.5 s with 6 s, inside the 10 s we promise; renewal runs every TTL/3 (2 s), so
    # only a loop stalled for 4 s loses its leases.
    lease_ttl_ms: int = Field(default=6_000, ge=500)
    redis_timeout_s: float = Field(default=2.0, gt=0)
    redis_max_connections: int = Field(default=64, ge=2)

    # Webhooks (README, "Background runs and webhooks"). Deliveries are signed with the
    # secret; a request's webhook_url must name one of the allowed hosts ("host" or
    # "host:port"), so a client cannot point the server at internal addresses.
    webhook_secret: SecretStr | None = None
    webhook_allowed_hosts: Annotated[tuple[str, ...], NoDecode] = ()
    webhook_timeout_s: float = Field(default=10.0, gt=0)
    # Retries back off exponentially (with jitter) from INITIAL to MAX seconds between
    # attempts, and stop MAX_AGE after the delivery was written (or last re-sent).
    webhook_retry_initial_s: float = Field(default=1.0, gt=0)
    webhook_retry_max_s: float = Field(default=300.0, gt=0)
    webhook_max_age_s: float = Field(default=86_400.0, gt=0)
    # How often each process looks for due deliveries written elsewhere (its own are sent at
    # once), and how many it sends at a time.
    webhook_poll_interval_s: float = Field(default=0.5, gt=0)
    webhook_concurrency: int = Field(default=8, ge=1)

    # Tracing (threadline/tracing.py): on with OTEL=1 or when the standard
    # OTEL_EXPORTER_OTLP_ENDPOINT is set (unprefixed: the exporter reads it too). Prompts,
    # replies and tool arguments go into spans only with OTEL_INCLUDE_CONTENT.
    otel: bool = False
    otel_exporter_otlp_endpoint: str | None = Field(
        default=None, validation_alias=AliasChoices("OTEL_EXPORTER_OTLP_ENDPOINT")
    )
    otel_include_content: bool = False

    host: str = "127.0.0.1"
    port: int = Field(default=8000, ge=0, le=65535)
    workers: int = Field(default=1, ge=1)
    debug_metrics: bool = True
    # Log lines for people (text) or for a collector (json: one object per line); see
    # docs/operations.md, "Logs".
    log_format: LogFormat = "text"
    log_level: LogLevel = "INFO"
    # Freeze the start-up heap and collect the young generation less often (see app.py).
    gc_tuning: bool = True

    @field_validator("database_url")
    @classmethod
    def _known_database(cls, value: str) -> str:
        if not value.startswith(("sqlite://", "postgresql://", "postgres://")):
            raise ValueError(f"expected sqlite:// or postgresql:// URL, got {value!r}")
        return value

    @field_validator("redis_url")
    @classmethod
    def _known_redis(cls, value: str | None) -> str | None:
        if value is not None and not value.startswith(("redis://", "rediss://", "unix://")):
            raise ValueError(f"expected redis:// URL, got {value!r}")
        return value or None

    @field_validator("max_concurrent_runs", mode="before")
    @classmethod
    def _auto_or_count(cls, value: object) -> object:
        if isinstance(value, str):
            value = value.strip().lower() or "auto"  # set but empty: the default
            if value != "auto":
                try:
                    value = int(value)
                except ValueError:
                    raise ValueError(f"expected 'auto' or an integer, got {value!r}") from None
        if isinstance(value, int) and not isinstance(value, bool) and value < 1:
            raise ValueError(f"must be at least 1, got {value!r}")
        return value

    @field_validator("redis_sentinels", mode="before")
    @classmethod
    def _sentinel_list(cls, value: object) -> object:
        if isinstance(value, str):
            value = value.split(",")
        if isinstance(value, list | tuple):
            found = tuple(str(h).strip() for h in value if str(h).strip())
            for address in found:
                host, _, port = address.rpartition(":")
                if not host or not port.isdigit():
                    raise ValueError(f"expected host:port, got {address!r}")
            return found
        return value

    @field_validator("redis_mode", "log_format", "log_level", mode="before")
    @classmethod
    def _any_case(cls, value: object, info: ValidationInfo) -> object:
        if not isinstance(value, str):
            return value
        return value.upper() if info.field_name == "log_level" else value.lower()

    @field_validator("api_key", mode="before")
    @classmethod
    def _blank_key_is_no_key(cls, value: object) -> object:
        # An exported-but-empty variable must not count as a key: it would authenticate
        # nobody while lifting the loopback-only restriction.
        return None if value in ("", None) else value

    @field_validator("api_keys_file", mode="before")
    @classmethod
    def _blank_file_is_no_file(cls, value: object) -> object:
        return None if value in ("", None) else value

    @field_validator("webhook_secret", mode="before")
    @classmethod
    def _blank_secret_is_no_secret(cls, value: object) -> object:
        return None if value in ("", None) else value

    @field_validator("webhook_allowed_hosts", mode="before")
    @classmethod
    def _host_list(cls, value: object) -> object:
        if isinstance(value, str):
            value = value.split(",")
        if isinstance(value, list | tuple):
            return tuple(str(h).strip().lower() for h in value if str(h).strip())
        return value

    @model_validator(mode="after")
    def _consistent(self) -> Settings:
        if self.pool_min_size > self.pool_max_size:
            raise ValueError("POOL_MIN_SIZE must not exceed POOL_MAX_SIZE")
        if self.adaptive_runs_min > self.adaptive_runs_max:
            raise ValueError("ADAPTIVE_RUNS_MIN must not exceed ADAPTIVE_RUNS_MAX")
        if self.redis_mode == "cluster":
            if self.redis_url is None:
                raise ValueError("REDIS_MODE=cluster needs REDIS_URL (one or more seed nodes)")
            if any(_db_of(url) != 0 for url in self.redis_url.split(",")):
                # A cluster has database 0 only; anything else would be silently ignored.
                raise ValueError("REDIS_MODE=cluster takes no database number in REDIS_URL")
        if self.redis_mode == "sentinel" and not (
            self.redis_sentinels and self.redis_sentinel_service
        ):
            raise ValueError("REDIS_MODE=sentinel needs REDIS_SENTINELS and REDIS_SENTINEL_SERVICE")
        return self

    @property
    def uses_redis(self) -> bool:
        """Whether processes coordinate through Redis (else in process, one process)."""
        return self.redis_url is not None or self.redis_mode == "sentinel"

    @property
    def adaptive_runs(self) -> bool:
        """Whether the concurrency limit adapts (MAX_CONCURRENT_RUNS=auto)."""
        return self.max_concurrent_runs == "auto"

    @property
    def runs_ceiling(self) -> int:
        """The most runs one process may ever have in flight (to size pools by)."""
        if self.max_concurrent_runs == "auto":
            return self.adaptive_runs_max
        return self.max_concurrent_runs

    @property
    def tracing(self) -> bool:
        return self.otel or bool(self.otel_exporter_otlp_endpoint)

    @property
    def keyed(self) -> bool:
        """Whether requests authenticate (a key, or a key file); else loopback only."""
        return self.api_key is not None or self.api_keys_file is not None

    @property
    def backend(self) -> Literal["sqlite", "postgres"]:
        return "sqlite" if self.database_url.startswith("sqlite://") else "postgres"

    def check_serving(self) -> None:
        """Refuse configurations that are unsafe or cannot work once several processes serve."""
        if not self.keyed and self.host not in LOOPBACK_HOSTS:
            raise ConfigError(
                f"THREADLINE_HOST={self.host!r} is not loopback and neither THREADLINE_API_KEY "
                "nor THREADLINE_API_KEYS_FILE is set: set an API key before exposing the server"
            )
        if self.workers > 1 and (self.backend != "postgres" or not self.uses_redis):
            raise ConfigError(
                "THREADLINE_WORKERS > 1 needs a postgresql:// THREADLINE_DATABASE_URL and "
                "THREADLINE_REDIS_URL: SQLite and in-process coordination serve one process"
            )


def _db_of(url: str) -> int:
    """The database number a Redis URL names (path ``/N`` or ``?db=N``), 0 if none."""
    parsed = urlsplit(url.strip() if "://" in url else f"redis://{url.strip()}")
    db = parse_qs(parsed.query).get("db", [parsed.path.strip("/") or "0"])[0]
    return int(db) if db.isdigit() else -1


def load_settings(**overrides: object) -> Settings:
    """Build settings from the environment, turning validation errors into one clear message."""
    try:
        return Settings(**overrides)  # type: ignore[arg-type]
    except ValidationError as exc:
        problems = []
        for err in exc.errors():
            name = "THREADLINE_" + "_".join(str(p) for p in err["loc"]).upper()
            problems.append(f"{name}: {err['msg']}")
        raise ConfigError("invalid configuration: " + "; ".join(problems)) from None

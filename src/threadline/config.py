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

Strategy = Literal["merge", "enqueue", "reject"]
LogFormat = Literal["text", "json"]
LogLevel = Literal["DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL"]
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

    pool_min_size: int = Field(default=2, ge=0)
    pool_max_size: int = Field(default=20, ge=1)
    history_limit: int = Field(default=20, ge=0)
    max_message_chars: int = Field(default=32_000, ge=1)
    max_body_bytes: int = Field(default=1_048_576, ge=1024)
    model_timeout_s: float = Field(default=120.0, gt=0)
    # Model calls in flight per process. One worker saturates its core at ~150-250 turns/s, so
    # 32 runs of a 50 ms model keep it busy; more only crowd the event loop (the others wait
    # in FIFO order, costing nothing). Size it as target turns/s x model latency.
    max_concurrent_runs: int = Field(default=32, ge=1)
    echo_delay_ms: int = Field(default=0, ge=0)
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

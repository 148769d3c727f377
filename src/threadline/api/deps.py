"""Dependencies: how routes reach the resources the lifespan owns."""

from __future__ import annotations

import hmac
from dataclasses import dataclass
from typing import Annotated

from fastapi import Depends, Request
from fastapi.security import APIKeyHeader, HTTPAuthorizationCredentials, HTTPBearer

from threadline.agents import AgentRegistry
from threadline.api.errors import Unauthorized
from threadline.config import Settings
from threadline.coordination import Coordinator
from threadline.delivery.sender import Deliverer
from threadline.metrics import Sampler
from threadline.monitor import LoopLagMonitor
from threadline.store import Store


@dataclass(frozen=True, slots=True)
class Services:
    settings: Settings
    store: Store
    registry: AgentRegistry
    coordinator: Coordinator
    monitor: LoopLagMonitor
    # Sets this process's state gauges of /metrics (queue depth, leases, pool).
    sampler: Sampler
    # The webhook outbox sender; None when no webhook secret is set.
    deliverer: Deliverer | None = None


# Both dependencies are ``async def`` although they do no I/O: FastAPI runs a plain ``def``
# dependency in its thread pool, two thread hops per request that cost about 1 ms of CPU
# (docs/performance.md).
async def get_services(request: Request) -> Services:
    services: Services = request.app.state.services
    return services


ServicesDep = Annotated[Services, Depends(get_services)]

_api_key_header = APIKeyHeader(name="X-API-Key", auto_error=False)


_bearer = HTTPBearer(auto_error=False)


def _check_key(services: Services, key: str | None, what: str) -> None:
    expected = services.settings.api_key
    if expected is None:
        return
    # Constant-time comparison: the key must not leak through response timing.
    if key is None or not hmac.compare_digest(key.encode(), expected.get_secret_value().encode()):
        raise Unauthorized(f"missing or invalid {what}")


async def require_api_key(
    services: ServicesDep, key: Annotated[str | None, Depends(_api_key_header)]
) -> None:
    _check_key(services, key, "X-API-Key header")


async def require_openai_key(
    services: ServicesDep,
    key: Annotated[str | None, Depends(_api_key_header)],
    bearer: Annotated[HTTPAuthorizationCredentials | None, Depends(_bearer)],
) -> None:
    """The API key as OpenAI's clients send it (``Authorization: Bearer``), or X-API-Key."""
    _check_key(services, key or (bearer.credentials if bearer else None), "API key")

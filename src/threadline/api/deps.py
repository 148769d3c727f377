"""Dependencies: how routes reach the resources the lifespan owns."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Annotated

from fastapi import Depends, Request
from fastapi.security import APIKeyHeader, HTTPAuthorizationCredentials, HTTPBearer

from threadline.agents import AgentRegistry
from threadline.api.access import LOCAL, Caller
from threadline.api.errors import Unauthorized
from threadline.api.gate import Gate
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
    # Keys and rate limits; None on a server without keys (loopback only).
    gate: Gate | None = None


# Both dependencies are ``async def`` although they do no I/O: FastAPI runs a plain ``def``
# dependency in its thread pool, two thread hops per request that cost about 1 ms of CPU
# (docs/performance.md).
async def get_services(request: Request) -> Services:
    services: Services = request.app.state.services
    return services


ServicesDep = Annotated[Services, Depends(get_services)]


async def get_caller(request: Request, services: ServicesDep) -> Caller:
    """Who calls: the key ``KeyRequired`` checked (``api/access.py``), or, on a server without
    keys, the loopback client ``LoopbackOnly`` let in (an admin)."""
    caller: Caller | None = request.scope.get("state", {}).get("caller")
    if caller is not None:
        return caller
    if services.settings.keyed:
        # A keyed route the middleware left open would be a bug: refuse rather than trust.
        raise Unauthorized("missing or invalid API key")
    return LOCAL


CallerDep = Annotated[Caller, Depends(get_caller)]

# These two only declare, in the OpenAPI document, how a key is sent; the middleware checks it.
_api_key_header = APIKeyHeader(name="X-API-Key", auto_error=False)
_bearer = HTTPBearer(auto_error=False)


async def require_api_key(
    caller: CallerDep, _key: Annotated[str | None, Depends(_api_key_header)]
) -> Caller:
    return caller


async def require_openai_key(
    caller: CallerDep,
    _key: Annotated[str | None, Depends(_api_key_header)],
    _token: Annotated[HTTPAuthorizationCredentials | None, Depends(_bearer)],
) -> Caller:
    """The API key as OpenAI's clients send it (``Authorization: Bearer``), or X-API-Key."""
    return caller


async def require_admin(caller: Annotated[Caller, Depends(require_api_key)]) -> None:
    caller.require_admin()

"""In-process coordination: one ``TurnQueue`` serves every session of this process."""

from __future__ import annotations

import uuid
from typing import Any
from uuid import UUID

from threadline.agents import AgentRegistry
from threadline.config import Settings
from threadline.queue.coordinator import TurnRequest
from threadline.queue.core import Accepted, Answer, TurnQueue
from threadline.runner import RunOptions, TurnRunner
from threadline.store import NewMessage, RunStart, Store


class LocalCoordinator:
    def __init__(self, store: Store, registry: AgentRegistry, settings: Settings) -> None:
        self._store = store
        self._registry = registry
        self.queue = TurnQueue(
            TurnRunner(store, registry, model_timeout_s=settings.model_timeout_s),
            max_concurrent=settings.max_concurrent_runs,
            merge_window=settings.merge_window_ms / 1000,
            merge_max_wait=settings.merge_max_wait_ms / 1000,
            session_queue_max=settings.session_queue_max,
        )

    async def submit(self, request: TurnRequest) -> Answer:
        loaded = await self._registry.get(request.agent)
        options = RunOptions(request.agent, request.user_id, request.history_limit, request.context)

        async def accept(run_id: UUID | None) -> Accepted:
            message = NewMessage(
                id=uuid.uuid4(),
                role="user",
                content=request.content,
                channel_payload=request.channel_payload,
            )
            start = None
            if run_id is not None:
                start = RunStart(run_id, request.agent, loaded.model_name, request.history_limit)
            stored, turn = await self._store.add_user_message(
                request.session_id, message, start=start
            )
            return Accepted(stored.id, stored.seq, turn)

        return await self.queue.submit(request.session_id, request.strategy, accept, options)

    async def ping(self) -> None:
        """Nothing outside this process to check."""

    def metrics(self) -> dict[str, Any]:
        return {
            "sessions_in_memory": self.queue.session_count,
            "runs_in_flight": self.queue.running,
        }

    async def aclose(self, grace: float = 0.0) -> None:
        await self.queue.aclose(grace)

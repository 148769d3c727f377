"""A client's cancel of a run in flight, shared by ``POST /api/v1/runs/{id}/cancel`` and
``POST /v1/responses/{id}/cancel``.

The run's owner (this process or another) stops it; its messages are answered by the cancel
(``run_cancelled``), and messages that arrived after it go to the next run. The caller waits
for the run to end, up to ``CANCEL_WAIT_S``, so that its answer can say how it ended.
"""

from __future__ import annotations

import asyncio
import contextlib
from uuid import UUID

from threadline.api.deps import Services
from threadline.api.streams import RECHECK_S
from threadline.errors import RunNotActive, RunNotFound
from threadline.store import FINISHED, Run, Store

# A cancel waits this long for the run to end before it answers with the run as it is.
CANCEL_WAIT_S = 10.0


async def cancel_and_wait(services: Services, run: Run) -> Run:
    """Cancel ``run`` and return it once it has ended (or as it is after ``CANCEL_WAIT_S``).

    Raises ``RunNotActive`` when it has ended already, or is committing its reply and can no
    longer be stopped.
    """
    if run.status in FINISHED:
        raise RunNotActive(f"run {str(run.id)!r} has ended: {run.status}")
    coordinator = services.coordinator
    async with coordinator.events.watch(run.session_id) as watch:
        if not await coordinator.cancel(run.session_id, run.id):
            now = await services.store.get_run(run.id)
            if now is None or now.status in FINISHED:
                return now or run
            # Owned here, open in the store, but not cancellable: it is committing, or not
            # started yet. Either way it ends without us.
            raise RunNotActive(f"run {str(run.id)!r} is finishing and can no longer be cancelled")
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(CANCEL_WAIT_S):
                while True:
                    event = await watch.next(within=RECHECK_S)
                    if event is not None and event.run_id == run.id and event.terminal:
                        break
                    if event is None and await _ended(services.store, run.id):
                        break
    now = await services.store.get_run(run.id)
    if now is None:
        raise RunNotFound(f"run {str(run.id)!r} was deleted with its session")
    return now


async def _ended(store: Store, run_id: UUID) -> bool:
    now = await store.get_run(run_id)
    return now is None or now.status in FINISHED

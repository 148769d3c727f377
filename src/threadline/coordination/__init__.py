"""Coordination: how a message reaches the queue that answers it, and the answer its caller.

``LocalCoordinator`` serves every session in this process; ``RedisCoordinator`` shares sessions
between processes and hosts through Redis leases (``leases``) and delivers answers across them
(``mailbox``). Both sit above the runner: imports point from here down, never back.
"""

from threadline.coordination.base import Coordinator, OnStored, TurnRequest

__all__ = ["Coordinator", "OnStored", "TurnRequest"]

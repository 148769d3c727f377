"""An agents module whose setup fails, for ``threadline serve`` start-up tests."""

from __future__ import annotations

from threadline.agents import AgentSpec


async def _load_index() -> None:
    raise RuntimeError("index file missing")


AGENTS = [AgentSpec(name="indexed", model="threadline:echo", setup=_load_index)]

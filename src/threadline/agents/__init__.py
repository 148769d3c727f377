"""Agent definitions: immutable specs, the registry that builds them once, the echo model."""

from threadline.agents.registry import AgentRegistry, LoadedAgent
from threadline.agents.spec import AgentSpec, RunDeps

__all__ = ["AgentRegistry", "AgentSpec", "LoadedAgent", "RunDeps"]

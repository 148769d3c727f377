"""Agents the benchmarks load with ``THREADLINE_AGENTS_MODULE=bench_agents`` (ab_compare.py puts
this folder on every variant's ``PYTHONPATH``).

``chat``: the ``assistant`` agent without its tools, on the server's ``THREADLINE_MODEL``: a
plain chat agent, the kind ``THREADLINE_DIRECT_MODEL_REQUESTS`` answers without the agent
graph.
"""

from __future__ import annotations

from threadline.agents import AgentSpec
from threadline.agents.builtin import ASSISTANT

AGENTS = [AgentSpec(name="chat", instructions=ASSISTANT.instructions)]

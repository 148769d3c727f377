"""CPU per pydantic-ai agent run with and without the SDKs' request transform, in one process.

    python scripts/benchmarks/sdk_transform.py [--runs 600] [--reps 4]

For OpenAI and Groq, one agent (instructions and a tool, as the ``assistant``) on the SDK's
own client and one on threadline's ``PlainBodyOpenAI`` / ``PlainBodyGroq``
(``agents/completions.py``), both against the tests' fake OpenAI-compatible server running in
the same process (its CPU is in both figures alike). Batches of runs alternate between the
two, in both orders; it prints the process CPU per run of each batch and the medians. A
quick check of one lever, not the benchmark: no threadline server, no database.
"""

from __future__ import annotations

import argparse
import asyncio
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from groq import AsyncGroq
from openai import AsyncOpenAI
from pydantic_ai import Agent
from pydantic_ai.models.groq import GroqModel
from pydantic_ai.models.openai import OpenAIChatModel
from pydantic_ai.providers.groq import GroqProvider
from pydantic_ai.providers.openai import OpenAIProvider

from tests.fake_openai import running_fake_openai
from threadline.agents.completions import PlainBodyGroq, PlainBodyOpenAI


def lookup(key: str) -> str:
    """Look a key up."""
    return key


def agents(port: int) -> dict[str, Agent[None, str]]:
    def agent(model: Any) -> Agent[None, str]:
        return Agent(model, instructions="Be brief.", tools=[lookup])

    openai_url, groq_url = f"http://127.0.0.1:{port}/v1", f"http://127.0.0.1:{port}"
    return {
        "openai, SDK client": agent(
            OpenAIChatModel(
                "m",
                provider=OpenAIProvider(
                    openai_client=AsyncOpenAI(base_url=openai_url, api_key="k")
                ),
            )
        ),
        "openai, PlainBodyOpenAI": agent(
            OpenAIChatModel(
                "m",
                provider=OpenAIProvider(
                    openai_client=PlainBodyOpenAI(base_url=openai_url, api_key="k")
                ),
            )
        ),
        "groq, SDK client": agent(
            GroqModel(
                "m", provider=GroqProvider(groq_client=AsyncGroq(base_url=groq_url, api_key="k"))
            )
        ),
        "groq, PlainBodyGroq": agent(
            GroqModel(
                "m",
                provider=GroqProvider(groq_client=PlainBodyGroq(base_url=groq_url, api_key="k")),
            )
        ),
    }


async def main(runs: int, reps: int) -> None:
    async with running_fake_openai() as fake:
        built = agents(fake.port)
        for agent in built.values():
            for _ in range(50):
                await agent.run("warm up")
        results: dict[str, list[float]] = {name: [] for name in built}
        for rep in range(reps):
            order = list(built.items()) if rep % 2 == 0 else list(built.items())[::-1]
            for name, agent in order:
                fake.requests.clear()
                start = time.process_time()
                for i in range(runs):
                    await agent.run(f"hello {i}")
                results[name].append((time.process_time() - start) / runs * 1000)
    for name, figures in results.items():
        median = sorted(figures)[len(figures) // 2]
        print(f"{name:26} {' '.join(f'{f:.3f}' for f in figures)} ms/run; median {median:.3f}")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=600)
    parser.add_argument("--reps", type=int, default=4)
    args = parser.parse_args()
    asyncio.run(main(args.runs, args.reps))

"""A short chaos run (~2 min): every fault phase once, then zero violations of any invariant.

Three real ``threadline serve`` processes on a private PostgreSQL cluster and Redis; one
process killed with SIGKILL, Redis down for 15 s, PostgreSQL crashed and restarted, one
process cut off from Redis and another from both by frozen proxies. ``scripts/chaos.py``
runs the long version.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest

from tests.chaos.faults import PHASES, FaultConfig
from tests.chaos.load import LoadConfig
from tests.chaos.services import ServiceMissing, postgres_bindir, redis_binary
from tests.chaos.soak import ChaosConfig, run_chaos
from tests.conftest import REQUIRE_SERVICES

pytestmark = [pytest.mark.chaos, pytest.mark.allow_blocking]

SHORT = ChaosConfig(
    duration_s=0,  # every phase once
    sessions=120,
    seed=8,
    phases=PHASES,
    load=LoadConfig(workers=12),
    faults=FaultConfig(kill_after_s=(10.0, 12.0), postgres_down_s=5.0, partition_s=6.0),
)


@pytest.fixture
def rundir(tmp_path: Path) -> Path:
    """Where the server logs, history.jsonl and summary.json go.

    pytest keeps only its last few temporary directories (shared with other sessions), so
    THREADLINE_CHAOS_LOGS can name one that stays.
    """
    kept = os.environ.get("THREADLINE_CHAOS_LOGS")
    if not kept:
        return tmp_path
    Path(kept).mkdir(parents=True, exist_ok=True)
    return Path(kept)


@pytest.fixture
def binaries() -> None:
    try:
        postgres_bindir()
        redis_binary()
    except ServiceMissing as exc:
        if REQUIRE_SERVICES:
            pytest.fail(str(exc))
        pytest.skip(str(exc))
    if shutil.which("runuser") is None:
        pytest.skip("runuser is missing: the private PostgreSQL cluster cannot be created")


@pytest.mark.timeout(300)
async def test_a_short_chaos_run_keeps_every_invariant(binaries: None, rundir: Path) -> None:
    result = await run_chaos(SHORT, rundir)

    summary = json.dumps(result.summary(), indent=1, default=str)
    faults = result.figures["faults"]
    assert faults == {"kill": 1, "redis": 1, "postgres": 1, "partition": 2}, summary
    assert result.figures["answered_2xx"] > 200, summary
    assert result.figures["sessions_used"] >= SHORT.sessions, summary
    assert result.report.ok, summary

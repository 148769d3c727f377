"""Dockerfile and compose.yaml hold what deployments rely on, checked without a container engine
(test_image.py builds and runs the image where one can run)."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import yaml

ROOT = Path(__file__).resolve().parents[2]


def dockerfile_stages() -> list[list[str]]:
    """The Dockerfile's instructions (continuations joined), one list per stage."""
    text = re.sub(r"\\\n", " ", (ROOT / "Dockerfile").read_text())
    stages: list[list[str]] = []
    for line in text.splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        if line.upper().startswith("FROM "):
            stages.append([])
        if stages:
            stages[-1].append(line)
    return stages


def test_dockerfile_builds_from_the_lock_in_one_stage_and_runs_in_another() -> None:
    build, runtime = dockerfile_stages()
    runs = [line for line in build if line.startswith("RUN ")]
    assert any(line.startswith("COPY ") and "uv.lock" in line for line in build)
    # Every sync refuses a lock that pyproject.toml has moved away from.
    syncs = [sync for run in runs for sync in re.findall(r"uv sync[^&;]*", run)]
    assert len(syncs) == 2, syncs
    assert all("--locked" in sync and "--no-editable" in sync for sync in syncs), syncs
    assert not any("--extra" in sync or "--all-extras" in sync for sync in syncs), syncs
    # The runtime stage gets the venv only: no uv, no source tree, no compiler.
    copies = [line for line in runtime if line.startswith("COPY ")]
    assert copies == ["COPY --from=build /app/.venv /app/.venv"]


def test_dockerfile_serves_on_all_interfaces_as_a_non_root_user() -> None:
    runtime = dockerfile_stages()[-1]
    users = [line.split()[1] for line in runtime if line.startswith("USER ")]
    assert users, "the runtime stage sets no USER"
    uid = users[-1].split(":")[0]
    # Numeric, so Kubernetes' runAsNonRoot can check it without reading /etc/passwd.
    assert uid.isdigit(), users
    assert int(uid) != 0, users
    env = " ".join(line for line in runtime if line.startswith("ENV "))
    assert "THREADLINE_HOST=0.0.0.0" in env
    # No API key baked in: serve refuses 0.0.0.0 until the deployment sets one.
    assert "THREADLINE_API_KEY" not in env
    assert 'ENTRYPOINT ["threadline"]' in runtime
    assert 'CMD ["serve"]' in runtime
    assert any(line.startswith("HEALTHCHECK ") and "/health" in line for line in runtime)


def compose() -> dict[str, Any]:
    loaded: dict[str, Any] = yaml.safe_load((ROOT / "compose.yaml").read_text())
    return loaded


def test_compose_runs_two_workers_on_postgres_and_redis_with_a_required_key() -> None:
    services = compose()["services"]
    assert set(services) == {"threadline", "postgres", "redis"}
    threadline = services["threadline"]
    env = threadline["environment"]
    assert env["THREADLINE_WORKERS"] == "2"
    assert env["THREADLINE_DATABASE_URL"].startswith("postgresql://")
    assert env["THREADLINE_DATABASE_URL"].split("@")[1] == "postgres:5432/threadline"
    assert env["THREADLINE_REDIS_URL"] == "redis://redis:6379/0"
    # `${VAR:?message}`: compose stops with the message when the key is unset.
    assert env["THREADLINE_API_KEY"].startswith("${THREADLINE_API_KEY:?")
    assert threadline["depends_on"] == {
        "postgres": {"condition": "service_healthy"},
        "redis": {"condition": "service_healthy"},
    }


def test_compose_services_have_health_checks_and_volumes() -> None:
    config = compose()
    for name, service in config["services"].items():
        assert service["healthcheck"]["test"][0] == "CMD", name
    assert "pg_isready" in config["services"]["postgres"]["healthcheck"]["test"]
    assert "ping" in config["services"]["redis"]["healthcheck"]["test"]
    volumes = {
        name: [volume.split(":")[1] for volume in service.get("volumes", [])]
        for name, service in config["services"].items()
    }
    assert volumes["postgres"] == ["/var/lib/postgresql/data"]
    assert volumes["redis"] == ["/data"]
    assert set(config["volumes"]) == {"postgres-data", "redis-data"}

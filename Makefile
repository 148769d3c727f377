# Two commands matter for a new user: `make run` and `make test`. Both create .venv if missing,
# from uv.lock: `run` installs the runtime only, `test` adds the test tools, `bench` the load
# benchmark's. `--locked` refuses a uv.lock that pyproject.toml has moved away from (run
# `uv lock`); `--inexact` keeps what another target installed, so `make run` after `make test`
# does not uninstall the test tools. `test` also writes every dependency's .pyc at install
# (`--compile-bytecode`, which pip does and uv does not): where PYTHONDONTWRITEBYTECODE is set,
# as in many CI images and on this project's machines, each of the hundreds of servers the
# tests start would otherwise compile them all again, ~5 s of CPU each on a slow VM (later
# syncs check them in under a second). `run` leaves that to Python, which caches what it
# imports unless told not to: compiling all ~11,000 files took 18 s on that VM, as long as
# the rest of a cold start.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin

# uv from PATH, else one bootstrapped through pip into .uv-bootstrap (needs only python3 -m venv).
UV_BOOTSTRAP := .uv-bootstrap
UV ?= $(shell command -v uv 2>/dev/null)
ifeq ($(UV),)
UV := $(UV_BOOTSTRAP)/bin/uv
UV_DEP := $(UV)
endif
SYNC = $(UV) sync --locked --inexact --python $(PYTHON)

.PHONY: install run test lint format bench chaos clean

$(UV_BOOTSTRAP)/bin/uv:
	$(PYTHON) -m venv $(UV_BOOTSTRAP)
	$(UV_BOOTSTRAP)/bin/python -m pip install --quiet 'uv>=0.9,<1'

# Everything a contributor uses: test, lint and bench tools.
install: | $(UV_DEP)
	$(SYNC) --extra dev

run: | $(UV_DEP)
	$(SYNC)
	$(BIN)/threadline serve

test: | $(UV_DEP)
	$(SYNC) --extra test --compile-bytecode
	$(BIN)/python -m pytest $(PYTEST_ARGS)

lint: | $(UV_DEP)
	$(SYNC) --extra lint
	$(BIN)/ruff check src tests scripts
	$(BIN)/ruff format --check src tests scripts
	$(BIN)/mypy

format: | $(UV_DEP)
	$(SYNC) --extra lint
	$(BIN)/ruff format src tests scripts
	$(BIN)/ruff check --fix src tests scripts

# Measures HEAD (or BENCH_ARGS="--commit REV") from a git worktree of its own, installed there
# from uv.lock; this venv only runs the orchestrator (scripts/benchmarks/README.md).
bench: | $(UV_DEP)
	$(SYNC) --extra bench
	$(BIN)/python scripts/benchmarks/agent_run_bench.py $(BENCH_ARGS)

# The fault-injection soak (docs/reliability.md); e.g. CHAOS_ARGS="--duration 600 --sessions 1000".
chaos: | $(UV_DEP)
	$(SYNC) --extra test --compile-bytecode
	$(BIN)/python scripts/chaos.py $(CHAOS_ARGS)

clean:
	rm -rf $(VENV) $(UV_BOOTSTRAP) .mypy_cache .ruff_cache .pytest_cache

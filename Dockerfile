# syntax=docker/dockerfile:1
# threadline: `threadline serve` on 0.0.0.0:8000 as a non-root user, installed from uv.lock.
#   docker build -t threadline .
#   docker run -p 8000:8000 -e THREADLINE_API_KEY=... threadline
# Serving on 0.0.0.0 needs THREADLINE_API_KEY (or THREADLINE_API_KEYS_FILE, a mounted key
# file): without either the server exits with status 2.
# PYTHON_IMAGE is any Debian-based image with python3 >= 3.11 and its venv module.
ARG PYTHON_IMAGE=python:3.11-slim-bookworm

FROM ${PYTHON_IMAGE} AS build
# uv from PyPI, in a venv of its own (Debian's python3 refuses a system-wide pip install).
RUN python3 -m venv /opt/uv && /opt/uv/bin/pip install --no-cache-dir 'uv>=0.9,<1'
ENV UV_COMPILE_BYTECODE=1 \
    UV_LINK_MODE=copy \
    UV_PYTHON_DOWNLOADS=never \
    UV_PROJECT_ENVIRONMENT=/app/.venv
WORKDIR /src
# The dependencies first, from the lock alone: this layer is rebuilt only when uv.lock changes.
COPY pyproject.toml uv.lock ./
RUN --mount=type=cache,target=/root/.cache/uv \
    /opt/uv/bin/uv sync --locked --no-install-project --no-editable --python python3
# Then threadline itself, as a regular (not editable) install: the runtime stage copies only
# the venv, not the source tree.
COPY README.md ./
COPY src ./src
RUN --mount=type=cache,target=/root/.cache/uv \
    /opt/uv/bin/uv sync --locked --no-editable --python python3

FROM ${PYTHON_IMAGE}
RUN groupadd --system --gid 10001 threadline \
    && useradd --system --uid 10001 --gid threadline --home-dir /app --no-create-home \
       --shell /usr/sbin/nologin threadline \
    && mkdir -p /app /data \
    && chown threadline:threadline /data
COPY --from=build /app/.venv /app/.venv
# /app is the working directory and root-owned: an agents module copied or mounted there is
# importable (THREADLINE_AGENTS_MODULE=my_agents finds /app/my_agents.py). /data is the only
# place the server writes to, for the SQLite default; compose.yaml uses PostgreSQL instead.
WORKDIR /app
ENV PATH=/app/.venv/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    THREADLINE_HOST=0.0.0.0 \
    THREADLINE_PORT=8000 \
    THREADLINE_DATABASE_URL=sqlite:////data/threadline.db
USER 10001:10001
EXPOSE 8000
HEALTHCHECK --interval=10s --timeout=3s --start-period=20s --retries=3 \
    CMD ["python3", "-c", "import urllib.request; urllib.request.urlopen('http://127.0.0.1:8000/health', timeout=2)"]
ENTRYPOINT ["threadline"]
CMD ["serve"]

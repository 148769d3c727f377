"""PgBouncer in transaction mode in front of the test PostgreSQL, as a child process.

The pool gives the bouncer fewer server connections than threadline opens client ones, so
consecutive statements of one client land on different server connections: what breaks
anything that keeps state on a connection (named prepared statements, session locks).
"""

from __future__ import annotations

import contextlib
import os
import shutil
import socket
import subprocess
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from urllib.parse import urlsplit

import pytest

from tests.conftest import REQUIRE_SERVICES
from tests.multiprocess.conftest import free_port

STARTUP_S = 10.0


@contextlib.contextmanager
def pgbouncer(pg_url: str, *, server_connections: int = 2) -> Iterator[str]:
    """Run PgBouncer (``pool_mode = transaction``) in front of ``pg_url``'s server; yield the
    same URL pointing at the bouncer."""
    binary = shutil.which("pgbouncer")
    if binary is None:
        message = "pgbouncer is not installed (apt-get install pgbouncer)"
        if REQUIRE_SERVICES:
            pytest.fail(message)
        pytest.skip(message)
    target = urlsplit(pg_url)
    port = free_port()
    with tempfile.TemporaryDirectory(prefix="tl-pgbouncer-") as folder:
        config = Path(folder) / "pgbouncer.ini"
        users = Path(folder) / "users.txt"
        users.write_text(f'"{target.username or "postgres"}" ""\n')
        config.write_text(
            "[databases]\n"
            f"* = host={target.hostname} port={target.port or 5432}\n"
            "[pgbouncer]\n"
            f"listen_addr = 127.0.0.1\nlisten_port = {port}\n"
            f"auth_type = trust\nauth_file = {users}\n"
            "pool_mode = transaction\n"
            f"default_pool_size = {server_connections}\n"
            "max_client_conn = 200\n"
            "unix_socket_dir =\n"
            # asyncpg sends it at connect; PgBouncer refuses unknown startup parameters.
            "ignore_startup_parameters = extra_float_digits\n"
        )
        os.chmod(folder, 0o755)
        command = [binary, str(config)]
        # PgBouncer refuses to run as root; CI runs as root.
        if os.geteuid() == 0:
            command[1:1] = ["-u", "postgres"]
        log = Path(folder) / "pgbouncer.log"
        with log.open("wb") as out:
            process = subprocess.Popen(
                command, stdout=out, stderr=subprocess.STDOUT, start_new_session=True
            )
        try:
            _wait_listening(port, process, log)
            yield target._replace(
                netloc=f"{target.username or 'postgres'}@127.0.0.1:{port}"
            ).geturl()
        finally:
            process.terminate()
            try:
                process.wait(10)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()


def _wait_listening(port: int, process: subprocess.Popen[bytes], log: Path) -> None:
    deadline = time.monotonic() + STARTUP_S
    while time.monotonic() < deadline:
        if process.poll() is not None:
            pytest.fail(f"pgbouncer exited with {process.returncode}:\n{log.read_text()}")
        with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), 0.5):
            return
        time.sleep(0.05)  # polls another process; bounded by the deadline
    pytest.fail(f"pgbouncer did not listen within {STARTUP_S}s")

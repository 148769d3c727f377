"""The Redis topologies the coordination tests run against, one per ``THREADLINE_REDIS_MODE``.

* ``standalone``: the Redis of ``THREADLINE_TEST_REDIS_URL``.
* ``cluster``: a local Redis Cluster of three masters (no replicas), started here:
  ``redis-server --cluster-enabled yes`` on three free ports, joined by
  ``redis-cli --cluster create``.
* ``sentinel``: one master, one replica and three sentinels (``redis-server conf --sentinel``),
  started here, with a short ``down-after-milliseconds`` so that a failover takes seconds.

Cluster and Sentinel are started once per test session (``redis_cluster``,
``redis_sentinel``; ``start_sentinel`` gives a test one of its own to break), each process in
its own process group, killed by pid at teardown. Their output goes to files in a temporary
directory, shown when a start-up fails. Waits poll a condition, bounded by ``START_S``.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import pytest
from redis import Redis
from redis import __version__ as redis_version
from redis.driver_info import DriverInfo
from redis.exceptions import RedisError

from tests.conftest import REQUIRE_SERVICES, empty_test_redis
from threadline.config import Settings
from threadline.coordination.connection import Client, open_client

Mode = Literal["standalone", "cluster", "sentinel"]
MODES: tuple[Mode, ...] = ("standalone", "cluster", "sentinel")
SERVICE = "threadline"
START_S = 30.0
POLL_S = 0.05


def _free_ports(count: int) -> list[int]:
    """Ports free now, distinct (all bound at once before any is let go)."""
    with contextlib.ExitStack() as stack:
        socks = [stack.enter_context(socket.socket()) for _ in range(count)]
        for sock in socks:
            sock.bind(("127.0.0.1", 0))
        return [int(sock.getsockname()[1]) for sock in socks]


def _free_port() -> int:
    return _free_ports(1)[0]


def _client(port: int) -> Redis:
    return Redis(
        port=port,
        socket_timeout=2,
        driver_info=DriverInfo(name="redis-py", lib_version=redis_version),
    )


def _ask(port: int, ask: Any) -> Any:
    """``ask(client)`` on a short-lived client of the node at ``port``."""
    with contextlib.closing(_client(port)) as client:
        return ask(client)


@dataclass
class Node:
    """One ``redis-server`` process (a data node or a sentinel)."""

    port: int
    process: subprocess.Popen[bytes]
    log: Path
    argv: tuple[str, ...] = ()

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    @property
    def running(self) -> bool:
        return self.process.poll() is None

    def kill(self, sig: signal.Signals = signal.SIGKILL) -> None:
        if self.running:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.process.pid, sig)
        with contextlib.suppress(subprocess.TimeoutExpired):
            self.process.wait(10)

    def output(self) -> str:
        return f"--- {self.log.name} ---\n" + self.log.read_text(errors="replace")[-4000:]

    def restart(self) -> None:
        """The same server again, on its port, in its directory (a cluster node finds its
        ``nodes.conf`` there; its data is gone: nothing is persisted)."""
        self.kill()
        again = _start(self.log.parent, self.log.stem, *self.argv)
        self.process, self.log = again.process, again.log
        answering = f"redis-server on {self.port} answering"
        _until(answering, [self], lambda: _ask(self.port, Redis.ping))


@dataclass
class Topology:
    """Where a mode's Redis is, as threadline settings (``settings``) or environment
    (``env``)."""

    mode: Mode
    url: str | None
    sentinels: tuple[str, ...] = ()
    nodes: list[Node] = field(default_factory=list)
    sentinel_nodes: list[Node] = field(default_factory=list)

    def settings(self) -> dict[str, Any]:
        found: dict[str, Any] = {"redis_mode": self.mode, "redis_url": self.url}
        if self.mode == "sentinel":
            found.update(redis_sentinels=self.sentinels, redis_sentinel_service=SERVICE)
        return found

    def env(self) -> dict[str, str]:
        found = {"THREADLINE_REDIS_MODE": self.mode}
        if self.url is not None:
            found["THREADLINE_REDIS_URL"] = self.url
        if self.mode == "sentinel":
            found["THREADLINE_REDIS_SENTINELS"] = ",".join(self.sentinels)
            found["THREADLINE_REDIS_SENTINEL_SERVICE"] = SERVICE
        return found

    def client(self) -> Client:
        """A client of this topology, as threadline's processes open it (close it after)."""
        return open_client(Settings(_env_file=None, **self.settings()), 4)  # type: ignore[call-arg]

    def master(self) -> Node:
        """The data node the sentinels name master now."""
        with contextlib.closing(_client(self.sentinel_nodes[0].port)) as sentinel:
            _, port = sentinel.sentinel_get_master_addr_by_name(SERVICE)
        return next(node for node in self.nodes if node.port == int(port))

    def stop(self) -> None:
        for node in self.sentinel_nodes + self.nodes:
            node.kill()

    def restart(self) -> None:
        """Every node again (the data empty): a cluster with every slot served, or the
        master, its replica in sync and the sentinels agreeing on both."""
        for node in self.nodes:
            node.restart()
        if self.mode == "cluster":
            _cluster_ok(self.nodes)
        if self.mode == "sentinel":
            _in_sync(self.nodes)
            for sentinel in self.sentinel_nodes:
                sentinel.restart()
            _sentinels_agree(self.nodes, self.sentinel_nodes)


def _binary(name: str) -> str:
    found = shutil.which(name)
    if found is None:
        message = f"{name} is not on PATH: the cluster and sentinel topologies need it"
        if REQUIRE_SERVICES:
            pytest.fail(message)
        pytest.skip(message)
    return found


def _start(directory: Path, name: str, *argv: str) -> Node:
    directory.mkdir(parents=True, exist_ok=True)
    log = directory / f"{name}.log"
    with log.open("wb") as out:
        process = subprocess.Popen(
            argv,
            cwd=directory,
            stdin=subprocess.DEVNULL,
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    port = int(argv[argv.index("--port") + 1]) if "--port" in argv else 0
    return Node(port, process, log, argv)


def _until(what: str, nodes: list[Node], check: Any) -> None:
    deadline = time.monotonic() + START_S
    while True:
        with contextlib.suppress(RedisError, OSError):
            if check():
                return
        dead = [node for node in nodes if not node.running]
        if dead or time.monotonic() > deadline:
            logs = "\n".join(node.output() for node in nodes)
            raise RuntimeError(f"Redis topology: {what} never happened\n{logs}")
        time.sleep(POLL_S)


def _data_node(directory: Path, *extra: str, cluster: bool = False) -> Node:
    for attempt in range(3):
        port, bus = _free_ports(2)
        argv = (_binary("redis-server"), "--port", str(port), "--bind", "127.0.0.1")
        argv += ("--save", "", "--appendonly", "no", "--daemonize", "no", *extra)
        if cluster:
            # The bus port, else port + 10000 (which may be out of range or taken).
            argv += ("--cluster-enabled", "yes", "--cluster-config-file", "nodes.conf")
            argv += ("--cluster-node-timeout", "2000", "--cluster-port", str(bus))
        node = _start(directory / str(port), f"redis-{port}", *argv)
        try:
            _until(f"redis-server on {port} answering", [node], lambda p=port: _ask(p, Redis.ping))
            return node
        except RuntimeError:
            # Another process took a port between our look and the bind: other ports.
            if "Address already in use" not in node.output() or attempt == 2:
                raise
    raise AssertionError("unreachable")


def start_cluster(directory: Path, replicas: int = 0) -> Topology:
    """Three masters (each with ``replicas`` replicas), every slot assigned,
    ``cluster_state:ok`` on each node."""
    nodes: list[Node] = []
    try:
        for _ in range(3 * (1 + replicas)):
            nodes.append(_data_node(directory, cluster=True))
        subprocess.run(
            [
                _binary("redis-cli"),
                "--cluster",
                "create",
                *(n.address for n in nodes),
                "--cluster-replicas",
                str(replicas),
                "--cluster-yes",
            ],
            check=True,
            capture_output=True,
            timeout=START_S,
        )
        _cluster_ok(nodes)
        if replicas:
            _until(
                "every replica in sync",
                nodes,
                lambda: all(
                    _ask(n.port, lambda c: c.info("replication").get("master_link_status", "up"))
                    == "up"
                    for n in nodes
                ),
            )
    except BaseException:
        for node in nodes:
            node.kill()
        raise
    seeds = ",".join(f"redis://{n.address}" for n in nodes[:2])  # two seeds: either will do
    return Topology("cluster", seeds, nodes=nodes)


def cluster_masters(topology: Topology) -> list[Node]:
    """The nodes a live node of the cluster sees as masters serving slots now."""
    for node in topology.nodes:
        if not node.running:
            continue
        with contextlib.suppress(RedisError, OSError):
            seen = _ask(node.port, lambda c: c.execute_command("CLUSTER NODES"))
            ports = {
                int(address.rsplit(":", 1)[1])
                for address, info in seen.items()
                if "master" in info["flags"] and "fail" not in info["flags"] and info["slots"]
            }
            return [n for n in topology.nodes if n.port in ports]
    return []


def _cluster_ok(nodes: list[Node]) -> None:
    for node in nodes:
        _until(
            f"cluster_state:ok on {node.port}",
            nodes,
            lambda n=node: _ask(n.port, lambda c: c.cluster("info")["cluster_state"] == "ok"),
        )


def start_standalone(directory: Path) -> Topology:
    """A standalone Redis of a test's own, which it may stop and restart."""
    node = _data_node(directory)
    return Topology("standalone", f"redis://{node.address}/0", nodes=[node])


def _in_sync(nodes: list[Node]) -> None:
    """The replica (``nodes[1]``) replicates the master."""
    _until(
        "the replica in sync",
        nodes,
        lambda: _ask(nodes[1].port, lambda c: c.info("replication")["master_link_status"] == "up"),
    )


def _sentinels_agree(nodes: list[Node], sentinels: list[Node]) -> None:
    def agreed() -> bool:
        for sentinel in sentinels:
            with contextlib.closing(_client(sentinel.port)) as client:
                if len(client.sentinel_sentinels(SERVICE)) < 2:
                    return False
                if not client.sentinel_slaves(SERVICE):
                    return False
        return True

    _until("three sentinels that know the replica and each other", nodes + sentinels, agreed)


def start_sentinel(directory: Path) -> Topology:
    """A master, its replica, and three sentinels that agree on both."""
    nodes: list[Node] = []
    sentinels: list[Node] = []
    try:
        master = _data_node(directory)
        nodes.append(master)
        replica = _data_node(directory, "--replicaof", "127.0.0.1", str(master.port))
        nodes.append(replica)
        _in_sync(nodes)
        for _ in range(3):
            port = _free_port()
            home = directory / f"sentinel-{port}"
            home.mkdir(parents=True)
            conf = home / "sentinel.conf"  # a sentinel rewrites its file: one each
            conf.write_text(
                f"port {port}\nbind 127.0.0.1\ndaemonize no\n"
                f"sentinel monitor {SERVICE} 127.0.0.1 {master.port} 2\n"
                f"sentinel down-after-milliseconds {SERVICE} 1000\n"
                f"sentinel failover-timeout {SERVICE} 5000\n"
                f"sentinel parallel-syncs {SERVICE} 1\n"
            )
            sentinels.append(
                _start(home, "sentinel", _binary("redis-server"), str(conf), "--sentinel")
            )
            sentinels[-1].port = port

        _sentinels_agree(nodes, sentinels)
    except BaseException:
        for node in sentinels + nodes:
            node.kill()
        raise
    addresses = tuple(s.address for s in sentinels)
    return Topology("sentinel", None, addresses, nodes=nodes, sentinel_nodes=sentinels)


@contextlib.contextmanager
def running(topology: Topology) -> Iterator[Topology]:
    """The topology, stopped on the way out (a fixture's body)."""
    try:
        yield topology
    finally:
        topology.stop()


@pytest.fixture(scope="session")
def redis_cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Topology]:
    with running(start_cluster(tmp_path_factory.mktemp("redis-cluster"))) as topology:
        yield topology


@pytest.fixture(scope="session")
def redis_sentinel(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Topology]:
    with running(start_sentinel(tmp_path_factory.mktemp("redis-sentinel"))) as topology:
        yield topology


def topology_of(request: pytest.FixtureRequest, mode: Mode) -> Topology:
    """The session's topology of a mode, started on first use."""
    if mode == "standalone":
        return Topology("standalone", empty_test_redis())
    topology: Topology = request.getfixturevalue(f"redis_{mode}")
    return topology

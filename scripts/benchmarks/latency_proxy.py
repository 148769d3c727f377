"""A TCP proxy that adds a fixed delay, so a database on loopback behaves like one across a network.

    python scripts/benchmarks/latency_proxy.py --upstream 127.0.0.1:5432 --delay-ms 1

It prints ``listening on HOST:PORT`` once ready and runs until SIGTERM/SIGINT. Every chunk the
upstream sends back is held for ``--delay-ms`` before it is forwarded, so each request/response
round trip (PostgreSQL's protocol is one) costs that much more, as on a network link. The whole
delay sits on the return path because event-loop timers have millisecond resolution: half a
millisecond each way would round to a millisecond each way and double the figure.

Byte order is kept per connection: chunks wait in a FIFO and one timer drains what is due,
rather than one timer per chunk, whose order the loop does not promise for equal deadlines.
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import signal
import sys
from typing import cast

# Stop reading from a peer while this much is waiting to be written to the other one.
HIGH_WATER = 4 * 1024 * 1024
# Chunks due this close together leave in one flush rather than waiting for another timer.
FLUSH_TOLERANCE = 0.0001


class Pipe(asyncio.Protocol):
    """One side of a proxied connection: what it receives is written to ``peer`` after ``delay``."""

    def __init__(self, loop: asyncio.AbstractEventLoop, delay: float) -> None:
        self._loop = loop
        self._delay = delay
        self._pending: collections.deque[tuple[float, bytes]] = collections.deque()
        self._pending_bytes = 0
        self._timer: asyncio.TimerHandle | None = None
        self._eof = False
        self.transport: asyncio.Transport | None = None
        self.peer: Pipe | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's transports implement asyncio.Transport without subclassing it.
        self.transport = cast(asyncio.Transport, transport)
        self.transport.set_write_buffer_limits(high=HIGH_WATER)

    def data_received(self, data: bytes) -> None:
        if self._delay <= 0:
            self._write_to_peer(data)
            return
        self._pending.append((self._loop.time() + self._delay, data))
        self._pending_bytes += len(data)
        if self._pending_bytes > HIGH_WATER and self.transport is not None:
            self.transport.pause_reading()
        if self._timer is None:
            self._timer = self._loop.call_at(self._pending[0][0], self._flush)

    def eof_received(self) -> bool:
        self._eof = True
        if not self._pending:
            self._close_peer()
        return False

    def connection_lost(self, exc: Exception | None) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        self._pending.clear()
        self._close_peer()

    def pause_writing(self) -> None:
        if self.peer is not None and self.peer.transport is not None:
            self.peer.transport.pause_reading()

    def resume_writing(self) -> None:
        if self.peer is not None and self.peer.transport is not None:
            self.peer.transport.resume_reading()

    def _flush(self) -> None:
        self._timer = None
        now = self._loop.time() + FLUSH_TOLERANCE
        while self._pending and self._pending[0][0] <= now:
            _, data = self._pending.popleft()
            self._pending_bytes -= len(data)
            self._write_to_peer(data)
        if self.transport is not None and self._pending_bytes <= HIGH_WATER:
            self.transport.resume_reading()
        if self._pending:
            self._timer = self._loop.call_at(self._pending[0][0], self._flush)
        elif self._eof:
            self._close_peer()

    def _write_to_peer(self, data: bytes) -> None:
        if self.peer is not None and self.peer.transport is not None:
            self.peer.transport.write(data)

    def _close_peer(self) -> None:
        if self.peer is not None and self.peer.transport is not None:
            self.peer.transport.close()


class ClientPipe(Pipe):
    """The accepted side: holds the client's bytes until the upstream connection is open."""

    def __init__(
        self, loop: asyncio.AbstractEventLoop, upstream: tuple[str, int], delay: float
    ) -> None:
        super().__init__(loop, 0.0)
        self._upstream = upstream
        self._upstream_delay = delay
        self.connecting: asyncio.Task[None] | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        super().connection_made(transport)
        assert self.transport is not None
        self.transport.pause_reading()
        self.connecting = self._loop.create_task(self._connect())

    async def _connect(self) -> None:
        assert self.transport is not None
        try:
            _, server = await self._loop.create_connection(
                lambda: Pipe(self._loop, self._upstream_delay), *self._upstream
            )
        except OSError as exc:
            print(f"latency_proxy: cannot reach upstream: {exc}", file=sys.stderr)
            self.transport.close()
            return
        server.peer, self.peer = self, server
        if self.transport.is_closing():
            assert server.transport is not None
            server.transport.close()
            return
        self.transport.resume_reading()


async def serve(listen: tuple[str, int], upstream: tuple[str, int], delay_s: float) -> None:
    loop = asyncio.get_running_loop()
    server = await loop.create_server(
        lambda: ClientPipe(loop, upstream, delay_s), listen[0], listen[1]
    )
    host, port = server.sockets[0].getsockname()[:2]
    print(f"listening on {host}:{port}", flush=True)
    stop = asyncio.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    async with server:
        await stop.wait()


def _address(text: str) -> tuple[str, int]:
    host, _, port = text.rpartition(":")
    return host or "127.0.0.1", int(port)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--listen", type=_address, default=("127.0.0.1", 0))
    parser.add_argument("--upstream", type=_address, default=("127.0.0.1", 5432))
    parser.add_argument("--delay-ms", type=float, default=1.0, help="added per round trip")
    args = parser.parse_args()
    # The standard loop, not uvloop: uvloop's clock ticks in whole milliseconds. Even so, epoll
    # sleeps in whole milliseconds plus timer slack: a 1 ms delay adds ~1.15 ms, and any delay
    # rounds up to the next millisecond. The benchmark measures and reports the real figure.
    asyncio.run(serve(args.listen, args.upstream, args.delay_ms / 1000))


if __name__ == "__main__":
    main()

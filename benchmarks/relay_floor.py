"""The cheapest possible hop: a TCP relay on uvloop protocols, for the benchmark's floor.

It neither parses nor stores anything: each client connection gets its own
upstream connection and bytes are copied both ways in `data_received`. What
this costs per streamed token (one upstream read and one client write each)
is the floor that any HTTP proxy written in Python pays on this machine;
benchmarks/bench.py measures it beside the daemon so the daemon's figures can be
read against it.

Run ``python benchmarks/relay_floor.py --upstream-port N``; it prints
``LISTENING <port>`` once ready and serves until SIGTERM.
"""

from __future__ import annotations

import argparse
import asyncio
import signal

import uvloop


class _Pipe(asyncio.Protocol):
    """One direction's reader; it writes what it reads to the peer's transport."""

    def __init__(self) -> None:
        self.peer: asyncio.Transport | None = None
        self.pending = bytearray()  # read before the peer's connection was made
        self.transport: asyncio.Transport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def data_received(self, data: bytes) -> None:
        if self.peer is None:
            self.pending += data
        else:
            self.peer.write(data)

    def connection_lost(self, exc: Exception | None) -> None:
        if self.peer is not None:
            self.peer.close()

    def attach(self, peer: asyncio.Transport) -> None:
        self.peer = peer
        if self.pending:
            peer.write(bytes(self.pending))
            self.pending.clear()


class _Client(_Pipe):
    def __init__(self, upstream: tuple[str, int]) -> None:
        super().__init__()
        self.upstream = upstream

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        super().connection_made(transport)
        self.connecting = asyncio.ensure_future(self._connect())

    async def _connect(self) -> None:
        loop = asyncio.get_running_loop()
        try:
            up_transport, up = await loop.create_connection(_Pipe, *self.upstream)
        except OSError:
            assert self.transport is not None
            self.transport.close()
            return
        assert self.transport is not None
        up.attach(self.transport)
        self.attach(up_transport)


async def serve(port: int, upstream_port: int) -> None:
    loop = asyncio.get_running_loop()
    server = await loop.create_server(
        lambda: _Client(("127.0.0.1", upstream_port)), "127.0.0.1", port, backlog=4096
    )
    print(f"LISTENING {server.sockets[0].getsockname()[1]}", flush=True)
    stop = asyncio.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()
    server.close()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--port", type=int, default=0)
    p.add_argument("--upstream-port", type=int, required=True)
    args = p.parse_args()
    uvloop.run(serve(args.port, args.upstream_port))


if __name__ == "__main__":
    main()

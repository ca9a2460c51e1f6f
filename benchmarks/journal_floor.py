"""A relay that journals every token: the floor of a durable gateway, for the benchmark.

`relay_floor.py` copies bytes and stores nothing. This relay does the least that a
gateway keeping llmsvc's promise must do per streamed token, in the shape issue 19
proposes for the hot path: the upstream's response is parsed as it arrives (httptools,
the SSE events, each event's JSON), each read's token texts are appended to llmsvc's own
WAL (`WalWriter` with the daemon's defaults: group commit, `write` sync) from the
protocol callback, and the read's bytes go to the client once their WAL batch is
written. No task per token, no ASGI, no re-encoding. The request direction is copied
as `relay_floor.py` copies it, and a request's start and end records are not journaled:
on a stream of hundreds of tokens they are a rounding error per token.

What it costs per paced token beside `relay_floor.py` is what journaling adds at the
least, in Python, on this WAL: the floor a rebuilt hot path could reach.

Run ``python benchmarks/journal_floor.py --upstream-port N --wal-dir DIR``; it prints
``LISTENING <port>`` once ready and serves until SIGTERM.
"""

from __future__ import annotations

import argparse
import asyncio
import signal
import uuid
from pathlib import Path
from typing import Any

import httptools
import orjson
import uvloop

from llmsvc.config import Settings
from llmsvc.gateway.journal import Journal
from llmsvc.private import make_dirs
from llmsvc.providers.sse import SseSplitter
from llmsvc.wal import WalWriter


class _Upstream(asyncio.Protocol):
    """The upstream's side of one client: parses its responses, journals their tokens and
    writes each read to the client when the WAL batch holding its tokens is written."""

    def __init__(self, client: asyncio.Transport, journal: Journal) -> None:
        self.client = client
        self.journal = journal
        self.parser = httptools.HttpResponseParser(self)
        self.splitter = SseSplitter()
        self.attempt = uuid.uuid4().bytes
        self.seq = 0
        self.texts: list[str] = []
        # The newest batch a read waited for: later reads write after it, in order (a done
        # future's callbacks may still be queued, so even then they go through it).
        self.last: asyncio.Future[int] | None = None

    def on_message_begin(self) -> None:
        self.splitter, self.attempt, self.seq = SseSplitter(), uuid.uuid4().bytes, 0

    def on_body(self, body: bytes) -> None:
        for data in self.splitter.feed(body):
            if data == b"[DONE]":
                continue
            event: Any = orjson.loads(data)
            for choice in event.get("choices") or ():
                if content := (choice.get("delta") or {}).get("content"):
                    self.texts.append(content)

    def data_received(self, data: bytes) -> None:
        self.parser.feed_data(data)
        if self.texts:
            self.last = self.journal.tokens(self.attempt, self.seq, self.texts)
            self.seq += len(self.texts)
            self.texts = []
        if self.last is None:
            self.client.write(data)
        else:
            self.last.add_done_callback(lambda _: self.client.write(data))

    def connection_lost(self, exc: Exception | None) -> None:
        self.client.close()


class _Client(asyncio.Protocol):
    """A client's connection: its bytes are copied to its own upstream connection."""

    def __init__(self, upstream: tuple[str, int], journal: Journal) -> None:
        self.address = upstream
        self.journal = journal
        self.pending = bytearray()  # read before the upstream connection was made
        self.upstream: asyncio.Transport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport: asyncio.Transport = transport  # type: ignore[assignment]
        self.connecting = asyncio.ensure_future(self._connect())

    async def _connect(self) -> None:
        loop = asyncio.get_running_loop()
        try:
            upstream, _ = await loop.create_connection(
                lambda: _Upstream(self.transport, self.journal), *self.address
            )
        except OSError:
            self.transport.close()
            return
        self.upstream = upstream
        if self.pending:
            upstream.write(bytes(self.pending))
            self.pending.clear()

    def data_received(self, data: bytes) -> None:
        if self.upstream is None:
            self.pending += data
        else:
            self.upstream.write(data)

    def connection_lost(self, exc: Exception | None) -> None:
        if self.upstream is not None:
            self.upstream.close()


async def serve(port: int, upstream_port: int, wal_dir: Path) -> None:
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    writer = WalWriter(make_dirs(wal_dir), uuid.uuid4(), Settings.model_construct().wal_policy())
    writer.open(loop, lambda exc: stop.set())
    journal = Journal(writer)
    server = await loop.create_server(
        lambda: _Client(("127.0.0.1", upstream_port), journal), "127.0.0.1", port, backlog=4096
    )
    print(f"LISTENING {server.sockets[0].getsockname()[1]}", flush=True)
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()
    server.close()
    await writer.close()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--port", type=int, default=0)
    p.add_argument("--upstream-port", type=int, required=True)
    p.add_argument("--wal-dir", type=Path, required=True)
    args = p.parse_args()
    uvloop.run(serve(args.port, args.upstream_port, args.wal_dir))


if __name__ == "__main__":
    main()

"""A relay that journals each request and token: the floor of a durable gateway.

`relay_floor.py` copies bytes and stores nothing. This relay does the least that a
gateway keeping llmsvc's promise must do, in the shape issue 19 proposes for the hot
path, on llmsvc's own WAL (`WalWriter` with the daemon's defaults: group commit,
`write` sync), all from protocol callbacks, with no task, no ASGI and no re-encoding:

- a request's body is parsed (httptools, then its JSON) and its start and attempt
  start are queued in the WAL, as the daemon queues them, while its bytes are copied
  to the upstream as they come;
- a stream's events are parsed as they arrive (the SSE events, each event's JSON), each
  read's token texts appended to the WAL, and the read's bytes written to the client
  once their WAL batch is written;
- a whole reply is held until it is complete, its text and both ends are appended in one
  WAL write, and it is written to the client once that write is done. A stream's ends
  go in with its last read.

What it costs beside `relay_floor.py` is what journaling adds at the least, in Python, on
this WAL: the floor a rebuilt hot path could reach. It relays chat completions (a POST
with a JSON body), one at a time per connection, as the benchmark's clients send them.

Run ``python benchmarks/journal_floor.py --upstream-port N --wal-dir DIR``; it prints
``LISTENING <port>`` once ready and serves until SIGTERM.
"""

from __future__ import annotations

import argparse
import asyncio
import collections
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
from llmsvc.wal import AttemptEndFields, RequestEndFields, WalWriter

Started = collections.deque[tuple[uuid.UUID, uuid.UUID]]  # (request, attempt) ids, in order


class _Upstream(asyncio.Protocol):
    """The upstream's side of one client: parses its responses and writes each read to the
    client once the WAL batch holding what it carries (tokens, a whole reply, the ends) is
    written."""

    def __init__(self, client: asyncio.Transport, journal: Journal, started: Started) -> None:
        self.client = client
        self.journal = journal
        self.started = started
        self.parser = httptools.HttpResponseParser(self)
        # The newest batch a read waited for: later reads write after it, in order (a done
        # future's callbacks may still be queued, so even then they go through it).
        self.last: asyncio.Future[int] | None = None

    def on_message_begin(self) -> None:
        self.request, self.attempt = self.started.popleft()
        self.splitter, self.seq, self.texts = SseSplitter(), 0, list[str]()
        self.streamed, self.whole, self.held = False, bytearray(), bytearray()
        self.ended: asyncio.Future[int] | None = None

    def on_header(self, name: bytes, value: bytes) -> None:
        if name.lower() == b"content-type":
            self.streamed = value.startswith(b"text/event-stream")

    def on_body(self, body: bytes) -> None:
        if not self.streamed:
            self.whole += body
            return
        for data in self.splitter.feed(body):
            if data == b"[DONE]":
                continue
            event: Any = orjson.loads(data)
            for choice in event.get("choices") or ():
                if content := (choice.get("delta") or {}).get("content"):
                    self.texts.append(content)

    def on_message_complete(self) -> None:
        if not self.streamed:
            reply: Any = orjson.loads(self.whole)
            self.texts.append(reply["choices"][0]["message"]["content"])
        if self.texts:
            self.journal.tokens(self.attempt.bytes, self.seq, self.texts, when="next")
            self.seq += len(self.texts)
            self.texts = []
        attempt: AttemptEndFields = {"status": "completed", "token_count": self.seq}
        request: RequestEndFields = {"status": "completed"}
        self.ended = self.journal.ends(self.attempt, attempt, self.request, request)

    def data_received(self, data: bytes) -> None:
        self.parser.feed_data(data)
        if self.ended is None and not self.streamed:
            self.held += data  # a whole reply (or a head not yet known to be a stream's)
            return
        if self.held:
            data, self.held = bytes(self.held) + data, bytearray()
        if self.ended is not None:
            self.last, self.ended = self.ended, None
        elif self.texts:
            self.last = self.journal.tokens(self.attempt.bytes, self.seq, self.texts)
            self.seq += len(self.texts)
            self.texts = []
        if self.last is None:
            self.client.write(data)
        else:
            self.last.add_done_callback(lambda _: self.client.write(data))

    def connection_lost(self, exc: Exception | None) -> None:
        self.client.close()


class _Client(asyncio.Protocol):
    """A client's connection: its bytes are copied to its own upstream connection, and each
    request's start journaled once its body is in."""

    def __init__(self, upstream: tuple[str, int], journal: Journal) -> None:
        self.address = upstream
        self.journal = journal
        self.parser = httptools.HttpRequestParser(self)
        self.body = bytearray()
        self.started: Started = collections.deque()
        self.pending = bytearray()  # read before the upstream connection was made
        self.upstream: asyncio.Transport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport: asyncio.Transport = transport  # type: ignore[assignment]
        self.connecting = asyncio.ensure_future(self._connect())

    async def _connect(self) -> None:
        loop = asyncio.get_running_loop()
        try:
            upstream, _ = await loop.create_connection(
                lambda: _Upstream(self.transport, self.journal, self.started), *self.address
            )
        except OSError:
            self.transport.close()
            return
        self.upstream = upstream
        if self.pending:
            upstream.write(bytes(self.pending))
            self.pending.clear()

    def on_body(self, body: bytes) -> None:
        self.body += body

    def on_message_complete(self) -> None:
        request: Any = orjson.loads(self.body)
        self.body.clear()
        ids = uuid.uuid4(), uuid.uuid4()
        messages, model = request.pop("messages"), request.pop("model")
        stream = bool(request.pop("stream", False))
        self.journal.request_start(ids[0], str(ids[0]), model, stream, messages, request)
        self.journal.attempt_start(ids[1], ids[0], 1, "upstream", model)
        self.started.append(ids)

    def data_received(self, data: bytes) -> None:
        self.parser.feed_data(data)
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

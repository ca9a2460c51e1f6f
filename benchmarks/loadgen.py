"""A lean streaming load generator: one raw asyncio protocol per stream.

The benchmark must measure the daemon, not its client. aiohttp's client costs
~15 us per read, so with thousands of paced streams (one token per read) the
load generator would take a whole core from the two this machine has. This
client writes one HTTP/1.1 request per connection and only counts token
events in the raw bytes it receives (no HTTP or SSE parsing beyond the status
line): a few microseconds per read.
"""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass, field

# Every token event, from the upstream and from the daemon, has this; the role event does not.
TOKEN_MARK = b'{"content":"'
EDGE = len(TOKEN_MARK) - 1
DONE = b"data: [DONE]\n\n"
CHUNKED_END = b"0\r\n\r\n"


@dataclass
class StreamStats:
    """What the clients saw: token counts, times to first token and gaps between reads."""

    tokens: int = 0
    streams: int = 0
    active: int = 0  # streams sent and not yet ended
    reads: int = 0
    errors: list[str] = field(default_factory=list)
    ttfts: list[float] = field(default_factory=list)
    gaps: list[float] = field(default_factory=list)  # between token-bearing reads, if asked


def request_bytes(host: str, port: int, path: str, body: bytes) -> bytes:
    head = (
        f"POST {path} HTTP/1.1\r\nHost: {host}:{port}\r\nContent-Type: application/json\r\n"
        f"Content-Length: {len(body)}\r\n\r\n"
    )
    return head.encode() + body


class Connection(asyncio.Protocol):
    """One kept-alive HTTP/1.1 connection carrying streaming requests one after another."""

    def __init__(self, stats: StreamStats, gaps: bool) -> None:
        self.stats, self.keep_gaps = stats, gaps
        self.done: asyncio.Future[None] | None = None
        self.transport: asyncio.Transport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    async def stream(self, request: bytes, expect: int) -> None:
        """Send one request and wait for its response's end; the outcome goes into stats."""
        assert self.transport is not None
        if self.transport.is_closing():
            self.stats.errors.append("connection closed by the server")
            return
        self.expect, self.head, self.tokens, self.tail = expect, b"", 0, b""
        self.status_checked = False
        self.done = asyncio.get_running_loop().create_future()
        self.t0 = self.last = time.perf_counter()
        self.stats.active += 1
        self.transport.write(request)
        await self.done

    def data_received(self, data: bytes) -> None:
        self.stats.reads += 1
        if self.done is None or self.done.done():
            return
        if not self.status_checked:
            self.head += data
            if b"\r\n" not in self.head:
                return
            self.status_checked = True
            if not self.head.startswith(b"HTTP/1.1 200"):
                self._finish(f"HTTP {self.head[:200]!r}")
                return
            data, self.head = self.head, b""
        # a mark split across reads is found in the end of one and the start of the next
        found = data.count(TOKEN_MARK) + (self.tail[-EDGE:] + data[:EDGE]).count(TOKEN_MARK)
        if found:
            now = time.perf_counter()
            if not self.tokens:
                self.stats.ttfts.append(now - self.t0)
            elif self.keep_gaps:
                self.stats.gaps.append(now - self.last)
            self.last = now
            self.tokens += found
        self.tail = (self.tail + data)[-32:]
        if self.tail.endswith(CHUNKED_END) and DONE in self.tail:
            self._finish(None)

    def connection_lost(self, exc: Exception | None) -> None:
        if self.done is not None and not self.done.done():
            self._finish(f"connection lost after {self.tokens} tokens: {exc}")

    def _finish(self, error: str | None) -> None:
        self.stats.active -= 1
        if error is None and self.tokens != self.expect:
            error = f"{self.tokens} tokens of {self.expect}"
        if error is None:
            self.stats.tokens += self.tokens
            self.stats.streams += 1
        else:
            self.stats.errors.append(error)
            assert self.transport is not None
            self.transport.close()
        assert self.done is not None
        self.done.set_result(None)

    def close(self) -> None:
        if self.transport is not None:
            self.transport.close()


async def connect(host: str, port: int, stats: StreamStats, gaps: bool = False) -> Connection:
    loop = asyncio.get_running_loop()
    _, conn = await loop.create_connection(lambda: Connection(stats, gaps), host, port)
    return conn

"""llmsvc's HTTP/1.1 client for upstream calls: a raw asyncio protocol and httptools' parser.

Not aiohttp's client: on a paced stream it cost 30-39 us of CPU per token against
16-17 us for a relay on a raw protocol (BENCHMARKS.md, "What limits each figure").
Here a token's bytes take one path: the protocol's `data_received`, the parser's
`on_body`, appended to the response's buffer and the waiting reader's future woken;
no timer, task or object per read beyond the bytes.

What it keeps of the client it replaces: TLS with certificate and host name checks
(`ssl.create_default_context()`, so SSL_CERT_FILE and SSL_CERT_DIR pick the CAs as
before), the connect timeout, a keep-alive pool per provider (an idle connection is
reused for 30 s, one the server closed is dropped, no limit on their number), gzip
and deflate bodies, and Content-Length, chunked and read-until-close bodies. A
connection goes back to the pool only after its response was read to the end; one
abandoned half-read (a client gone, a silence) is closed, never reused.

One silence timer per response bounds every wait for the upstream (the head, then
each gap in the body); it moves itself on when it fires, never per read.
"""

from __future__ import annotations

import asyncio
import functools
import ssl
import zlib
from collections.abc import Callable, Iterable, Iterator, Mapping
from typing import NamedTuple
from urllib.parse import urlsplit

import httptools

from llmsvc.providers.fields import TooLarge
from llmsvc.timers import Timer, timers

KEEPALIVE_SECONDS = 30.0  # an idle connection's life in the pool
READ_AHEAD = 1 << 18  # bytes buffered ahead of a slow reader before the socket is paused
# gzip and deflate, as the client before advertised: an upstream may save a large body's
# bytes on the wire, and one that compresses unasked is read all the same.
REQUEST_HEAD = "POST {} HTTP/1.1\r\nHost: {}\r\nUser-Agent: llmsvc\r\nAccept: */*\r\n" + (
    "Accept-Encoding: gzip, deflate\r\nContent-Length: {}\r\n"
)


class UpstreamError(Exception):
    """The upstream was not reached, broke HTTP, closed mid-reply or fell silent."""


class Origin(NamedTuple):
    """Where a connection goes: what the pool keys idle connections by."""

    tls: bool
    host: str
    port: int


@functools.lru_cache(maxsize=256)
def split(url: str) -> tuple[Origin, str, str]:
    """A URL as its origin, request target and Host header (an adapter has a few URLs)."""
    parts = urlsplit(url)
    tls = parts.scheme == "https"
    host = parts.hostname or ""
    port = parts.port or (443 if tls else 80)
    shown = f"[{host}]" if ":" in host else host
    authority = shown if parts.port is None else f"{shown}:{port}"
    target = (parts.path or "/") + (f"?{parts.query}" if parts.query else "")
    return Origin(tls, host, port), target, authority


class Headers(Mapping[str, str]):
    """A response's headers, found by name in any case; a repeated one reads comma-joined."""

    __slots__ = ("_values",)

    def __init__(self, pairs: Iterable[tuple[bytes, bytes]]) -> None:
        """From the head's fields as the parser hands them over."""
        values: dict[str, str] = {}
        for name, value in pairs:
            key, text = name.decode("latin-1").lower(), value.decode("latin-1")
            prior = values.get(key)
            values[key] = text if prior is None else f"{prior}, {text}"
        self._values = values

    def __getitem__(self, name: str) -> str:
        return self._values[name.lower()]

    def __iter__(self) -> Iterator[str]:
        return iter(self._values)

    def __len__(self) -> int:
        return len(self._values)


def framing(pairs: list[tuple[bytes, bytes]]) -> tuple[bool, bool, str]:
    """Whether a head's body is chunked, whether it has a length, and its content coding
    (comma-joined if repeated, lower case): all the head says that reading the body needs."""
    chunked = length = False
    codings: list[bytes] = []
    for name, value in pairs:
        name = name.lower()
        if name == b"transfer-encoding":
            chunked = chunked or b"chunked" in value.lower()
        elif name == b"content-length":
            length = True
        elif name == b"content-encoding":
            codings.append(value)
    coding = b", ".join(codings).decode("latin-1").strip().lower() if codings else "identity"
    return chunked, length, coding


class Response:
    """One response as it arrives: `status` and `headers` once `post` returns it, the body
    by `read` (as it comes) or `body` (whole), then `release`, always.

    The head's fields are kept as the parser hands them over, bytes pairs, and made into
    `headers` only when read: the body's framing and coding are all a reply that succeeds
    needs of them, and a provider sends 15-25 (rate limits, ids, cookies).
    """

    __slots__ = (
        "_buffered",
        "_chunks",
        "_connection",
        "_done",
        "_error",
        "_head",
        "_headers",
        "_inflate",
        "_loop",
        "_maybe_raw",
        "_released",
        "_silence",
        "_sink",
        "_sink_stopped",
        "_timer",
        "_waiter",
        "_waiting_since",
        "fields",
        "status",
    )

    def __init__(self, connection: Connection, silence: float) -> None:
        self.status = 0
        self.fields: list[tuple[bytes, bytes]] = []  # the head's, as parsed
        self._headers: Headers | None = None
        self._connection = connection
        self._loop = connection.loop
        self._silence = silence
        self._chunks: list[bytes] = []
        self._buffered = 0
        self._head = False  # the head has arrived
        self._done = False  # the body has ended
        self._error: UpstreamError | None = None
        self._waiter: asyncio.Future[None] | None = None
        self._waiting_since: float | None = None  # loop time the current wait began
        self._timer: Timer | None = None  # the silence's, one of the loop's (llmsvc/timers.py)
        self._inflate: zlib._Decompress | None = None
        self._maybe_raw = False  # a deflate body not yet told zlib-wrapped or raw
        self._released = False
        self._sink: Callable[[bytes], None] | None = None
        self._sink_stopped: Callable[[], None] | None = None

    def sink(self, data: Callable[[bytes], None], stopped: Callable[[], None]) -> bool:
        """Hand the body's bytes to `data` in the connection's callback as they arrive, not to
        `read`, until `unsink`; the end or a failure unsinks and calls `stopped` (then `read`
        tells which). The silence timer runs from each arrival as it runs from each wait.
        False if `read` has something to return already (bytes, the end, a failure)."""
        if self._chunks or self._done or self._error is not None:
            return False
        self._sink, self._sink_stopped = data, stopped
        self._silence_from_now()
        return True

    def unsink(self) -> None:
        self._sink = self._sink_stopped = None
        self._waiting_since = None

    async def read(self) -> bytes:
        """What arrived since the last read, waiting for some; b"" once the body ended. Bytes
        that arrived before a failure are handed over before the failure is raised."""
        while not self._chunks:
            if self._error is not None:
                raise self._error
            if self._done:
                return b""
            waiter = self._arm()
            try:
                await waiter
            finally:
                self._disarm()
        chunks = self._chunks
        data = chunks[0] if len(chunks) == 1 else b"".join(chunks)
        chunks.clear()
        if self._buffered > READ_AHEAD:
            self._connection.resume()
        self._buffered = 0
        return data

    async def body(self, limit: int) -> bytes:
        """The whole body, refused (TooLarge) past `limit` bytes."""
        body = bytearray()
        while chunk := await self.read():
            body += chunk
            if len(body) > limit:
                raise TooLarge(f"the body is over {limit} bytes")
        return bytes(body)

    @property
    def headers(self) -> Headers:
        if self._headers is None:
            self._headers = Headers(self.fields)
        return self._headers

    def drop_headers(self) -> None:
        """Forget the headers once nobody will read them: a stream keeps its response for
        minutes, and an upstream's 10-20 headers cost 1-4 KiB a stream. The body's framing
        and encoding were read from them at the head; a chunked body's trailers, if any,
        land in the empty list left."""
        self.fields, self._headers = [], None

    def release(self) -> None:
        """Give the connection back to the pool if the body was read to its end and the
        server keeps it open; close it otherwise (a half-read reply's rest would be read as
        the next one). Done once; a later call does nothing."""
        if self._released:
            return
        self._released = True
        if self._timer is not None:
            timers(self._loop).cancel(self._timer)
            self._timer = None
        self._connection.finished()

    def _arm(self) -> asyncio.Future[None]:
        """A wait for the connection to bring something, its silence timer armed; only this
        counts as silence, not the time a slow client takes to accept what came before.
        Awaited in the caller's frame, then `_disarm`ed: no coroutine of its own per wait."""
        self._waiter = waiter = self._loop.create_future()
        self._silence_from_now()
        return waiter

    def _silence_from_now(self) -> None:
        """A silence counts from now; the one timer is armed if it is not."""
        self._waiting_since = now = self._loop.time()
        if self._timer is None:
            self._timer = timers(self._loop).call_at(now + self._silence, self._silent)

    def _disarm(self) -> None:
        self._waiter = self._waiting_since = None

    async def _wait_head(self) -> None:
        while not self._head:
            if self._error is not None:
                raise self._error
            waiter = self._arm()
            try:
                await waiter
            finally:
                self._disarm()

    def _silent(self) -> None:
        """The silence timer: fail a wait that has lasted `silence`, else move on to the
        current wait's deadline."""
        now = self._loop.time()
        since = now if self._waiting_since is None else self._waiting_since
        if now - since >= self._silence:
            self._timer = None
            self._fail(UpstreamError(f"no data for {self._silence:g} s (timeout_seconds)"))
        else:
            self._timer = timers(self._loop).call_at(since + self._silence, self._silent)

    def _wake(self) -> None:
        waiter = self._waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)
        if (stopped := self._sink_stopped) is not None:
            self.unsink()
            stopped()

    def _fail(self, error: UpstreamError) -> None:
        if self._error is None and not self._done:
            self._error = error
            self._wake()

    # What the connection's parser callbacks feed it.

    def _started(self, status: int, encoding: str) -> None:
        self.status = status
        if encoding == "gzip":
            self._inflate = zlib.decompressobj(16 + zlib.MAX_WBITS)
        elif encoding == "deflate":  # zlib-wrapped as the RFC says, or raw: told on arrival
            self._inflate = zlib.decompressobj(zlib.MAX_WBITS)
            self._maybe_raw = True
        elif encoding != "identity":
            raise UpstreamError(f"the upstream sent a body in an encoding not asked: {encoding}")
        self._head = True
        self._wake()

    def _feed(self, data: bytes) -> None:
        if self._inflate is not None:
            data = self._inflated(data)
            if not data:
                return
        if self._sink is not None:
            self._waiting_since = self._loop.time()
            self._sink(data)
            return
        self._chunks.append(data)
        self._buffered += len(data)
        if self._buffered > READ_AHEAD:
            self._connection.pause()
        waiter = self._waiter  # _wake, inlined: this is every token's path
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    def _inflated(self, data: bytes) -> bytes:
        assert self._inflate is not None
        try:
            inflated = self._inflate.decompress(data)
        except zlib.error:
            if not self._maybe_raw:
                raise UpstreamError("the upstream sent a body that does not decompress") from None
            self._maybe_raw = False
            self._inflate = zlib.decompressobj(-zlib.MAX_WBITS)  # deflate with no zlib header
            return self._inflated(data)
        self._maybe_raw = self._maybe_raw and not inflated
        return inflated

    def _ended(self) -> None:
        if self._inflate is not None and (rest := self._inflate.flush()):
            self._chunks.append(rest)
        self._done = True
        self._wake()


class Connection(asyncio.Protocol):
    """One upstream connection: its bytes go through the parser to the response under way."""

    __slots__ = (
        "_paused",
        "_until_close",
        "closed",
        "idle_since",
        "keep_alive",
        "loop",
        "origin",
        "parser",
        "pool",
        "response",
        "transport",
    )

    def __init__(self, pool: UpstreamClient, origin: Origin, loop: asyncio.AbstractEventLoop):
        self.pool = pool
        self.origin = origin
        self.loop = loop
        self.parser = httptools.HttpResponseParser(self)
        self.transport: asyncio.Transport | None = None
        self.response: Response | None = None
        self.keep_alive = False  # the last response left the connection open for another
        self.idle_since = 0.0
        self.closed = False
        self._paused = False
        self._until_close = False  # the body ends when the connection does

    def send(self, head: bytes, body: bytes, silence: float) -> Response:
        assert self.transport is not None
        self.response = Response(self, silence)
        self.keep_alive = False
        self.transport.write(head + body)
        return self.response

    def finished(self) -> None:
        """The response was released: back to the pool if its message ended and left the
        connection open for another (`keep_alive`, set only then), else closed."""
        self.response = None
        if self._paused:
            self.resume()
        if self.keep_alive and not self.closed:
            self.pool.idle(self)
        else:
            self.abort()

    def abort(self) -> None:
        self.closed = True
        if self.transport is not None:
            self.transport.abort()

    def pause(self) -> None:
        if not self._paused and self.transport is not None and not self.closed:
            self._paused = True
            self.transport.pause_reading()

    def resume(self) -> None:
        if self._paused and self.transport is not None and not self.closed:
            self._paused = False
            self.transport.resume_reading()

    # asyncio's side

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def data_received(self, data: bytes) -> None:
        if self.response is None:  # nothing was asked: an idle connection the server spoke on
            self.abort()
            return
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserUpgrade:
            self._broken(UpstreamError("the upstream switched protocols"))
        except httptools.HttpParserError as exc:
            cause = exc.__context__
            error = cause if isinstance(cause, UpstreamError) else None
            self._broken(error or UpstreamError(f"the upstream broke HTTP/1.1: {exc}"))

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        self.pool.forget(self)
        response = self.response
        if response is None or response._done:
            return
        if response._head and self._until_close:
            response._ended()
        else:
            reason = f": {exc}" if exc else ""
            response._fail(UpstreamError(f"the upstream closed the connection mid-reply{reason}"))

    # httptools' callbacks

    def on_message_begin(self) -> None:
        if self.response is None or self.response._done:  # only one response per request
            raise UpstreamError("the upstream sent a response nobody asked for")

    def on_header(self, name: bytes, value: bytes) -> None:
        assert self.response is not None
        self.response.fields.append((name, value))

    def on_headers_complete(self) -> None:
        assert self.response is not None
        status = self.parser.get_status_code()
        if status < 200:  # informational (103 Early Hints): the response proper follows
            self.response.fields.clear()
            return
        chunked, length, encoding = framing(self.response.fields)
        self._until_close = not chunked and not length
        self.response._started(status, encoding)

    def on_body(self, body: bytes) -> None:
        assert self.response is not None
        self.response._feed(body)

    def on_message_complete(self) -> None:
        assert self.response is not None
        if self.response._head:  # else an informational response ended
            self.keep_alive = self.parser.should_keep_alive()
            self.response._ended()

    def _broken(self, error: UpstreamError) -> None:
        if self.response is not None:
            self.response._fail(error)
        self.abort()


class UpstreamClient:
    """One provider's connections and its two bounds: `connect_timeout` to open one (TCP and
    TLS), `silence` for each wait on the upstream once the request is sent."""

    def __init__(self, connect_timeout: float, silence: float, tls: bool) -> None:
        self.connect_timeout = connect_timeout
        self.silence = silence
        self._tls = ssl.create_default_context() if tls else None
        if self._tls is not None:
            self._tls.set_alpn_protocols(["http/1.1"])
        self._idle: dict[Origin, list[Connection]] = {}
        self._open: set[Connection] = set()
        self._sweep: asyncio.TimerHandle | None = None

    async def post(self, url: str, body: bytes, headers: Mapping[str, str]) -> Response:
        """Send the POST and wait for the response's head; the response holds the connection
        until it is released. Raises UpstreamError."""
        origin, target, authority = split(url)
        connection = self._take(origin) or await self._connect(origin)
        lines = [REQUEST_HEAD.format(target, authority, len(body))]
        lines += [f"{name}: {value}\r\n" for name, value in headers.items()]
        lines.append("\r\n")
        response = connection.send("".join(lines).encode(), body, self.silence)
        try:
            await response._wait_head()
        except BaseException:
            response.release()  # cancelled or failed before the head: never reused
            raise
        return response

    async def close(self) -> None:
        for connection in list(self._open):
            connection.abort()
        self._idle.clear()
        if self._sweep is not None:
            self._sweep.cancel()
            self._sweep = None

    def idle(self, connection: Connection) -> None:
        connection.idle_since = connection.loop.time()
        self._idle.setdefault(connection.origin, []).append(connection)
        if self._sweep is None:
            self._sweep = connection.loop.call_later(KEEPALIVE_SECONDS, self._expire)

    def forget(self, connection: Connection) -> None:
        """A connection closed (by either side): it is no longer open, nor idle."""
        self._open.discard(connection)
        idle = self._idle.get(connection.origin)
        if idle and connection in idle:
            idle.remove(connection)

    def _take(self, origin: Origin) -> Connection | None:
        """The most recently used idle connection to `origin` still open and fresh."""
        idle = self._idle.get(origin)
        while idle:
            connection = idle.pop()
            if connection.closed or connection.transport is None:
                continue
            if connection.transport.is_closing():
                connection.abort()
                continue
            if connection.loop.time() - connection.idle_since < KEEPALIVE_SECONDS:
                return connection
            connection.abort()
        return None

    async def _connect(self, origin: Origin) -> Connection:
        loop = asyncio.get_running_loop()
        try:
            async with asyncio.timeout(self.connect_timeout):
                _, connection = await loop.create_connection(
                    lambda: Connection(self, origin, loop),
                    origin.host,
                    origin.port,
                    ssl=self._tls if origin.tls else None,
                    server_hostname=origin.host if origin.tls else None,
                )
        except TimeoutError:
            raise UpstreamError(
                f"no connection to {origin.host}:{origin.port} within "
                f"{self.connect_timeout:g} s (connect_timeout_seconds)"
            ) from None
        except OSError as exc:  # refused, unresolved, a certificate that fails its check
            raise UpstreamError(f"cannot connect to {origin.host}:{origin.port}: {exc}") from exc
        self._open.add(connection)
        return connection

    def _expire(self) -> None:
        """Close the connections idle past KEEPALIVE_SECONDS; come back for the rest."""
        self._sweep = None
        now = asyncio.get_running_loop().time()
        oldest: float | None = None
        for idle in self._idle.values():
            for connection in list(idle):
                if now - connection.idle_since >= KEEPALIVE_SECONDS:
                    idle.remove(connection)
                    connection.abort()
                elif oldest is None or connection.idle_since < oldest:
                    oldest = connection.idle_since
        if oldest is not None:
            self._sweep = asyncio.get_running_loop().call_at(
                oldest + KEEPALIVE_SECONDS, self._expire
            )

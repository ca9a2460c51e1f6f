"""The API port's HTTP/1.1 connections: httptools' parser, one ASGI call per request, bounded.

uvicorn.Server still owns the listening sockets, the set of connections and the
graceful stop (serving.py); this is the protocol it makes for each connection,
and gateway/http_request.py each request's call. It was uvicorn's httptools
protocol with its hooks overridden; owning it costs less per request and per
open stream (BENCHMARKS.md, "llmsvc's own HTTP/1.1 protocol") and leans on no
private code. What the daemon adds to HTTP/1.1 here:

- bounds, each answered in words (gateway/errors.py renders them) before the
  connection closes: the request head's size (httptools would buffer any),
  the head's and the body's arrival times, the open connections (past them
  clients would get resets);
- a client that half-closed after its requests still gets their answers.

A connection lives as long as its stream, thousands at once, so it and its
request keep their fields in slots and make no event, queue or timer they
do not need.
"""

from __future__ import annotations

import asyncio
import functools
import resource
import urllib.parse
import uuid
from collections.abc import Callable, MutableMapping
from dataclasses import dataclass
from typing import Any, ClassVar

import httptools
from httptools import HttpParserCallbackError, HttpParserError, HttpParserUpgrade

from llmsvc.errors import (
    ClientError,
    HeaderTooLarge,
    LlmsvcError,
    RequestTimeout,
    ServiceUnavailable,
    UriTooLong,
)
from llmsvc.gateway.errors import api_of, closing_response, describe
from llmsvc.gateway.http_request import CONNECTION, Request
from llmsvc.gateway.ids import new_id
from llmsvc.gateway.rejections import log_rejection
from llmsvc.gateway.request import CALLER, request_id
from llmsvc.timers import Timer, timers

RESERVED_DESCRIPTORS = 128  # kept from clients: the WAL, the database pool, jobs, logs
REFUSING_MAX = 64  # connections past the bound being answered 503 at once; more are just closed
LINGER_SECONDS = 1.0  # how long an answered, closing connection's input is read and dropped
REQUEST_LINE_SLACK = 32  # the method, spaces and version around a URL
HIGH_WATER = 65_536  # request body bytes held for the app before reading pauses
ASGI = {"version": "3.0", "spec_version": "2.3"}


@dataclass(frozen=True)
class HttpLimits:
    """The bounds, from settings; `max_connections` already fitted to the descriptor limit."""

    max_header_bytes: int
    header_timeout: float
    body_timeout: float
    max_connections: int
    refused: Callable[[str], None]  # told the reason of each connection or request refused


def protocol_class(limits: HttpLimits) -> type[HttpProtocol]:
    """The class uvicorn.Server makes each connection's protocol from, carrying these limits."""

    class Bounded(HttpProtocol):
        __slots__ = ()

    Bounded.limits = limits
    Bounded.refusing = set()
    return Bounded


def descriptor_limit() -> int:
    """Raise the soft RLIMIT_NOFILE to the hard one and return it.

    The loop polls with epoll, so nothing needs descriptors below select()'s
    1024; systemd's default soft limit of 1024 would cap open streams at ~450.
    """
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft != hard:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
            soft = hard
        except (ValueError, OSError):  # an infinite hard limit the kernel caps lower
            pass
    return soft


def connection_bound(wanted: int, descriptors: int) -> int:
    """`max_connections`, lowered so the bound can never exhaust the descriptors.

    Each connection may hold one upstream connection too; the refusals in
    flight and RESERVED_DESCRIPTORS come on top.
    """
    if descriptors == resource.RLIM_INFINITY:
        return wanted
    return max(1, min(wanted, (descriptors - RESERVED_DESCRIPTORS - REFUSING_MAX) // 2))


def not_http(exc: BaseException | None) -> ClientError:
    """What is wrong with a request the parser refused, in words a client can act on.

    The parser's reason (llhttp's, a fixed string such as "Transfer-Encoding
    can't be present with Content-Length" or "Invalid character in chunk size",
    never the client's bytes) is the exception's. A callback's failure names
    our code, not the request: left out, unless it is a refusal of the
    request's own (a ClientError, such as a missing Host), which is the answer.
    """
    if isinstance(exc, HttpParserCallbackError) and isinstance(exc.__context__, ClientError):
        return exc.__context__
    reason = "the request is not valid HTTP/1.1"
    if isinstance(exc, HttpParserError) and not isinstance(exc, HttpParserCallbackError):
        return ClientError(f"{reason}: {exc}")
    return ClientError(reason)


class HttpProtocol(asyncio.Protocol):
    """One connection; its class carries the server's limits and its refusals in flight.

    Made by uvicorn.Server with its config and state: `server_state.connections` is the
    set its graceful stop waits on, `server_state.tasks` its apps' tasks.
    """

    __slots__ = (
        "_head_bytes",
        "_idle",
        "_in_body",
        "_in_message",
        "_timer",
        "_upgrade_body",
        "app",
        "client",
        "connections",
        "continue_wanted",
        "drained",
        "headers",
        "hosts",
        "keepalive_timeout",
        "lingering",
        "loop",
        "parser",
        "queued",
        "read_paused",
        "request",
        "scheme",
        "server",
        "server_state",
        "serving",
        "tasks",
        "transport",
        "url",
        "write_paused",
    )

    limits: ClassVar[HttpLimits]
    refusing: ClassVar[set[HttpProtocol]]

    def __init__(
        self,
        config: Any,  # uvicorn.Config
        server_state: Any,  # uvicorn.server.ServerState
        app_state: dict[str, Any],
        _loop: asyncio.AbstractEventLoop | None = None,
    ) -> None:
        if not config.loaded:
            config.load()
        self.app = config.loaded_app
        self.loop = _loop or asyncio.get_running_loop()
        self.keepalive_timeout: float = config.timeout_keep_alive
        self.server_state = server_state
        self.connections: set[HttpProtocol] = server_state.connections
        self.tasks: set[asyncio.Future[None]] = server_state.tasks
        self.parser: httptools.HttpRequestParser | None = None  # see _feed
        self.transport: asyncio.Transport = None  # type: ignore[assignment]  # connection_made
        self.server: tuple[str, int] | None = None
        self.client: tuple[str, int] | None = None
        self.scheme = "http"
        self.url = b""  # the request line's target, as it arrives
        self.headers: list[tuple[bytes, bytes]] = []
        self.hosts = 0  # the request's Host fields: RFC 9112, 3.2 asks for exactly one
        self.continue_wanted = False
        self.request: Request | None = None  # the newest request whose head is whole
        self.serving: Request | None = None  # the request whose app runs
        self.queued: list[Request] = []  # pipelined, oldest first, waiting for `serving`
        self.read_paused = False
        self.write_paused = False
        self.drained: asyncio.Future[None] | None = None  # a send waiting for the client
        self._head_bytes = 0  # bytes of the request head being received
        self._in_message = False  # between a request's first byte and its end
        self._in_body = False  # between a request's headers and its end
        self.lingering = False  # answered and closing: whatever still arrives is dropped
        self._timer: Timer | None = None  # see _set_timer
        self._idle = False  # the timer is the keep-alive one
        # after a request with `Upgrade`: bytes of its body still to come (_upgraded_body)
        self._upgrade_body: int | None = None

    # -- connections -------------------------------------------------------------------

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        self.transport = transport
        if len(self.connections) >= self.limits.max_connections:
            self._turn_away()
            return
        self.connections.add(self)
        self.server = _listener_address(transport.get_extra_info("sockname"))
        self.client = _address(transport.get_extra_info("peername"))
        if transport.get_extra_info("sslcontext") is not None:
            self.scheme = "https"
        self._set_timer(self.limits.header_timeout, self._head_late)  # silent ones too

    def _turn_away(self) -> None:
        """Past the bound: 503 before the request is even read, then close."""
        self.lingering = True  # no request is ever parsed
        self.limits.refused("connections")
        if len(self.refusing) >= REFUSING_MAX:
            self.transport.close()  # a flood: no descriptors to spare for answers
            return
        self.refusing.add(self)
        limit = self.limits.max_connections
        self._linger(
            ServiceUnavailable(
                f"llmsvc has {limit} connections open, its limit (max_connections, kept "
                "within the descriptor limit); try again shortly"
            )
        )

    def connection_lost(self, exc: Exception | None) -> None:
        self._cancel_timer()
        self.refusing.discard(self)
        self.connections.discard(self)
        self._disconnect()
        for request in self.queued:  # never started: nothing to tell
            request.release()
        self.queued.clear()
        self.resume_writing()  # a waiting send returns, dropped
        if exc is None:
            self.transport.close()
        # each refers back here: let a closed connection go without the cyclic collector
        self.parser = self.request = self.serving = None

    def eof_received(self) -> bool:
        """A client that half-closed after its requests (`nc -N`) still gets their answers.

        The write side stays open until they are sent, then the connection
        closes. A request still unfinished when the input ends is dropped.
        """
        serving = self.serving
        if serving is None or serving.complete or self.lingering:
            return False  # nothing to answer
        if self._in_body and self.request is serving:
            return False  # its body can never arrive: its app hears http.disconnect
        unfinished = self._in_body or self._head_bytes
        newest = self.request
        (serving if unfinished or newest is None else newest).keep_alive = False
        return True

    def shutdown(self) -> None:
        """uvicorn.Server's graceful stop: close an idle connection, else after its answer."""
        newest = self.request
        if newest is None or newest.complete:
            self.transport.close()
        else:
            newest.keep_alive = False

    # -- reading -----------------------------------------------------------------------

    def data_received(self, data: bytes) -> None:
        if self._upgrade_body is not None:
            self._upgraded_body(data)
        elif self._in_body:
            self._feed(data)
        elif not self.lingering:
            self._head_received(data)

    def _head_received(self, data: bytes) -> None:
        """Feed the head only up to max_header_bytes: httptools buffers it all otherwise.

        Bytes of a pipelined head that arrive in one read with the end of the
        request before it are not counted: at most one read more.
        """
        if self._idle:  # a kept-alive connection's next request begins
            self._cancel_timer()
        room = self.limits.max_header_bytes - self._head_bytes
        head, rest = data[:room], data[room:]
        self._head_bytes += len(head)
        self._feed(head)
        if self.lingering or self.transport.is_closing():  # e.g. a 400 for bad syntax
            return
        if self._head_bytes >= self.limits.max_header_bytes:
            self._refuse_head()
        elif rest:
            self.data_received(rest)
        elif self._head_bytes and self._timer is None and not self._busy():
            self._set_timer(self.limits.header_timeout, self._head_late)

    def _feed(self, data: bytes) -> None:
        """Parse `data`, with a parser made for it if the connection has none.

        Between requests a parser holds nothing, so one serving a request (an open
        stream, for minutes) is let go, 0.9 KB; making one takes 0.2 us.
        """
        parser = self.parser
        if parser is None:
            parser = self.parser = httptools.HttpRequestParser(self)
            # answer a request even when bytes that cannot be parsed follow it (pipelined)
            parser.set_dangerous_leniencies(lenient_data_after_close=True)
        try:
            parser.feed_data(data)
            if not self._in_message and self._busy():
                self.parser = None
        except HttpParserUpgrade as exc:  # what follows the request's head is not parsed
            self._upgraded_body(data[exc.args[0] :] if exc.args else b"")
        except HttpParserError as exc:
            serving = self.serving
            midway = serving is not None and serving.started and not serving.complete
            # none in the middle of another response, which it would corrupt
            self._linger(None if midway else not_http(exc))

    def _upgraded_body(self, data: bytes) -> None:
        """The body of a request with `Upgrade` (curl's `--http2` on http://), by its
        content-length: llhttp stops at such a request's head, and with no protocol to
        switch to, it is answered as plain HTTP (RFC 9110, 7.8), then the connection
        closes. Nothing after the body is read, nor anything once the answer is lingering."""
        if not self._upgrade_body or self.lingering:
            return
        body = data[: self._upgrade_body]
        self._upgrade_body -= len(body)
        if body:
            self.on_body(body)
        if not self._upgrade_body:
            self.on_message_complete()

    def _refuse_head(self) -> None:
        limit = self.limits.max_header_bytes
        if len(self.url) + REQUEST_LINE_SLACK >= self._head_bytes:
            self.limits.refused("uri_too_long")
            self._linger(UriTooLong(f"the request line is over max_header_bytes={limit}"))
        else:
            self.limits.refused("header_too_large")
            self._linger(HeaderTooLarge(f"the request's headers are over max_header_bytes={limit}"))

    def _head_late(self) -> None:
        self._timer = None
        if self._idle:  # kept alive, and no next request began: closed without a word
            self._idle = False
            self.transport.close()
            return
        self.limits.refused("header_timeout")
        if not self._head_bytes:
            self.transport.close()  # not a byte of a request: nothing to answer
            return
        setting = f"request_header_timeout_seconds={self.limits.header_timeout:g}"
        self._linger(RequestTimeout(f"the request's head did not arrive within {setting}"))

    # -- httptools' callbacks ----------------------------------------------------------

    def on_message_begin(self) -> None:
        self._in_message = True
        self.url = b""
        self.headers = []
        self.hosts = 0
        self.continue_wanted = False

    def on_url(self, url: bytes) -> None:
        self.url += url

    def on_header(self, name: bytes, value: bytes) -> None:
        name = name.lower()
        if name == b"expect" and value.lower() == b"100-continue":
            self.continue_wanted = True
        elif name == b"host":
            self.hosts += 1
        self.headers.append((name, value))

    def on_headers_complete(self) -> None:
        self._head_bytes, self._in_body = 0, True
        self._cancel_timer()
        parser = self.parser
        assert parser is not None  # called back from it
        version = parser.get_http_version()
        if self.hosts > 1 or (self.hosts == 0 and version == "1.1"):
            # RFC 9112, 3.2: a server MUST refuse it (two could name two different origins)
            raise ClientError(
                f"a request has one Host header (HTTP/1.0: at most one); it has {self.hosts}"
            )
        url = httptools.parse_url(self.url)
        raw_path = url.path
        path = raw_path.decode("ascii")
        extensions: dict[str, object] = {}
        scope = {  # made whole at once: a dict grown key by key is resized, and kept bigger
            "type": "http",
            "asgi": ASGI,
            "http_version": version,
            "server": self.server,
            "client": self.client,
            "scheme": self.scheme,
            "root_path": "",
            "method": parser.get_method().decode("ascii"),
            "path": urllib.parse.unquote(path) if "%" in path else path,
            "raw_path": raw_path,
            "query_string": url.query or b"",
            "headers": self.headers,
            "extensions": extensions,
        }
        # no protocol to switch to: an Upgrade request is the connection's last
        upgrade = parser.should_upgrade()
        keep_alive = version != "1.0" and parser.should_keep_alive() and not upgrade
        if upgrade:
            self._upgrade_body = _content_length(self.headers)
        self.headers = []  # the scope's now, which the app may drop (a stream lasts minutes)
        request = Request(self, scope, keep_alive, self.continue_wanted)
        extensions[CONNECTION] = request
        self.request = request
        if self._busy():
            self.pause_reading()  # pipelined: its turn comes when the one before is answered
            self.queued.append(request)
        else:
            self._start(request)

    def on_body(self, body: bytes) -> None:
        request = self.request
        if request is None or request.complete:  # answered already (a 413): dropped
            return
        request.body += body
        if len(request.body) > HIGH_WATER:
            self.pause_reading()
        request.wake()

    def on_message_complete(self) -> None:
        if self._upgrade_body:  # llhttp ends an Upgrade request at its head: not yet
            return
        self._in_message = self._in_body = False
        self._cancel_timer()
        request = self.request
        if request is None or request.complete:
            return
        request.more_body = False
        request.wake()

    # -- the app, and the response -----------------------------------------------------

    def _start(self, request: Request) -> None:
        self.serving = request
        if self._in_body and request is self.request:  # its body is still to come
            self._set_timer(self.limits.body_timeout, self._body_late)
        self.tasks.add(request.run(self.app))

    def response_complete(self, request: Request) -> None:
        self.server_state.total_requests += 1
        if not request.keep_alive:
            self.transport.close()
            return
        if self.transport.is_closing():
            return
        self.resume_reading()
        if self.queued:
            self._start(self.queued.pop(0))
        elif self._head_bytes:  # the next request's head began during this one: from now
            self._set_timer(self.limits.header_timeout, self._head_late)
        else:
            self._set_timer(self.keepalive_timeout, self._head_late)
            self._idle = True

    def _body_late(self) -> None:
        self._timer = None
        self.limits.refused("body_timeout")
        request = self.request
        if request is None or request.started:  # answered already (a 413): not awaited
            self._linger(None)
            return
        setting = f"request_body_timeout_seconds={self.limits.body_timeout:g}"
        self._linger(
            RequestTimeout(f"the request body did not arrive within {setting}"), request.scope
        )

    # -- flow --------------------------------------------------------------------------

    def pause_reading(self) -> None:
        if not self.read_paused:
            self.read_paused = True
            self.transport.pause_reading()

    def resume_reading(self) -> None:
        if self.read_paused:
            self.read_paused = False
            self.transport.resume_reading()

    def pause_writing(self) -> None:
        self.write_paused = True

    def resume_writing(self) -> None:
        self.write_paused = False
        if self.drained is not None and not self.drained.done():
            self.drained.set_result(None)

    async def drain(self) -> None:
        """Wait until the client reads again (or the connection is gone)."""
        if self.drained is None or self.drained.done():
            self.drained = self.loop.create_future()
        await self.drained

    # -- closing -----------------------------------------------------------------------

    def _linger(
        self, exc: LlmsvcError | None, scope: MutableMapping[str, Any] | None = None
    ) -> None:
        """Answer `exc` (if any) and close, reading and dropping input for LINGER_SECONDS.

        `scope` is the request's when its app has it (its id, method and path); a request
        refused before its head was whole has only its URL so far and a fresh id. Closing
        with unread input resets the connection, and the client may lose the answer with it.
        """
        self.lingering, self._in_body = True, False
        self._disconnect()
        if self.transport.is_closing():
            return
        if exc is not None:
            rid = request_id(scope) if scope is not None else new_id()
            path = self._log_rejection(exc, rid, scope)
            self.transport.write(closing_response(exc, rid, api_of(path)))
        self.transport.write_eof()
        self.resume_reading()  # reading may be paused (a pipelined request)
        self._set_timer(LINGER_SECONDS, self.transport.close)

    def _disconnect(self) -> None:
        """The requests begun here hear http.disconnect; whatever they send is dropped."""
        for request in (self.serving, self.request):
            if request is not None and not request.complete:
                request.disconnected = True
                request.wake()

    def _log_rejection(
        self, exc: LlmsvcError, request: uuid.UUID, scope: MutableMapping[str, Any] | None
    ) -> str:
        """Log the refusal; return the request's path (what the answer's shape depends on)."""
        status, error = describe(exc)
        if scope is not None:
            method, path, caller = scope.get("method", ""), scope.get("path", ""), scope.get(CALLER)
        else:
            # the URL's path only: a query string may carry what no log should
            method, path, caller = "", self.url.partition(b"?")[0].decode("latin-1"), None
        log_rejection(method, path, status, error["code"], error["message"], request, caller)
        return str(path)

    def closed(self) -> bool:
        """The client will get nothing more here: the connection is closing, or was refused."""
        return self.lingering or self.transport.is_closing()

    def _busy(self) -> bool:
        return self.serving is not None and not self.serving.complete

    def _set_timer(self, seconds: float, callback: Callable[[], None]) -> None:
        """The connection's one timer: the head's, the body's, the keep-alive's or the linger's;
        one of the loop's shared ones (llmsvc/timers.py): an idle connection keeps it."""
        self._cancel_timer()
        loop = self.loop
        self._timer = timers(loop).call_at(loop.time() + seconds, callback)

    def _cancel_timer(self) -> None:
        self._idle = False
        if self._timer is not None:
            timers(self.loop).cancel(self._timer)
            self._timer = None


def _content_length(headers: list[tuple[bytes, bytes]]) -> int:
    """A request's content-length (llhttp has checked its form), 0 if it has none."""
    for name, value in headers:
        if name == b"content-length":
            return int(value)
    return 0


def _address(name: Any) -> tuple[str, int] | None:
    """A socket's (host, port), as ASGI's scope has it (IPv6 names have four parts)."""
    if isinstance(name, tuple) and len(name) >= 2:
        return name if len(name) == 2 else name[:2]
    return None


# A listener's connections share its address: one tuple, not one per connection (a stream
# keeps its connection for minutes). Keyed by the socket's name, so a few entries at most.
_listener_address = functools.lru_cache(maxsize=16)(_address)

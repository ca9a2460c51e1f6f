"""uvicorn's httptools protocol, bounded: head size, arrival timeouts, open connections, half-close.

uvicorn 0.54 (pinned; tests/gateway/test_http_protocol.py checks the hooks used here)
lets httptools buffer a request's head without a cap (a 64 MiB header cost
seconds of CPU and up to 123 MiB), waits forever for a request that arrives
slowly or never, accepts connections until the descriptors run out (then
clients get resets), and closes a connection whose client half-closed before
answering it. Here each bound answers the client past it in words
(gateway/errors.py renders them) and closes. Only the head path pays for it: a
body read costs one flag test, and response writes (the per-token path) are
uvicorn's own.

A connection lives as long as its stream, thousands at once, so it is kept
lean: this class's own fields are slots (past 29 fields an instance's dict
stops sharing its keys and grows from 296 to 1,584 bytes), and uvicorn's two
events and its pipeline queue are http_lean.py's.
"""

from __future__ import annotations

import asyncio
import functools
import resource
import sys
import uuid
from collections.abc import Callable, Mapping, MutableMapping
from dataclasses import dataclass
from typing import Any, ClassVar, cast

from httptools import HttpParserCallbackError, HttpParserError
from uvicorn._types import ASGI3Application
from uvicorn.protocols.http.httptools_impl import (
    STATUS_LINE,
    HttpToolsProtocol,
    RequestResponseCycle,
)

from llmsvc.errors import (
    ClientError,
    HeaderTooLarge,
    LlmsvcError,
    RequestTimeout,
    ServiceUnavailable,
    UriTooLong,
)
from llmsvc.gateway.errors import api_of, closing_response, describe
from llmsvc.gateway.http_lean import LeanEvent, Pipeline
from llmsvc.gateway.ids import new_id
from llmsvc.gateway.rejections import log_rejection
from llmsvc.gateway.request import CALLER, request_id

# scope["extensions"] key: {"closed": () -> bool, "write": (bytes) -> bool,
# "reply": (status, headers, body, more) -> bool | None}
CONNECTION = "llmsvc.connection"
RESERVED_DESCRIPTORS = 128  # kept from clients: the WAL, the database pool, jobs, logs
REFUSING_MAX = 64  # connections past the bound being answered 503 at once; more are just closed
LINGER_SECONDS = 1.0  # how long an answered, closing connection's input is read and dropped
REQUEST_LINE_SLACK = 32  # the method, spaces and version around a URL


@dataclass(frozen=True)
class HttpLimits:
    """The bounds, from settings; `max_connections` already fitted to the descriptor limit."""

    max_header_bytes: int
    header_timeout: float
    body_timeout: float
    max_connections: int
    refused: Callable[[str], None]  # told the reason of each connection or request refused


def protocol_class(limits: HttpLimits) -> type[BoundedHttpProtocol]:
    """The class uvicorn makes each connection's protocol from, carrying this server's limits."""

    class Bounded(BoundedHttpProtocol):
        pass

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


def not_http(exc: BaseException | None) -> str:
    """What is wrong with a request the parser refused, in words a client can act on.

    uvicorn calls `send_400_response` from its `except HttpParserError` and passes
    only a fixed message; the parser's reason (llhttp's, a fixed string such as
    "Transfer-Encoding can't be present with Content-Length" or "Invalid
    character in chunk size", never the client's bytes) is the exception's.
    A callback's failure names uvicorn's code, not the request: left out.
    """
    reason = "the request is not valid HTTP/1.1"
    if isinstance(exc, HttpParserError) and not isinstance(exc, HttpParserCallbackError):
        return f"{reason}: {exc}"
    return reason


def closed_check(scope: Mapping[str, Any]) -> Callable[[], bool]:
    """Whether the request's connection is known closed, asked synchronously.

    ASGI's http.disconnect arrives loop iterations after a write found the
    connection gone; this answers at once, with no task per stream to wait on
    receive(). A stream asks it at each batch (chat.Exchange). Under another
    server it says never, and a stream runs to its end.
    """
    extension = (scope.get("extensions") or {}).get(CONNECTION) or {}
    check: Callable[[], bool] | None = extension.get("closed")
    return check if check is not None else _never


def _never() -> bool:
    return False


def body_writer(scope: Mapping[str, Any]) -> Callable[[bytes], bool]:
    """Write a streamed response's next piece of body at once, from any callback, or say it
    cannot (False: the client is not reading, the connection is closing, the body is not
    chunked); the caller then sends it by ASGI's `send`, which waits for the client.

    It is what uvicorn's `send` does for such a piece, without a coroutine: a stream's
    tokens are written from the upstream connection's callback (chat.Exchange's pump).
    Under another server it always says it cannot.
    """
    extension = (scope.get("extensions") or {}).get(CONNECTION) or {}
    write: Callable[[bytes], bool] | None = extension.get("write")
    return write if write is not None else _cannot


def _cannot(body: bytes) -> bool:
    return False


# (status, headers, body, more): see reply_writer
ReplyWriter = Callable[[int, list[tuple[bytes, bytes]], bytes, bool], bool | None]
CHUNKED = (b"transfer-encoding", b"chunked")


def reply_writer(scope: Mapping[str, Any]) -> ReplyWriter:
    """Write a response's head with its first body at once in one write(2): the whole body
    (`more` False; its content-length among the headers), or a streamed body's first chunk
    (`more` True, never empty: that chunk would end the body; the rest goes by `body_writer`
    or `send`). Say whether the connection took it (False: the write found the client gone),
    or that it cannot (None: it was begun, the client is not reading, the connection is
    closing), and the caller sends it by ASGI's `send`.

    uvicorn's `send` writes the head and the body apart, each a syscall that wakes the
    client (BENCHMARKS.md, "CPU per request"). Under another server it always says it cannot.
    """
    extension = (scope.get("extensions") or {}).get(CONNECTION) or {}
    write: ReplyWriter | None = extension.get("reply")
    return write if write is not None else _cannot_reply


def _cannot_reply(status: int, headers: list[tuple[bytes, bytes]], body: bytes, more: bool) -> None:
    return None


def response_bytes(status: int, headers: list[tuple[bytes, bytes]], body: bytes) -> bytes:
    """A response's head and `body` as uvicorn's `send` writes them for its start and first
    body on a connection kept alive; the headers are given lower-case, as valid names and
    values, and `body` as encoded (a chunk of a chunked body with its framing)."""
    content = [STATUS_LINE[status]]
    for name, value in headers:
        content += (name, b": ", value, b"\r\n")
    content += (b"\r\n", body)
    return b"".join(content)


class BoundedHttpProtocol(HttpToolsProtocol):
    """One connection; its class carries the server's limits and its refusals in flight."""

    __slots__ = ("_head_bytes", "_in_body", "_lingering", "_serving", "_timer")

    limits: ClassVar[HttpLimits]
    refusing: ClassVar[set[BoundedHttpProtocol]]

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.pipeline = Pipeline()  # type: ignore[assignment]  # uvicorn's use of it, in less
        self.url = b""  # uvicorn sets it at each request's start; a 414 may need it sooner
        self._head_bytes = 0  # bytes of the request head being received
        self._in_body = False  # between a request's headers and its end
        self._lingering = False  # answered and closing: whatever still arrives is dropped
        self._serving: RequestResponseCycle | None = None  # the request whose app runs
        self._timer: asyncio.TimerHandle | None = None  # see _set_timer

    # -- connections -------------------------------------------------------------------

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        if len(self.connections) >= self.limits.max_connections:
            self._turn_away(transport)
            return
        super().connection_made(transport)
        self.flow._is_writable_event = LeanEvent(True)  # type: ignore[assignment]  # writable
        self._set_timer(self.limits.header_timeout, self._head_late)  # silent ones too

    def _turn_away(self, transport: asyncio.Transport) -> None:
        """Past the bound: 503 before the request is even read, then close."""
        self.transport, self._lingering = transport, True  # no request is ever parsed
        self.limits.refused("connections")
        if len(self.refusing) >= REFUSING_MAX:
            transport.close()  # a flood: no descriptors to spare for answers
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
        serving = self._serving
        if serving is not None and not serving.response_complete:
            # uvicorn tells only the newest request; with pipelining the one served is older
            serving.disconnected = True
            serving.message_event.set()
        super().connection_lost(exc)

    def eof_received(self) -> bool:  # type: ignore[override]
        """A client that half-closed after its requests (`nc -N`) still gets their answers.

        The write side stays open until they are sent, then the connection
        closes. A request still unfinished when the input ends is dropped.
        """
        serving = self._serving
        if serving is None or serving.response_complete or self._lingering:
            return False  # nothing to answer
        if self._in_body and self.cycle is serving:
            return False  # its body can never arrive: its app hears http.disconnect
        unfinished = self._in_body or self._head_bytes
        (serving if unfinished else self.cycle).keep_alive = False
        return True

    # -- the request head --------------------------------------------------------------

    def data_received(self, data: bytes) -> None:
        if self._in_body:
            super().data_received(data)
        elif not self._lingering:
            self._head_received(data)

    def _head_received(self, data: bytes) -> None:
        """Feed the head only up to max_header_bytes: httptools buffers it all otherwise.

        Bytes of a pipelined head that arrive in one read with the end of the
        request before it are not counted: at most one read more.
        """
        room = self.limits.max_header_bytes - self._head_bytes
        head, rest = data[:room], data[room:]
        self._head_bytes += len(head)
        super().data_received(head)
        if self._lingering or self.transport.is_closing():  # e.g. uvicorn's 400 for bad syntax
            return
        if self._head_bytes >= self.limits.max_header_bytes:
            self._refuse_head()
        elif rest:
            self.data_received(rest)
        elif self._head_bytes and self._timer is None and not self._busy():
            self._set_timer(self.limits.header_timeout, self._head_late)

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
        self.limits.refused("header_timeout")
        if not self._head_bytes:
            self.transport.close()  # not a byte of a request: nothing to answer
            return
        setting = f"request_header_timeout_seconds={self.limits.header_timeout:g}"
        self._linger(RequestTimeout(f"the request's head did not arrive within {setting}"))

    def on_message_begin(self) -> None:
        super().on_message_begin()
        extension: dict[object, object] = {"closed": self._closed, "reply": self._write_reply}
        self.scope["extensions"] = {CONNECTION: extension}

    def on_headers_complete(self) -> None:
        self._head_bytes, self._in_body = 0, True
        self._cancel_timer()
        super().on_headers_complete()

    # -- the request body and the response ---------------------------------------------

    def _start_asgi_task(self, cycle: RequestResponseCycle, app: ASGI3Application) -> None:
        # Its app has not run yet, so nothing waits on the event: only its state carries over.
        cycle.message_event = LeanEvent(cycle.message_event.is_set())  # type: ignore[assignment]
        self._serving = cycle
        extension = cycle.scope["extensions"][CONNECTION]
        extension["write"] = functools.partial(self._write_body, cycle)
        if self._in_body and cycle is self.cycle:  # its body is still to come
            self._set_timer(self.limits.body_timeout, self._body_late)
        super()._start_asgi_task(cycle, app)

    def on_message_complete(self) -> None:
        self._in_body = False
        self._cancel_timer()
        super().on_message_complete()

    def _body_late(self) -> None:
        self._timer = None
        self.limits.refused("body_timeout")
        if self.cycle.response_started:  # answered already (a 413): the rest is not awaited
            self._linger(None)
            return
        setting = f"request_body_timeout_seconds={self.limits.body_timeout:g}"
        scope = cast(MutableMapping[str, Any], self.cycle.scope)  # as the app has it
        self._linger(RequestTimeout(f"the request body did not arrive within {setting}"), scope)

    def on_response_complete(self) -> None:
        super().on_response_complete()
        if self._head_bytes and not self._busy() and not self.transport.is_closing():
            # the next request's head began during this response: its time runs from now
            self._unset_keepalive_if_required()
            self._set_timer(self.limits.header_timeout, self._head_late)

    def send_400_response(self, msg: str) -> None:
        """uvicorn's answer to bytes that are not HTTP/1.1 (it has logged them), in JSON with a
        request id like every other, and lingering rather than resetting the client; none
        in the middle of another response, which it would corrupt."""
        serving = self._serving
        midway = serving is not None and serving.response_started and not serving.response_complete
        self._linger(None if midway else ClientError(not_http(sys.exception())))

    # -- closing -----------------------------------------------------------------------

    def _linger(
        self, exc: LlmsvcError | None, scope: MutableMapping[str, Any] | None = None
    ) -> None:
        """Answer `exc` (if any) and close, reading and dropping input for LINGER_SECONDS.

        `scope` is the request's when its app has it (its id, method and path); a request
        refused before its head was whole has only its URL so far and a fresh id. Closing
        with unread input resets the connection, and the client may lose the answer with it.
        """
        self._lingering, self._in_body = True, False
        serving = self._serving
        if serving is not None and not serving.response_complete:
            serving.disconnected = True  # its app hears http.disconnect; its sends are dropped
            serving.message_event.set()
        if self.transport.is_closing():
            return
        if exc is not None:
            request = request_id(scope) if scope is not None else new_id()
            path = self._log_rejection(exc, request, scope)
            self.transport.write(closing_response(exc, request, api_of(path)))
        self.transport.write_eof()
        if self.flow is not None:  # uvicorn may have paused reading (a pipelined request)
            self.flow.resume_reading()
        self._set_timer(LINGER_SECONDS, self.transport.close)

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

    def _write_body(self, cycle: RequestResponseCycle, body: bytes) -> bool:
        """`body_writer`'s write: uvicorn's chunk of a started chunked body, when its `send`
        would write it without waiting."""
        if (
            cycle.chunked_encoding is not True
            or cycle.response_complete
            or cycle.disconnected
            or cycle.flow.write_paused
            or self._lingering
        ):
            return False
        self.transport.write(b"%x\r\n%b\r\n" % (len(body), body))
        return True

    def _write_reply(
        self, status: int, headers: list[tuple[bytes, bytes]], body: bytes, more: bool
    ) -> bool | None:
        """`reply_writer`'s write: what uvicorn's `send` does for a start and a first body, in
        one write, for the request whose app runs (with pipelining, the oldest unanswered).

        Not on a connection that closes after it: a client that half-closed may have gone,
        and only a second write finds out (the first one's reset answers it).
        """
        cycle = self._serving
        if (
            cycle is None
            or cycle.response_started
            or not cycle.keep_alive
            or cycle.disconnected
            or cycle.flow.write_paused
            or self._lingering
        ):
            return None
        cycle.response_started = True
        cycle.waiting_for_100_continue = False
        head = cycle.default_headers + headers
        if more:
            cycle.chunked_encoding = True
            head.append(CHUNKED)
            body = b"%x\r\n%b\r\n" % (len(body), body)
        else:
            cycle.response_complete = True
        self.transport.write(response_bytes(status, head, body))
        taken = not self.transport.is_closing()
        if not more:
            cycle.message_event.set()
            cycle.on_response()
        return taken

    def _closed(self) -> bool:
        """The client will get nothing more here: the connection is closing, or was refused."""
        return self._lingering or self.transport.is_closing()

    def _busy(self) -> bool:
        return self._serving is not None and not self._serving.response_complete

    def _set_timer(self, seconds: float, callback: Callable[[], None]) -> None:
        """The connection's one timer: the head's, the body's or the linger's."""
        self._cancel_timer()
        self._timer = self.loop.call_later(seconds, callback)

    def _cancel_timer(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None

"""One request's ASGI call on the API port: its body as it arrives, its response's bytes.

gateway/http_protocol.py parses a connection's requests and makes one of these per
request, in turn; this is what the app sees of it (receive, send) and what the hot
path writes through without a coroutine (closed_check, body_writer, reply_writer,
by the scope's extension).
"""

from __future__ import annotations

import asyncio
import http
import re
from collections.abc import Awaitable, Callable, Iterable, Mapping, MutableMapping
from typing import Any, Protocol

from llmsvc.logs import logger

log = logger(__name__)

# scope["extensions"] key: the Request, for closed_check, body_writer and reply_writer
CONNECTION = "llmsvc.connection"


def _status_line(code: int) -> bytes:
    try:
        phrase = http.HTTPStatus(code).phrase
    except ValueError:  # a status only an upstream knows, relayed: no phrase
        phrase = ""
    return f"HTTP/1.1 {code} {phrase}\r\n".encode()


STATUS_LINE = {code: _status_line(code) for code in range(100, 600)}
# What a response header's name and value may not hold (a split response otherwise).
BAD_NAME = re.compile(b'[\x00-\x1f\x7f()<>@,;:\\[\\]={} \t\\\\"]')
BAD_VALUE = re.compile(b"[\x00-\x08\x0a-\x1f\x7f]")
CONTINUE = b"HTTP/1.1 100 Continue\r\n\r\n"
INTERNAL_ERROR = (
    b"HTTP/1.1 500 Internal Server Error\r\ncontent-type: text/plain; charset=utf-8\r\n"
    b"content-length: 21\r\nconnection: close\r\n\r\nInternal Server Error"
)


def closed_check(scope: Mapping[str, Any]) -> Callable[[], bool]:
    """Whether the request's connection is known closed, asked synchronously.

    ASGI's http.disconnect arrives loop iterations after a write found the
    connection gone; this answers at once, with no task per stream to wait on
    receive(). A stream asks it at each batch (chat.Exchange). Under another
    server it says never, and a stream runs to its end.
    """
    request = (scope.get("extensions") or {}).get(CONNECTION)
    return request.connection.closed if isinstance(request, Request) else _never


def _never() -> bool:
    return False


def body_writer(scope: Mapping[str, Any]) -> Callable[[bytes], bool]:
    """Write a streamed response's next piece of body at once, from any callback, or say it
    cannot (False: the client is not reading, the connection is closing, the body is not
    chunked); the caller then sends it by ASGI's `send`, which waits for the client.

    It is what `send` does for such a piece, without a coroutine: a stream's tokens are
    written from the upstream connection's callback (chat.Exchange's pump).
    Under another server it always says it cannot.
    """
    request = (scope.get("extensions") or {}).get(CONNECTION)
    return request.write if isinstance(request, Request) else _cannot


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

    ASGI's `send` writes the head and the body apart, each a syscall that wakes the
    client (BENCHMARKS.md, "CPU per request"). Under another server it always says it cannot.
    """
    request = (scope.get("extensions") or {}).get(CONNECTION)
    return request.reply if isinstance(request, Request) else _cannot_reply


def _cannot_reply(status: int, headers: list[tuple[bytes, bytes]], body: bytes, more: bool) -> None:
    return None


def response_bytes(status: int, headers: list[tuple[bytes, bytes]], body: bytes) -> bytes:
    """A response's head and `body` as `send` writes them for its start and first body on
    a connection kept alive; the headers are given lower-case, as valid names and
    values, and `body` as encoded (a chunk of a chunked body with its framing). Unlike
    `send`'s head, nothing here reads the headers for the framing: the caller says it."""
    content = [STATUS_LINE[status]]
    for name, value in headers:
        content += (name, b": ", value, b"\r\n")
    content += (b"\r\n", body)
    return b"".join(content)


class Connection(Protocol):
    """What a request needs of its connection (gateway/http_protocol.py's HttpProtocol)."""

    transport: asyncio.Transport
    loop: asyncio.AbstractEventLoop
    server_state: Any  # uvicorn's ServerState: its default_headers
    tasks: set[asyncio.Future[None]]  # the apps' tasks, which uvicorn's stop waits for
    serving: Request | None  # the request whose app runs
    write_paused: bool  # the client is not reading: a write now would wait in the buffer
    lingering: bool  # answered and closing: nothing more is written

    def resume_reading(self) -> None: ...

    async def drain(self) -> None: ...

    def response_complete(self, request: Request) -> None: ...

    def closed(self) -> bool: ...


class Request:
    """One request's ASGI call: its body as it arrives, its response as the app sends it."""

    __slots__ = (
        "body",
        "chunked",
        "complete",
        "connection",
        "continue_wanted",
        "disconnected",
        "fresh",
        "keep_alive",
        "more_body",
        "remaining",
        "scope",
        "started",
        "waiter",
    )

    def __init__(
        self,
        connection: Connection,
        scope: MutableMapping[str, Any],
        keep_alive: bool,
        continue_wanted: bool,
    ) -> None:
        self.connection = connection
        self.scope = scope
        self.keep_alive = keep_alive
        self.continue_wanted = continue_wanted  # `Expect: 100-continue`, until the body is asked
        self.body = bytearray()  # arrived, not yet received by the app
        self.more_body = True
        self.fresh = False  # something arrived (or ended) that receive() has not told yet
        self.waiter: asyncio.Future[None] | None = None  # receive() waiting for news
        self.disconnected = False  # the app hears http.disconnect; its sends are dropped
        self.started = False
        self.complete = False
        self.chunked: bool | None = None  # None until the head says
        self.remaining = 0  # bytes of a content-length body still to send

    def run(self, app: Callable[..., Awaitable[None]]) -> asyncio.Future[None]:
        """Call the app as a task of its own, seen to by `_ended` (no frame of ours waits on
        it: a stream's task lives as long as the stream)."""
        task = asyncio.ensure_future(app(self.scope, self.receive, self.send))
        task.add_done_callback(self._ended)
        return task

    def _ended(self, task: asyncio.Future[None]) -> None:
        """A failure answers 500 if nothing was sent yet, else cuts the response; so does a
        cancel (the stop's bound passed) and an app that returned without finishing."""
        self.connection.tasks.discard(task)
        self.release()
        if task.cancelled():
            self._abandon()
        elif (exc := task.exception()) is not None:
            log.error(
                "the app failed on %s %s", self.scope["method"], self.scope["path"], exc_info=exc
            )
            self._abandon()
        elif not self.complete and not self.disconnected:
            log.error(
                "the app returned before completing its response to %s %s",
                self.scope["method"],
                self.scope["path"],
            )
            self._abandon()

    def release(self) -> None:
        """The scope stops leading back here: no cycle is left for the collector to find."""
        self.scope["extensions"].pop(CONNECTION, None)

    def _abandon(self) -> None:
        transport = self.connection.transport
        if not self.started and not self.disconnected and not transport.is_closing():
            self.started = self.complete = True
            transport.write(INTERNAL_ERROR)
        transport.close()

    def wake(self) -> None:
        """Tell a waiting receive() something changed."""
        self.fresh = True
        waiter = self.waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    async def receive(self) -> dict[str, Any]:
        connection = self.connection
        if self.continue_wanted and not connection.transport.is_closing():
            connection.transport.write(CONTINUE)
            self.continue_wanted = False
        if not self.disconnected and not self.complete:
            connection.resume_reading()
            if not self.fresh:
                self.waiter = connection.loop.create_future()
                try:
                    await self.waiter
                finally:
                    self.waiter = None
            self.fresh = False
        if self.disconnected or self.complete:
            return {"type": "http.disconnect"}
        message = {"type": "http.request", "body": bytes(self.body), "more_body": self.more_body}
        self.body = bytearray()
        return message

    async def send(self, message: Mapping[str, Any]) -> None:
        connection = self.connection
        if connection.write_paused and not self.disconnected:
            await connection.drain()
        if self.disconnected:
            return
        kind = message["type"]
        if not self.started:
            if kind != "http.response.start":
                raise RuntimeError(f"ASGI message {kind!r} sent before http.response.start")
            self._write_head(message["status"], message.get("headers", ()))
        elif not self.complete:
            if kind != "http.response.body":
                raise RuntimeError(f"ASGI message {kind!r} sent in a response's body")
            self._write_body(message.get("body", b""), message.get("more_body", False))
        else:
            raise RuntimeError(f"ASGI message {kind!r} sent after the response completed")

    def _write_head(self, status: int, headers: Iterable[tuple[bytes, bytes]]) -> None:
        connection = self.connection
        content = [STATUS_LINE[status]]
        close_said = False
        for name, value in (*connection.server_state.default_headers, *headers):
            if BAD_NAME.search(name) or BAD_VALUE.search(value):
                raise RuntimeError(f"the response header {name!r} is not valid HTTP")
            name = name.lower()
            if name == b"content-length" and self.chunked is None:
                self.remaining = int(value)
                self.chunked = False
            elif name == b"transfer-encoding" and value.lower() == b"chunked":
                self.remaining = 0
                self.chunked = True
            elif name == b"connection" and b"close" in _tokens(value):
                self.keep_alive = False
                close_said = True
            content += (name, b": ", value, b"\r\n")
        if not self.keep_alive and not close_said:
            content.append(b"connection: close\r\n")
        if self.chunked is None and self.scope["method"] != "HEAD" and status not in (204, 304):
            self.chunked = True
            content.append(b"transfer-encoding: chunked\r\n")
        content.append(b"\r\n")
        self.started = True
        self.continue_wanted = False
        connection.transport.write(b"".join(content))

    def _write_body(self, body: bytes, more: bool) -> None:
        transport = self.connection.transport
        if self.scope["method"] == "HEAD":
            self.remaining = 0
        elif self.chunked:
            chunk = b"%x\r\n%b\r\n" % (len(body), body) if body else b""
            transport.write(chunk if more else chunk + b"0\r\n\r\n")
        else:
            if len(body) > self.remaining:
                raise RuntimeError("the response's body is longer than its content-length")
            self.remaining -= len(body)
            transport.write(body)
        if not more:
            if self.remaining:
                raise RuntimeError("the response's body is shorter than its content-length")
            self.completed()

    def completed(self) -> None:
        """The response is whole: the connection closes, serves the next or waits for it."""
        self.complete = True
        self.wake()
        self.connection.response_complete(self)

    # -- the extension: closed_check, body_writer, reply_writer ------------------------

    def write(self, body: bytes) -> bool:
        """`body_writer`'s write: a chunk of a started chunked body, when `send` would write it
        without waiting."""
        connection = self.connection
        if (
            self.chunked is not True
            or self.complete
            or self.disconnected
            or connection.write_paused
            or connection.lingering
        ):
            return False
        connection.transport.write(b"%x\r\n%b\r\n" % (len(body), body))
        return True

    def reply(
        self, status: int, headers: list[tuple[bytes, bytes]], body: bytes, more: bool
    ) -> bool | None:
        """`reply_writer`'s write: what `send` does for a start and a first body, in one write.

        Not on a connection that closes after it: a client that half-closed may have gone,
        and only a second write finds out (the first one's reset answers it).
        """
        connection = self.connection
        if (
            self.started
            or not self.keep_alive
            or self.disconnected
            or connection.serving is not self
            or connection.write_paused
            or connection.lingering
        ):
            return None
        self.started = True
        self.continue_wanted = False
        head = [*connection.server_state.default_headers, *headers]
        if more:
            self.chunked = True
            head.append(CHUNKED)
            body = b"%x\r\n%b\r\n" % (len(body), body)
        transport = connection.transport
        transport.write(response_bytes(status, head, body))
        taken = not transport.is_closing()
        if not more:
            self.completed()
        return taken


def _tokens(value: bytes) -> list[bytes]:
    return [token.strip().lower() for token in value.split(b",")]

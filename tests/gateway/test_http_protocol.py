"""The HTTP/1.1 protocol on its own: bytes in, an ASGI app, bytes out.

Each test drives one connection of gateway/http_protocol.py with a transport that keeps
what is written to it, made by uvicorn.Server's own config and state as serving.py has
them. Its bounds and hostile clients are met by a real daemon over real sockets in
tests/test_http_limits.py and tests/test_http_hostile.py.
"""

from __future__ import annotations

import asyncio
import gc
import sys
from collections.abc import Awaitable, Callable
from typing import Any

import pytest
import uvicorn
from httptools import HttpParserCallbackError, HttpParserError
from uvicorn.server import ServerState

from llmsvc.gateway.http_protocol import HttpLimits, HttpProtocol, not_http, protocol_class
from llmsvc.gateway.http_request import (
    CHUNKED,
    Request,
    body_writer,
    reply_writer,
    response_bytes,
)

App = Callable[[dict[str, Any], Any, Any], Awaitable[None]]
DATE = (b"date", b"Sun, 06 Dec 2026 16:00:00 GMT")


class _Recording(asyncio.Transport):
    """A transport that keeps what is written to it."""

    def __init__(self) -> None:
        super().__init__()
        self.written: list[bytes] = []
        self.closed = False
        self.reading = True

    def write(self, data: bytes | bytearray | memoryview) -> None:
        self.written.append(bytes(data))

    def write_eof(self) -> None:
        pass

    def close(self) -> None:
        self.closed = True

    def is_closing(self) -> bool:
        return self.closed

    def pause_reading(self) -> None:
        self.reading = False

    def resume_reading(self) -> None:
        self.reading = True

    def get_extra_info(self, name: str, default: Any = None) -> Any:
        return {"sockname": ("127.0.0.1", 8080), "peername": ("127.0.0.1", 50000)}.get(
            name, default
        )

    def output(self) -> bytes:
        return b"".join(self.written)


def _connection(app: App) -> tuple[HttpProtocol, _Recording]:
    limits = HttpLimits(
        max_header_bytes=16_384,
        header_timeout=5,
        body_timeout=5,
        max_connections=10,
        refused=lambda reason: None,
    )
    config = uvicorn.Config(app, http=protocol_class(limits), lifespan="off", log_config=None)
    state = ServerState()
    state.default_headers = [DATE]
    config.load()
    protocol = config.http_protocol_class(config, state, {})  # type: ignore[call-arg]
    assert isinstance(protocol, HttpProtocol)
    transport = _Recording()
    protocol.connection_made(transport)
    return protocol, transport


async def _served(protocol: HttpProtocol) -> None:
    """Until every request the connection started is answered."""
    while protocol.tasks:
        await asyncio.wait(set(protocol.tasks))
        await asyncio.sleep(0)  # their done callbacks


POST = b"POST /v1/chat/completions HTTP/1.1\r\nhost: x\r\ncontent-length: 2\r\n\r\n{}"
HEADERS = [(b"x-request-id", b"0b6c2b1e-5b1f-4d55-9a0c-3f1d1e6e8a11")]


@pytest.mark.parametrize("more", [False, True], ids=["whole", "streamed"])
async def test_a_head_and_first_body_in_one_write_are_the_bytes_send_writes_in_two(
    more: bool,
) -> None:
    """`reply_writer` writes a response's head and its first body in one write on a
    connection kept alive: byte for byte what `send` writes for the same start and body,
    the default headers included; a streamed one as the first chunk of a chunked body."""
    body = b'data: {"id":"chatcmpl-1"}\n\n' if more else b'{"id":"chatcmpl-1"}'
    headers = [(b"content-type", b"text/event-stream" if more else b"application/json")]
    if not more:
        headers.append((b"content-length", str(len(body)).encode()))
    headers += HEADERS

    async def by_send(scope: dict[str, Any], receive: Any, send: Any) -> None:
        await receive()
        await send({"type": "http.response.start", "status": 200, "headers": headers})
        await send({"type": "http.response.body", "body": body, "more_body": more})
        await _end(send, more)

    async def in_one(scope: dict[str, Any], receive: Any, send: Any) -> None:
        await receive()
        assert reply_writer(scope)(200, list(headers), body, more) is True
        await _end(send, more)

    written = []
    for app in (by_send, in_one):
        protocol, transport = _connection(app)
        protocol.data_received(POST)
        await _served(protocol)
        written.append(transport.written)
        assert not transport.closed
    ends = [b"0\r\n\r\n"] if more else []
    assert written[0][2:] == written[1][1:] == ends
    head = [DATE, *headers, *([CHUNKED] if more else [])]
    sent = b"%x\r\n%b\r\n" % (len(body), body) if more else body
    assert b"".join(written[0][:2]) == written[1][0] == response_bytes(200, head, sent)


async def _end(send: Any, more: bool) -> None:
    if more:
        await send({"type": "http.response.body", "body": b"", "more_body": False})


async def test_the_pumps_direct_write_is_the_chunk_send_writes() -> None:
    """`body_writer` writes a streamed chunk itself when `send` would not wait: the same
    bytes, and only into a chunked body that is still open."""
    said: list[bool] = []

    async def app(scope: dict[str, Any], receive: Any, send: Any) -> None:
        await receive()
        write = body_writer(scope)
        said.append(write(b"early"))  # no head yet: not a chunked body
        await send({"type": "http.response.start", "status": 200, "headers": HEADERS})
        await send({"type": "http.response.body", "body": b"by send", "more_body": True})
        said.append(write(b"by write"))
        await send({"type": "http.response.body", "body": b"", "more_body": False})
        said.append(write(b"late"))  # the body has ended

    protocol, transport = _connection(app)
    protocol.data_received(POST)
    await _served(protocol)
    assert said == [False, True, False]
    assert transport.written[1:] == [b"7\r\nby send\r\n", b"8\r\nby write\r\n", b"0\r\n\r\n"]


async def test_a_client_that_stops_reading_holds_send_and_the_direct_write() -> None:
    """While the transport's buffer is full, `send` waits and the pump's write declines;
    both go on when the client reads again."""
    sent = asyncio.Event()

    async def app(scope: dict[str, Any], receive: Any, send: Any) -> None:
        await receive()
        await send({"type": "http.response.start", "status": 200, "headers": HEADERS})
        protocol.pause_writing()
        assert body_writer(scope)(b"held") is False
        await send({"type": "http.response.body", "body": b"later", "more_body": False})
        sent.set()

    protocol, transport = _connection(app)
    protocol.data_received(POST)
    await asyncio.sleep(0.01)
    assert not sent.is_set()
    protocol.resume_writing()
    await _served(protocol)
    assert sent.is_set()
    assert transport.written[-1] == b"5\r\nlater\r\n0\r\n\r\n"


async def test_pipelined_requests_run_one_at_a_time_in_order() -> None:
    """A second request in the same read waits for the first one's answer; reading pauses."""
    order: list[str] = []
    first_may_end = asyncio.Event()

    async def app(scope: dict[str, Any], receive: Any, send: Any) -> None:
        order.append(f"start {scope['path']}")
        if scope["path"] == "/a":
            await first_may_end.wait()
        body = scope["path"].encode()
        headers = [(b"content-length", b"2")]
        await send({"type": "http.response.start", "status": 200, "headers": headers})
        await send({"type": "http.response.body", "body": body})
        order.append(f"end {scope['path']}")

    protocol, transport = _connection(app)
    protocol.data_received(b"GET /a HTTP/1.1\r\nhost: x\r\n\r\nGET /b HTTP/1.1\r\nhost: x\r\n\r\n")
    await asyncio.sleep(0.01)
    assert order == ["start /a"]
    assert not transport.reading
    first_may_end.set()
    await _served(protocol)
    assert order == ["start /a", "end /a", "start /b", "end /b"]
    assert transport.output().index(b"/a") < transport.output().index(b"/b")
    assert transport.reading


async def test_expect_100_continue_is_answered_when_the_body_is_asked_for() -> None:
    async def app(scope: dict[str, Any], receive: Any, send: Any) -> None:
        assert transport.written == []
        message = await receive()
        assert message == {"type": "http.request", "body": b"{}", "more_body": False}
        await send({"type": "http.response.start", "status": 204, "headers": []})
        await send({"type": "http.response.body"})

    protocol, transport = _connection(app)
    protocol.data_received(POST.replace(b"\r\n\r\n", b"\r\nexpect: 100-continue\r\n\r\n"))
    await _served(protocol)
    assert transport.written[0] == b"HTTP/1.1 100 Continue\r\n\r\n"
    assert transport.written[1].startswith(b"HTTP/1.1 204 No Content\r\n")


async def test_a_body_in_pieces_is_received_in_pieces_then_disconnect_when_the_client_goes() -> (
    None
):
    messages: list[dict[str, Any]] = []

    async def app(scope: dict[str, Any], receive: Any, send: Any) -> None:
        messages.append(await receive())
        messages.append(await receive())
        messages.append(await receive())  # the body is whole: waits for news

    protocol, _ = _connection(app)
    protocol.data_received(b"POST / HTTP/1.1\r\nhost: x\r\ncontent-length: 4\r\n\r\nab")
    await asyncio.sleep(0)
    protocol.data_received(b"cd")
    await asyncio.sleep(0.01)
    assert len(messages) == 2
    protocol.connection_lost(None)
    await _served(protocol)
    assert messages == [
        {"type": "http.request", "body": b"ab", "more_body": True},
        {"type": "http.request", "body": b"cd", "more_body": False},
        {"type": "http.disconnect"},
    ]


async def test_a_head_request_gets_headers_and_no_body() -> None:
    async def app(scope: dict[str, Any], receive: Any, send: Any) -> None:
        headers = [(b"content-length", b"5")]
        await send({"type": "http.response.start", "status": 200, "headers": headers})
        await send({"type": "http.response.body", "body": b"hello"})

    protocol, transport = _connection(app)
    protocol.data_received(b"HEAD / HTTP/1.1\r\nhost: x\r\n\r\n")
    await _served(protocol)
    assert transport.output().endswith(b"content-length: 5\r\n\r\n")
    assert not transport.closed


async def test_http_1_0_and_connection_close_are_answered_then_closed() -> None:
    async def app(scope: dict[str, Any], receive: Any, send: Any) -> None:
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": b"x"})

    for request in (
        b"GET / HTTP/1.0\r\n\r\n",
        b"GET / HTTP/1.1\r\nhost: x\r\nconnection: close\r\n\r\n",
    ):
        protocol, transport = _connection(app)
        protocol.data_received(request)
        await _served(protocol)
        assert b"\r\nconnection: close\r\n" in transport.output()
        assert transport.closed


@pytest.mark.parametrize("started", [False, True], ids=["before", "midway"])
async def test_an_app_that_fails_gets_500_or_its_response_cut(
    started: bool, caplog: pytest.LogCaptureFixture
) -> None:
    async def app(scope: dict[str, Any], receive: Any, send: Any) -> None:
        if started:
            await send({"type": "http.response.start", "status": 200, "headers": []})
        raise RuntimeError("boom")

    protocol, transport = _connection(app)
    protocol.data_received(b"GET /x HTTP/1.1\r\nhost: x\r\n\r\n")
    await _served(protocol)
    assert transport.closed
    assert transport.output().startswith(b"HTTP/1.1 200 OK" if started else b"HTTP/1.1 500 ")
    assert "the app failed on GET /x" in caplog.text


async def test_a_response_header_that_would_split_the_response_is_refused() -> None:
    async def app(scope: dict[str, Any], receive: Any, send: Any) -> None:
        headers = [(b"x-echo", b"a\r\nset-cookie: b")]
        await send({"type": "http.response.start", "status": 200, "headers": headers})

    protocol, transport = _connection(app)
    protocol.data_received(b"GET / HTTP/1.1\r\nhost: x\r\n\r\n")
    await _served(protocol)
    assert b"set-cookie" not in transport.output()
    assert transport.output().startswith(b"HTTP/1.1 500 ")


async def test_a_request_that_is_not_http_gets_400_naming_the_parsers_reason() -> None:
    protocol, transport = _connection(_app_never_called)
    smuggled = (
        b"POST / HTTP/1.1\r\nhost: x\r\ncontent-length: 3\r\n"
        b"transfer-encoding: chunked\r\n\r\n0\r\n\r\n"
    )
    protocol.data_received(smuggled)
    await _served(protocol)
    output = transport.output()
    assert output.startswith(b"HTTP/1.1 400 Bad Request\r\n")
    assert b"Transfer-Encoding can't be present with Content-Length" in output
    assert not protocol.tasks


@pytest.mark.parametrize(
    ("head", "hosts"),
    [
        (b"GET / HTTP/1.1\r\n\r\n", 0),
        (b"GET / HTTP/1.1\r\nhost: a\r\nHost: b\r\n\r\n", 2),
        (b"GET / HTTP/1.0\r\nhost: a\r\nhost: b\r\n\r\n", 2),
    ],
    ids=["none", "two", "two-1.0"],
)
async def test_a_request_without_exactly_one_host_gets_400_saying_so(
    head: bytes, hosts: int
) -> None:
    """RFC 9112, 3.2: a server MUST answer 400 to an HTTP/1.1 request with no Host, and to
    any with more than one; HTTP/1.0 had no Host to require."""
    protocol, transport = _connection(_app_never_called)
    protocol.data_received(head)
    await _served(protocol)
    output = transport.output()
    assert output.startswith(b"HTTP/1.1 400 Bad Request\r\n")
    assert f"one Host header (HTTP/1.0: at most one); it has {hosts}".encode() in output
    assert not protocol.tasks


async def test_an_http_1_0_request_needs_no_host() -> None:
    async def app(scope: dict[str, Any], receive: Any, send: Any) -> None:
        await send({"type": "http.response.start", "status": 204, "headers": []})
        await send({"type": "http.response.body", "body": b""})

    protocol, transport = _connection(app)
    protocol.data_received(b"GET / HTTP/1.0\r\n\r\n")
    await _served(protocol)
    assert transport.output().startswith(b"HTTP/1.1 204 ")


async def test_a_connection_and_its_request_keep_their_fields_in_slots() -> None:
    """Thousands live at once, one per open stream: no per-instance dict."""
    protocol, _ = _connection(_app_never_called)
    for cls in (HttpProtocol, type(protocol), Request):
        assert cls.__dictoffset__ == 0, cls
    assert sys.getsizeof(protocol) < 400


async def _app_never_called(scope: dict[str, Any], receive: Any, send: Any) -> None:
    raise AssertionError("never called")


@pytest.mark.parametrize(
    ("exc", "said"),
    [
        (HttpParserError("Duplicate Content-Length"), ": Duplicate Content-Length"),
        (HttpParserCallbackError("`on_headers_complete` callback error"), ""),
        (None, ""),
    ],
    ids=["parser", "callback", "none"],
)
def test_a_request_the_parser_refused_is_named_by_its_reason_only(
    exc: BaseException | None, said: str
) -> None:
    """llhttp's reasons are fixed strings; a callback's failure is our code."""
    assert str(not_http(exc)) == f"the request is not valid HTTP/1.1{said}"


async def test_a_connection_serving_a_stream_holds_no_parser_and_parses_the_next_request() -> None:
    """Between requests a parser holds nothing: one serving a stream for minutes lets it go,
    and the next bytes get a new one."""
    release = asyncio.Event()

    async def app(scope: dict[str, Any], receive: Any, send: Any) -> None:
        await receive()
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await release.wait()
        await send({"type": "http.response.body", "body": scope["path"].encode()})

    protocol, transport = _connection(app)
    protocol.data_received(b"GET /first HTTP/1.1\r\nhost: x\r\n\r\n")
    await asyncio.sleep(0)
    assert protocol.parser is None
    release.set()
    await _served(protocol)
    protocol.data_received(b"GET /second HTTP/1.1\r\nhost: x\r\n\r\n")
    await _served(protocol)
    assert transport.output().count(b"HTTP/1.1 200 OK") == 2
    assert transport.output().endswith(b"7\r\n/second\r\n0\r\n\r\n")


async def test_a_closed_connection_leaves_no_cycle_for_the_collector() -> None:
    """The daemon collects young objects rarely (serving.tune_gc): a connection and its
    requests must go when their last reference does, not wait for the collector."""

    async def app(scope: dict[str, Any], receive: Any, send: Any) -> None:
        await receive()
        assert reply_writer(scope)(200, [(b"content-length", b"2")], b"{}", False)

    gc.collect()
    gc.disable()
    try:
        protocol, transport = _connection(app)
        protocol.data_received(POST)
        await _served(protocol)
        protocol.data_received(POST[:20])  # a next request begun: a parser mid-message
        protocol.connection_lost(None)
        del protocol, transport
        left = [o for o in gc.get_objects() if isinstance(o, HttpProtocol | Request)]
        assert left == []
    finally:
        gc.enable()


H2C = (
    b"POST /v1/chat/completions HTTP/1.1\r\nhost: x\r\nconnection: Upgrade, HTTP2-Settings\r\n"
    b"upgrade: h2c\r\nhttp2-settings: AAMAAABkAARAAAAAAAIAAAAA\r\ncontent-length: 7\r\n\r\n"
)


@pytest.mark.parametrize("reads", [[H2C + b'{"a":1}'], [H2C + b'{"a"', b":1}PRI * HTTP/2.0"]])
async def test_a_request_asking_to_upgrade_is_answered_as_http_1_1_with_its_body(
    reads: list[bytes],
) -> None:
    """curl's `--http2` on http:// asks `Upgrade: h2c` with its POST. There is no protocol
    to switch to, so the request is answered as plain HTTP/1.1 (RFC 9110, 7.8) with the
    body llhttp leaves unparsed, and the connection closes; nothing after the body is read."""
    bodies: list[bytes] = []

    async def app(scope: dict[str, Any], receive: Any, send: Any) -> None:
        body, more = b"", True
        while more:
            message = await receive()
            body, more = body + message["body"], message["more_body"]
        bodies.append(body)
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": b"ok"})

    protocol, transport = _connection(app)
    for data in reads:
        protocol.data_received(data)
        await asyncio.sleep(0)
    await _served(protocol)
    assert bodies == [b'{"a":1}']
    assert transport.output().startswith(b"HTTP/1.1 200 OK\r\n")
    assert b"connection: close\r\n" in transport.output()
    assert transport.closed


async def test_a_websocket_upgrade_without_a_body_is_answered_and_closed() -> None:
    async def app(scope: dict[str, Any], receive: Any, send: Any) -> None:
        assert await receive() == {"type": "http.request", "body": b"", "more_body": False}
        await send({"type": "http.response.start", "status": 404, "headers": []})
        await send({"type": "http.response.body", "body": b"no"})

    protocol, transport = _connection(app)
    protocol.data_received(
        b"GET /ws HTTP/1.1\r\nhost: x\r\nconnection: upgrade\r\nupgrade: websocket\r\n\r\n\x81\x00"
    )
    await _served(protocol)
    assert transport.output().startswith(b"HTTP/1.1 404 Not Found\r\n")
    assert transport.closed

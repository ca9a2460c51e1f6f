"""The bounded HTTP protocol's footing: the uvicorn internals it overrides are still there.

Its bounds themselves are met by a real daemon over real sockets in tests/test_http_limits.py.
"""

from __future__ import annotations

import asyncio
import inspect
import logging
import re
import sys

import pytest
from httptools import HttpParserCallbackError, HttpParserError
from uvicorn.protocols.http.flow_control import FlowControl
from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol, RequestResponseCycle

from llmsvc.gateway.http_lean import LeanEvent, Pipeline
from llmsvc.gateway.http_protocol import (
    CHUNKED,
    BoundedHttpProtocol,
    not_http,
    response_bytes,
)


def test_uvicorn_still_has_the_hooks_the_bounded_protocol_overrides() -> None:
    """gateway/http_protocol.py leans on uvicorn internals (pinned): an upgrade that moves
    them fails here, not in production."""
    headers_complete = inspect.getsource(HttpToolsProtocol.on_headers_complete)
    assert "self._start_asgi_task(self.cycle, app)" in headers_complete
    assert "on_response=self.on_response_complete" in headers_complete
    assert "self._start_asgi_task(cycle, app)" in inspect.getsource(
        HttpToolsProtocol.on_response_complete
    )
    assert "self.parser.feed_data(data)" in inspect.getsource(HttpToolsProtocol.data_received)
    assert "self.url += url" in inspect.getsource(HttpToolsProtocol.on_url)
    received = inspect.getsource(HttpToolsProtocol.data_received)
    assert "self.send_400_response(msg)" in received
    # not_http reads the parser's reason from the exception being handled
    assert received.index("except httptools.HttpParserError:") < received.index(
        "self.send_400_response(msg)"
    )
    for hook in ("connection_made", "connection_lost", "eof_received", "on_message_begin"):
        assert hook in HttpToolsProtocol.__dict__, hook


def test_uvicorn_still_writes_a_chunked_body_as_the_pumps_direct_write_does() -> None:
    """`body_writer` writes a streamed chunk itself when uvicorn's `send` would not wait
    (gateway/http_protocol.py): the fields it reads and the bytes it copies must be send's."""
    send = inspect.getsource(RequestResponseCycle.send)
    assert "if self.flow.write_paused and not self.disconnected:" in send
    assert "if self.disconnected:" in send
    assert "elif not self.response_complete:" in send
    assert "self.chunked_encoding = True" in send
    assert 'content = [b"%x\\r\\n" % len(body), body, b"\\r\\n"]' in send
    assert 'self.transport.write(b"".join(content))' in send


class _Recording:
    """A transport that keeps what is written to it."""

    def __init__(self) -> None:
        self.written: list[bytes] = []
        self.closed = False

    def write(self, data: bytes) -> None:
        self.written.append(bytes(data))

    def close(self) -> None:
        self.closed = True

    def is_closing(self) -> bool:
        return self.closed


@pytest.mark.parametrize("more", [False, True], ids=["whole", "streamed"])
async def test_a_head_and_first_body_are_the_bytes_uvicorns_send_writes_in_two(
    more: bool,
) -> None:
    """`reply_writer` writes a response's head and its first body in one write on a
    connection kept alive: byte for byte what uvicorn's `send` writes for the same start and
    body, its default headers included; a streamed one as the first chunk of a chunked body."""
    transport = _Recording()
    cycle = RequestResponseCycle(
        scope={"method": "POST"},  # type: ignore[typeddict-item]
        transport=transport,  # type: ignore[arg-type]
        flow=FlowControl(transport),  # type: ignore[arg-type]
        logger=logging.getLogger("test"),
        access_logger=logging.getLogger("test"),
        access_log=False,
        default_headers=[(b"date", b"Sun, 06 Dec 2026 16:00:00 GMT")],
        message_event=asyncio.Event(),
        expect_100_continue=False,
        keep_alive=True,
        on_response=lambda: None,
    )
    body = b'data: {"id":"chatcmpl-1"}\n\n' if more else b'{"id":"chatcmpl-1"}'
    headers = [(b"content-type", b"text/event-stream" if more else b"application/json")]
    if not more:
        headers.append((b"content-length", str(len(body)).encode()))
    headers.append((b"x-request-id", b"0b6c2b1e-5b1f-4d55-9a0c-3f1d1e6e8a11"))
    await cycle.send({"type": "http.response.start", "status": 200, "headers": headers})
    await cycle.send({"type": "http.response.body", "body": body, "more_body": more})

    assert len(transport.written) == 2
    head = cycle.default_headers + headers + ([CHUNKED] if more else [])
    sent = b"%x\r\n%b\r\n" % (len(body), body) if more else body
    assert b"".join(transport.written) == response_bytes(200, head, sent)
    assert not transport.closed


def test_uvicorn_still_uses_its_events_and_pipeline_only_as_the_lean_ones_can() -> None:
    """LeanEvent and Pipeline stand in for uvicorn's asyncio.Events and deque: every use of
    them in uvicorn must be one they have."""
    assert "self._is_writable_event = asyncio.Event()" in inspect.getsource(FlowControl)
    assert "message_event=asyncio.Event()" in inspect.getsource(
        HttpToolsProtocol.on_headers_complete
    )
    sources = inspect.getsource(FlowControl) + inspect.getsource(RequestResponseCycle)
    for used in re.findall(r"(?:_is_writable_event|message_event)\.(\w+)", sources):
        assert hasattr(LeanEvent, used), used
    protocol = inspect.getsource(HttpToolsProtocol)
    for used in re.findall(r"self\.pipeline\.(\w+)", protocol):
        assert hasattr(Pipeline, used), used


def test_a_connection_keeps_its_dict_under_the_shared_keys_bound() -> None:
    """Past 29 fields an instance's dict stops sharing its keys: 1,584 bytes a connection
    instead of 296. The bounded protocol's own fields are slots, so uvicorn's fit."""
    uvicorn_fields = set(
        re.findall(r"self\.(\w+)(?:: [^=]+)? = ", inspect.getsource(HttpToolsProtocol))
    )
    assert "_head_bytes" in BoundedHttpProtocol.__slots__
    assert len(uvicorn_fields) <= 29, sorted(uvicorn_fields)
    assert sys.getsizeof(LeanEvent()) <= 56


async def test_a_lean_event_wakes_its_waiters_as_an_asyncio_event_does() -> None:
    for event in (asyncio.Event(), LeanEvent()):
        assert not event.is_set()
        waiters = [asyncio.create_task(event.wait()) for _ in range(2)]
        await asyncio.sleep(0)
        assert not any(w.done() for w in waiters)
        event.set()
        assert event.is_set()
        assert await asyncio.gather(*waiters) == [True, True]
        assert await event.wait() is True  # set: at once
        event.clear()
        waiter = asyncio.create_task(event.wait())
        await asyncio.sleep(0)
        waiter.cancel()  # a cancelled waiter leaves no trace
        with pytest.raises(asyncio.CancelledError):
            await waiter
        event.set()
    assert LeanEvent(True).is_set()


def test_a_pipeline_queues_in_the_order_a_deque_does() -> None:
    pipeline = Pipeline()
    first, second = object(), object()
    pipeline.appendleft(first)  # type: ignore[arg-type]
    pipeline.appendleft(second)  # type: ignore[arg-type]
    assert pipeline.pop() is first
    assert pipeline
    assert pipeline.pop() is second
    assert not pipeline


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
    """llhttp's reasons are fixed strings; a callback's failure is uvicorn's code."""
    assert not_http(exc) == f"the request is not valid HTTP/1.1{said}"

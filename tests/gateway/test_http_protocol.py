"""The bounded HTTP protocol's footing: the uvicorn internals it overrides are still there.

Its bounds themselves are met by a real daemon over real sockets in tests/test_http_limits.py.
"""

from __future__ import annotations

import inspect

import pytest
from httptools import HttpParserCallbackError, HttpParserError
from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

from llmsvc.gateway.http_protocol import not_http


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

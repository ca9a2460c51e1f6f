"""The bounded HTTP protocol's footing: the uvicorn internals it overrides are still there.

Its bounds themselves are met by a real daemon over real sockets in tests/test_http_limits.py.
"""

from __future__ import annotations

import inspect

from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol


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
    assert "self.send_400_response(msg)" in inspect.getsource(HttpToolsProtocol.data_received)
    for hook in ("connection_made", "connection_lost", "eof_received", "on_message_begin"):
        assert hook in HttpToolsProtocol.__dict__, hook

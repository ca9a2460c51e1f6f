"""HTTP/1.1 over raw sockets, for tests that send what no client library would.

tests/test_http_limits.py (the HTTP layer's bounds) and tests/test_http_hostile.py
(hostile input) speak to a real `llmsvc run` with these.
"""

from __future__ import annotations

import os
import re
import socket
import uuid
import weakref
from pathlib import Path
from typing import Any

import orjson
from daemon_process import DaemonProcess

CHAT = "/v1/chat/completions"


def chat_request(stream: bool, tokens: int = 5, delay_ms: float = 0, headers: str = "") -> bytes:
    """A whole chat request to the mock; `headers` are extra header lines, each ending CRLF."""
    body = orjson.dumps(
        {
            "model": "mock",
            "messages": [{"role": "user", "content": "hi"}],
            "max_tokens": tokens,
            "stream": stream,
            "mock_delay_ms": delay_ms,
        }
    )
    head = (
        f"POST {CHAT} HTTP/1.1\r\nHost: llmsvc\r\nContent-Type: application/json\r\n"
        f"{headers}Content-Length: {len(body)}\r\n\r\n"
    )
    return head.encode() + body


def connect(daemon: DaemonProcess) -> socket.socket:
    return socket.create_connection(("127.0.0.1", daemon.port), timeout=10)


def read_until_closed(sock: socket.socket, timeout: float = 10) -> bytes:
    """Everything the daemon sends until it closes; a reset after an answer ends it too."""
    sock.settimeout(timeout)
    data = b""
    try:
        while chunk := sock.recv(65536):
            data += chunk
    except ConnectionResetError:
        if not data:
            raise
    return data


def status_of(response: bytes) -> int:
    assert response.startswith(b"HTTP/1.1 "), response[:200]
    return int(response.split(b" ", 2)[1])


def error_of(response: bytes) -> dict[str, Any]:
    """The `error` object of an answer (OpenAI's shape and Anthropic's both have one)."""
    head, _, body = response.partition(b"\r\n\r\n")
    assert b"content-type: application/json" in head.lower(), head
    error: dict[str, Any] = orjson.loads(body)["error"]
    return error


def header_of(response: bytes, name: str) -> str:
    """The one value of a response header."""
    head = response.partition(b"\r\n\r\n")[0].decode("latin-1")
    (value,) = re.findall(rf"(?im)^{name}: (\S+)\r?$", head)
    return str(value)


def request_id_of(response: bytes) -> uuid.UUID:
    """The X-Request-ID every answer carries, refusals of the HTTP layer included."""
    return uuid.UUID(header_of(response, "x-request-id"))


def responses(data: bytes) -> list[int]:
    """The status of every response in a connection's output."""
    return [int(status) for status in re.findall(rb"HTTP/1\.1 (\d{3}) ", data)]


def read_response(sock: socket.socket) -> bytes:
    """One response, whole (by its content-length or to its last chunk), leaving the
    connection open; bytes that came after it (the next pipelined answer) are kept for the
    next call on this socket."""
    data = _UNREAD.pop(sock, b"")
    while b"\r\n\r\n" not in data:
        data += _more(sock)
    head, _, body = data.partition(b"\r\n\r\n")
    lowered = head.lower()
    if b"transfer-encoding: chunked" in lowered:
        while (whole := dechunk(body)) is None:
            body += _more(sock)
        end = whole[1]
    else:
        end = int(lowered.split(b"content-length: ")[1].split(b"\r\n")[0])
        while len(body) < end:
            body += _more(sock)
    if body[end:]:
        _UNREAD[sock] = body[end:]
    return head + b"\r\n\r\n" + body[:end]


_UNREAD: weakref.WeakKeyDictionary[socket.socket, bytes] = weakref.WeakKeyDictionary()


def dechunk(body: bytes) -> tuple[bytes, int] | None:
    """A chunked body's data and where the body ends (no trailers), or None if its last chunk
    has not come."""
    data, at = bytearray(), 0
    while (eol := body.find(b"\r\n", at)) >= 0:
        size = int(body[at:eol].split(b";")[0], 16)
        end = eol + 2 + size + 2
        if len(body) < end:
            return None
        if size == 0:
            return bytes(data), end
        data += body[eol + 2 : eol + 2 + size]
        at = end
    return None


def _more(sock: socket.socket) -> bytes:
    chunk = sock.recv(65536)
    assert chunk, "the daemon closed the connection mid-response"
    return chunk


def rss_kib(daemon: DaemonProcess) -> int:
    assert daemon.proc is not None
    for line in Path(f"/proc/{daemon.proc.pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise AssertionError("no VmRSS")


def open_fds(daemon: DaemonProcess) -> int:
    assert daemon.proc is not None
    return len(os.listdir(f"/proc/{daemon.proc.pid}/fd"))

"""Hostile input to the server that handles `/v1`, met by one real `llmsvc run` (issue 19).

Request smuggling (Content-Length with Transfer-Encoding, two lengths, an obfuscated
Transfer-Encoding), invalid chunked bodies, too many headers, invalid UTF-8 in a body, a
header or the request target: each gets the 4xx a careful server gives, naming the
problem, the connection is closed where the stream can no longer be trusted, nothing is
stored for it, and the daemon serves the next request with no traceback in its log.
Pipelined requests are all answered in order and stored once each; thousands of idle
keep-alive connections neither slow a new client nor outlive their timeouts. A huge
request line (414) or header (431) and slowloris (a head trickled a byte at a time) are
met in tests/test_http_limits.py.
"""

from __future__ import annotations

import re
import resource
import selectors
import socket
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass

import orjson
import pytest
from daemon_process import DaemonProcess, Stored, daemon_env, read_store
from raw_http import (
    CHAT,
    chat_request,
    connect,
    error_of,
    header_of,
    open_fds,
    read_response,
    read_until_closed,
    request_id_of,
    responses,
    rss_kib,
    status_of,
)

pytestmark = pytest.mark.timeout(60)

# Idle connections held at once, as issue 19 asks. Each may hold an upstream connection
# too, so the daemon fits max_connections to half its descriptors (connection_bound): a
# hard RLIMIT_NOFILE of 20,000 (some containers', which a test cannot raise) fits 9,904,
# so the test holds as many as fit, less a few for the clients it measures. About 8 s,
# most of it waiting for HEADER_TIMEOUT.
HELD = 10_000
SPARE = 8
KEEPALIVE = 5  # seconds: the held connections that sent a request are closed after it
HEADER_TIMEOUT = 6  # seconds: those that sent nothing; longer than opening them all takes
BACKLOG = 2048  # the listening socket's accept queue (uvicorn's default backlog)


@dataclass
class Served:
    daemon: DaemonProcess
    database_url: str
    max_connections: int  # as the daemon fitted it to its descriptors


@pytest.fixture(scope="module")
def served(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Served]:
    """One daemon on SQLite for every case here, the descriptors it may use all its own."""
    tmp = tmp_path_factory.mktemp("hostile")
    url = f"sqlite+aiosqlite:///{tmp / 'llmsvc.db'}"
    env = daemon_env(
        url,
        tmp / "wal",
        max_connections=HELD + SPARE,
        keepalive_timeout_seconds=KEEPALIVE,
        request_header_timeout_seconds=HEADER_TIMEOUT,
    )
    with DaemonProcess(env) as daemon:
        daemon.wait_caught_up()
        fitted = int(daemon.wait_for_log(r"http limits max_connections=(\d+) ")[1])
        yield Served(daemon, url, fitted)
        assert "Traceback" not in daemon.log, daemon.log
        assert daemon.stop() == 0, daemon.log


def serves_next(served: Served, before: Stored) -> float:
    """The daemon answers a normal request next, and it is all the store gained since
    `before`: the WAL is flushed in order, so a hostile request would be there by then.
    Returns the seconds the answer took, from connecting."""
    began = time.monotonic()
    sock = connect(served.daemon)
    sock.sendall(chat_request(False, headers="Connection: close\r\n"))
    response = read_until_closed(sock)
    took = time.monotonic() - began
    sock.close()
    assert status_of(response) == 200, response
    normal = request_id_of(response)
    deadline = time.monotonic() + 10
    while (store := read_store(served.database_url)).requests.get(normal, {}).get(
        "status"
    ) != "completed":
        assert time.monotonic() < deadline, "the normal request was not stored"
        time.sleep(0.02)
    assert store.requests.keys() - before.requests.keys() == {normal}
    assert "Traceback" not in served.daemon.log, served.daemon.log
    return took


# -- smuggling, broken bodies, invalid bytes ---------------------------------------------

SMUGGLED = f"smuggled-{uuid.uuid4()}"  # the correlation id of a request hidden in a body
SECOND = chat_request(False, headers=f"X-Correlation-ID: {SMUGGLED}\r\n")
BODY = orjson.dumps({"model": "mock", "messages": [{"role": "user", "content": "hi"}]})
ENDED = b"0\r\n\r\n" + SECOND  # a chunked body that ends at once, the next request after it


def post(headers: str, body: bytes, path: str = CHAT) -> bytes:
    """A POST's bytes; a character of `headers` or `path` past ASCII is that one byte."""
    return f"POST {path} HTTP/1.1\r\nHost: llmsvc\r\n{headers}\r\n".encode("latin-1") + body


def chunked(data: bytes) -> bytes:
    return b"%x\r\n%s\r\n0\r\n\r\n" % (len(data), data)


def with_bad_utf8(body: bytes) -> bytes:
    """The body with bytes 0xff 0xfe in its message's content (`"hi"` becomes `"h\xff\xfei"`)."""
    assert body.count(b'"hi"') == 1
    return body.replace(b'"hi"', b'"h\xff\xfei"')


ANTHROPIC = orjson.dumps(
    {"model": "mock", "max_tokens": 5, "messages": [{"role": "user", "content": "hi"}]}
)
RESPONSES = orjson.dumps({"model": "mock", "input": "hi"})
GOOD = f"Content-Length: {len(BODY)}\r\n"
BAD_AT = BODY.index(b'"hi"') + 2  # the offset of the first byte that is not UTF-8

# (request, status, words its error message must hold, whether the connection must close)
HOSTILE = {
    "content-length with chunked": (
        post(f"Content-Length: {len(ENDED)}\r\nTransfer-Encoding: chunked\r\n", ENDED),
        400, "Transfer-Encoding", True,
    ),
    "chunked with content-length": (
        post(f"Transfer-Encoding: chunked\r\nContent-Length: {len(ENDED)}\r\n", ENDED),
        400, "Content-Length", True,
    ),
    "two content-lengths": (
        post(f"Content-Length: {len(BODY)}\r\nContent-Length: {len(BODY + SECOND)}\r\n",
             BODY + SECOND),
        400, "Content-Length", True,
    ),
    "chunked, identity": (
        post("Transfer-Encoding: chunked, identity\r\n", chunked(BODY) + SECOND),
        400, "Transfer-Encoding", True,
    ),
    "two transfer-encodings": (
        post("Transfer-Encoding: chunked\r\nTransfer-Encoding: identity\r\n",
             chunked(BODY) + SECOND),
        400, "Transfer-Encoding", True,
    ),
    "space before the colon": (
        post(f"Content-Length: {len(ENDED)}\r\nTransfer-Encoding : chunked\r\n", ENDED),
        400, "header", True,
    ),
    "chunk size not hex": (
        post("Transfer-Encoding: chunked\r\n", b"zz\r\n" + BODY + b"\r\n0\r\n\r\n"),
        400, "chunk size", True,
    ),
    "chunk size past 64 bits": (
        post("Transfer-Encoding: chunked\r\n", b"1" + b"0" * 16 + b"\r\n" + BODY),
        400, "chunk size", True,
    ),
    "chunk without its CRLF": (
        post("Transfer-Encoding: chunked\r\n", b"%x\r\n%s0\r\n\r\n" % (len(BODY), BODY)),
        400, "chunk", True,
    ),
    "chunk longer than declared": (
        post("Transfer-Encoding: chunked\r\n",
             b"%x\r\n%s\r\n0\r\n\r\n" % (len(BODY) - 4, BODY) + SECOND),
        400, "chunk", True,
    ),
    "too many headers": (
        b"GET /api/health HTTP/1.1\r\nHost: llmsvc\r\n"
        + b"".join(b"X-%d: a\r\n" % i for i in range(10_000)) + b"\r\n",
        431, "max_header_bytes", True,
    ),
    "non-UTF-8 chat body": (
        post(f"Content-Length: {len(BODY) + 2}\r\n", with_bad_utf8(BODY)),
        400, f"not UTF-8 (byte 0xff at offset {BAD_AT})", False,
    ),
    "non-UTF-8 messages body": (
        post(f"Content-Length: {len(ANTHROPIC) + 2}\r\n", with_bad_utf8(ANTHROPIC),
             "/v1/messages"),
        400, "not UTF-8 (byte 0xff", False,
    ),
    "non-UTF-8 responses body": (
        post(f"Content-Length: {len(RESPONSES) + 2}\r\n", with_bad_utf8(RESPONSES),
             "/v1/responses"),
        400, "not UTF-8 (byte 0xff", False,
    ),
    "non-UTF-8 correlation id": (
        post(f"X-Correlation-ID: a\xffb\r\n{GOOD}", BODY),
        400, "X-Correlation-ID", False,
    ),
    "non-UTF-8 session header": (
        post(f"X-Llmsvc-Session-Id: \xff\xfe\r\n{GOOD}", BODY),
        400, "x-llmsvc-session-id header is not UTF-8", False,
    ),
    "non-UTF-8 header name": (
        post(f"X-\xff: a\r\n{GOOD}", BODY), 400, "header", True,
    ),
    "non-UTF-8 path": (post(GOOD, BODY, CHAT + "\xff"), 400, "url", True),
    "non-UTF-8 query": (post(GOOD, BODY, CHAT + "?q=\xff"), 400, "url", True),
}  # fmt: skip


@pytest.mark.parametrize(
    ("request_bytes", "status", "words", "closes"), HOSTILE.values(), ids=list(HOSTILE)
)
def test_hostile_requests_are_refused_naming_why_and_nothing_is_stored(
    served: Served, request_bytes: bytes, status: int, words: str, closes: bool
) -> None:
    """`closes`: the daemon closes the connection itself, since where the next request would
    begin cannot be trusted; a refusal of a well-framed request asks it to (Connection: close)."""
    before = read_store(served.database_url)
    sock = connect(served.daemon)
    if not closes:
        request_bytes = request_bytes.replace(b"\r\n", b"\r\nConnection: close\r\n", 1)
    sock.sendall(request_bytes)

    data = read_until_closed(sock, timeout=5)  # closed, not waiting for what follows

    sock.close()
    assert responses(data) == [status], data  # the request hidden in the body is not answered
    assert words.lower() in error_of(data)["message"].lower()
    assert request_id_of(data)
    serves_next(served, before)
    stored = read_store(served.database_url).requests.values()
    assert SMUGGLED not in {request["correlation_id"] for request in stored}


# -- pipelining ------------------------------------------------------------------------


def test_pipelined_requests_in_one_write_are_answered_in_order_and_stored_once(
    served: Served,
) -> None:
    before = read_store(served.database_url)
    sock = connect(served.daemon)
    sent = [f"pipelined-{n}-{uuid.uuid4()}" for n in range(3)]
    stream = [True, False, True]
    sock.sendall(
        b"".join(
            chat_request(streaming, tokens=4, headers=f"X-Correlation-ID: {sent_id}\r\n")
            for streaming, sent_id in zip(stream, sent, strict=True)
        )
    )

    answers = [read_response(sock) for _ in sent]
    sock.sendall(b"GET /api/ready HTTP/1.1\r\nHost: llmsvc\r\n\r\n")  # still kept alive
    ready = read_response(sock)

    sock.close()
    assert [status_of(answer) for answer in answers] == [200, 200, 200]
    assert [header_of(answer, "x-correlation-id") for answer in answers] == sent
    assert [answer.endswith(b"data: [DONE]\n\n\r\n0\r\n\r\n") for answer in answers] == stream
    assert status_of(ready) == 200
    ids = [request_id_of(answer) for answer in answers]
    deadline = time.monotonic() + 10
    while not all(
        store.requests.get(i, {}).get("status") == "completed"
        for store in [read_store(served.database_url)]
        for i in ids
    ):
        assert time.monotonic() < deadline, "the pipelined requests were not all stored"
        time.sleep(0.02)
    store = read_store(served.database_url)
    new = [store.requests[i] for i in store.requests.keys() - before.requests.keys()]
    assert sorted(request["correlation_id"] for request in new) == sorted(sent)  # once each
    for request, answer in zip(ids, answers, strict=True):  # stored as the client received it
        received = b"".join(re.findall(rb'"content":"([^"]*)"', answer)).decode()
        assert "".join(store.texts(request)) == received != ""
    serves_next(served, store)


# -- idle connections ------------------------------------------------------------------


def test_thousands_of_idle_keepalive_connections_neither_slow_a_client_nor_stay_open(
    served: Served,
) -> None:
    """Half send one request and idle; half send nothing. While all are open a new client is
    answered within a second, the daemon's memory grows by a few KiB per connection, and
    the keep-alive and header timeouts close every one."""
    held = min(HELD, served.max_connections - SPARE)
    assert held >= 1000, f"only {held} connections fit the daemon's descriptors (ulimit -Hn)"
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < held + 1000:
        resource.setrlimit(resource.RLIMIT_NOFILE, (min(hard, held + 1000), hard))
    daemon = served.daemon
    before = read_store(served.database_url)
    fds, rss = open_fds(daemon), rss_kib(daemon)
    selector = selectors.DefaultSelector()  # epoll: select() stops at descriptor 1024
    socks: list[socket.socket] = []
    first = time.monotonic()
    deadline = first + 30
    try:
        for n in range(held):
            if n % 500 == 0:  # a full accept queue drops SYNs: a connect would wait 1 s
                while open_fds(daemon) < fds + n - BACKLOG // 2:
                    assert time.monotonic() < deadline, f"{n} connections not accepted"
                    time.sleep(0.01)
            sock = socket.create_connection(("127.0.0.1", daemon.port), timeout=10)
            sock.setblocking(False)
            socks.append(sock)
            selector.register(sock, selectors.EVENT_READ)
        for sock in socks[::2]:
            sock.send(b"GET /api/ready HTTP/1.1\r\nHost: llmsvc\r\n\r\n")
        got = {sock: b"" for sock in socks}
        closed: set[socket.socket] = set()
        answered = 0
        while answered < len(socks[::2]):
            assert time.monotonic() < deadline, f"{answered} of {len(socks[::2])} answered"
            for key, _ in selector.select(1):
                sock = key.fileobj
                assert isinstance(sock, socket.socket)
                chunk = sock.recv(65536)
                assert chunk, "closed before the probe: raise HEADER_TIMEOUT"
                got[sock] += chunk
                answered += chunk.endswith(b"}")

        grown = rss_kib(daemon) - rss
        latency = serves_next(served, before)  # a new client, its chat request stored
        probed = time.monotonic() - first
        each = grown * 1024 / held
        print(
            f"{held} idle: {each:.0f} B each; a new client {latency * 1e3:.1f} ms at {probed:.1f} s"
        )

        while len(closed) < held:
            assert time.monotonic() < deadline, f"{held - len(closed)} of {held} still open"
            for key, _ in selector.select(1):
                sock = key.fileobj
                assert isinstance(sock, socket.socket)
                chunk = sock.recv(65536)
                got[sock] += chunk
                if not chunk:
                    closed.add(sock)
                    selector.unregister(sock)
    finally:
        selector.close()
        for sock in socks:
            sock.close()
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))

    assert probed < min(HEADER_TIMEOUT, KEEPALIVE), f"held {probed:.1f} s: raise the timeouts"
    assert latency < 1.0, f"a new client waited {latency:.2f} s"
    assert each < 32 * 1024, f"{grown} KiB for {held} connections"
    for n, sock in enumerate(socks):  # answered once, then closed without a word more
        assert responses(got[sock]) == ([200] if n % 2 == 0 else []), got[sock][:300]
    while open_fds(daemon) > fds + 4:  # closed on the daemon's side too
        assert time.monotonic() < deadline, f"{open_fds(daemon)} descriptors open"
        time.sleep(0.05)

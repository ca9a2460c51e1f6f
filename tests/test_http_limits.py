"""The HTTP layer's bounds, met by a real `llmsvc run` over real sockets (issue 13, 4 and 6).

A head past `max_header_bytes` gets 431 (414 for the request line) without the daemon
growing; a head or body that does not arrive in time gets 408, a silent connection and an
idle keep-alive one are closed; past `max_connections` a client gets a 503 naming the
limit, never a reset; a client that half-closes after its request still gets the answer;
one that closes at once is stored `interrupted`, not `completed`.
"""

from __future__ import annotations

import select
import socket
import threading
import time
import urllib.request
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import openai
import pytest
from daemon_process import LLMSVC, DaemonProcess, Stored, daemon_env, get_json, read_store
from raw_http import (
    CHAT,
    chat_request,
    connect,
    error_of,
    open_fds,
    read_response,
    read_until_closed,
    request_id_of,
    responses,
    rss_kib,
    status_of,
)

from llmsvc.gateway.http_protocol import LINGER_SECONDS, connection_bound

pytestmark = pytest.mark.timeout(60)

MiB = 1024 * 1024


def rejected_line(daemon: DaemonProcess, request: uuid.UUID) -> str:
    """The log line of a rejected request, found by its id once the daemon's output has it
    (written before the answer, but read from the daemon's pipe on a thread of its own)."""
    line = daemon.wait_for_log(f".* request_id={request} .*")[0]
    assert " rejected " in line, line
    assert daemon.log.count(f" request_id={request} ") == 1, daemon.log
    return line


def stored_when_settled(database_url: str, count: int, timeout: float = 15) -> Stored:
    """The store once `count` requests have ended in it."""
    deadline = time.monotonic() + timeout
    while True:
        store = read_store(database_url)
        ended = [r for r in store.requests.values() if r["status"] != "streaming"]
        if len(ended) >= count:
            return store
        assert time.monotonic() < deadline, f"{len(ended)} of {count} requests stored"
        time.sleep(0.05)


@pytest.fixture
def start(tmp_path: Path, sqlite_url: str) -> Iterator[Any]:
    """Starts `llmsvc run` on SQLite with the given settings; stopped at teardown."""
    daemons: list[DaemonProcess] = []

    def _start(database_url: str = sqlite_url, **settings: Any) -> DaemonProcess:
        daemon = DaemonProcess(daemon_env(database_url, tmp_path / "wal", **settings)).start()
        daemons.append(daemon)
        daemon.wait_caught_up()  # the store is migrated and the previous run's WAL replayed
        return daemon

    yield _start
    for daemon in daemons:
        if daemon.returncode is None:
            assert daemon.stop() == 0, daemon.log


# -- the head's size -------------------------------------------------------------------


def _send_tolerantly(sock: socket.socket, head: bytes, filler: bytes, total: int) -> None:
    """Send `head` then `total` filler bytes, stopping quietly once the daemon closes."""
    try:
        sock.sendall(head)
        for _ in range(total // len(filler)):
            sock.sendall(filler)
    except OSError:
        pass


@pytest.mark.parametrize(
    ("head", "status", "code", "why"),
    [
        (
            b"GET /api/health HTTP/1.1\r\nHost: llmsvc\r\nX-Big: ",
            431,
            "request_header_too_large",
            "max_header_bytes=65536",
        ),
        (b"GET /api/health?q=", 414, "uri_too_long", "max_header_bytes=65536"),
        (b"NOT HTTP AT ALL\r\n", 400, "invalid_request", "not valid HTTP/1.1"),
    ],
    ids=["64 MiB header", "64 MiB URL", "not HTTP"],
)
def test_a_huge_head_is_refused_at_the_cap_without_the_daemon_growing(
    start: Any, head: bytes, status: int, code: str, why: str
) -> None:
    daemon = start(max_header_bytes=65536)
    before = rss_kib(daemon)
    sock = connect(daemon)
    sender = threading.Thread(
        target=_send_tolerantly, args=(sock, head, b"a" * MiB, 64 * MiB), daemon=True
    )
    sender.start()

    response = read_until_closed(sock)

    sender.join(10)
    sock.close()
    assert status_of(response) == status
    error = error_of(response)
    assert error["code"] == code
    assert why in error["message"]
    line = rejected_line(daemon, request_id_of(response))
    assert f" status={status} code={code} " in line
    assert len(line) < 1000  # a 64 MiB URL is cut, not logged
    assert "?q=" not in line  # nor its query, which may carry what no log should
    grown = rss_kib(daemon) - before
    assert grown < 8 * 1024, f"the daemon grew by {grown} KiB"
    assert get_json(f"{daemon.base_url}/api/health")[0] == 200


def test_a_head_just_under_the_cap_is_served(start: Any) -> None:
    daemon = start(max_header_bytes=65536)
    head = b"GET /api/health HTTP/1.1\r\nHost: llmsvc\r\nConnection: close\r\nX-Big: "
    filler = b"a" * (65536 - len(head) - 4)
    sock = connect(daemon)
    sock.sendall(head + filler + b"\r\n\r\n")

    assert status_of(read_until_closed(sock)) == 200
    sock.close()


# -- timeouts --------------------------------------------------------------------------


def test_slow_and_silent_connections_are_closed_after_the_header_timeout(start: Any) -> None:
    daemon = start(request_header_timeout_seconds=1.5)
    silent = [connect(daemon) for _ in range(10)]
    slow = [connect(daemon) for _ in range(10)]
    for sock in slow[::2]:  # slowloris on a kept-alive connection: its second request's head
        sock.sendall(b"GET /api/ready HTTP/1.1\r\nHost: llmsvc\r\n\r\n")
        assert status_of(read_response(sock)) == 200
    trickle = b"GET /api/health HTTP/1.1\r\nHost: llmsvc\r\n" + b"X-Slow: " + b"a" * 100
    got: dict[socket.socket, bytes] = {}
    closed: set[socket.socket] = set()
    began = time.monotonic()

    for i in range(len(trickle)):  # a byte every 0.25 s, the head never finished
        if len(closed) == 20 or time.monotonic() - began > 15:
            break
        for sock in slow:
            if sock not in closed:
                sock.send(trickle[i : i + 1])
        readable, _, _ = select.select([s for s in silent + slow if s not in closed], [], [], 0.25)
        for sock in readable:
            chunk = sock.recv(65536)
            got[sock] = got.get(sock, b"") + chunk
            if not chunk or b"}" in chunk:  # the end, or a whole 408 (its FIN follows)
                closed.add(sock)

    assert len(closed) == 20, f"{20 - len(closed)} connections still open after 15 s"
    assert all(got.get(sock, b"") == b"" for sock in silent)  # closed without a word
    for sock in slow:
        assert status_of(got[sock]) == 408
        assert "request_header_timeout_seconds=1.5" in error_of(got[sock])["message"]
        assert " status=408 code=request_timeout " in rejected_line(
            daemon, request_id_of(got[sock])
        )
    for sock in silent + slow:
        sock.close()
    assert get_json(f"{daemon.base_url}/api/health")[0] == 200
    with urllib.request.urlopen(f"{daemon.base_url}/api/metrics", timeout=5) as metrics:
        assert 'llmsvc_http_refused_total{reason="header_timeout"} 20.0' in metrics.read().decode()


def test_a_body_that_does_not_finish_arriving_gets_408_and_nothing_is_stored(
    start: Any, sqlite_url: str
) -> None:
    daemon = start(request_body_timeout_seconds=1)
    whole = chat_request(stream=False)
    sock = connect(daemon)
    sock.sendall(whole[:-5])  # all but the body's last bytes

    response = read_until_closed(sock)

    sock.close()
    assert status_of(response) == 408
    assert "request_body_timeout_seconds=1" in error_of(response)["message"]
    line = rejected_line(daemon, request_id_of(response))  # the id its app had made
    assert f"rejected method=POST path={CHAT} status=408 code=request_timeout " in line
    assert read_store(sqlite_url).requests == {}


def test_an_idle_keepalive_connection_is_closed_after_the_keepalive_timeout(
    start: Any,
) -> None:
    daemon = start(keepalive_timeout_seconds=1)
    sock = connect(daemon)
    request = b"GET /api/ready HTTP/1.1\r\nHost: llmsvc\r\n\r\n"
    for _ in range(2):  # kept alive between requests
        sock.sendall(request)
        assert status_of(read_response(sock)) == 200

    # EOF, not a timeout: closed when idle (uvicorn's own default would take 5 s)
    assert read_until_closed(sock, timeout=4) == b""
    sock.close()


# -- the connection bound --------------------------------------------------------------


def test_past_max_connections_clients_get_503_and_are_never_reset(
    tmp_path: Path, sqlite_url: str
) -> None:
    """With 512 descriptors, 600 silent connections: normal clients get answers or a 503."""
    env = daemon_env(
        sqlite_url, tmp_path / "wal", request_header_timeout_seconds=4, max_connections=100_000
    )
    command = ["/bin/sh", "-c", 'ulimit -n 512 && exec "$0" run', str(LLMSVC)]
    bound = connection_bound(100_000, 512)
    with DaemonProcess(env, command=command) as daemon:
        assert f"max_connections lowered to {bound} " in daemon.log
        client = openai.OpenAI(
            base_url=f"{daemon.base_url}/v1", api_key="unused", max_retries=0, timeout=30
        )
        streaming = client.chat.completions.create(  # a client under the bound, mid-stream
            model="mock",
            messages=[{"role": "user", "content": "hi"}],
            max_tokens=40,
            stream=True,
            extra_body={"mock_delay_ms": 100},
        )
        first = next(iter(streaming))
        began = time.monotonic()
        silent = [connect(daemon) for _ in range(600)]
        # Wait until every refusal has been sent and its descriptor closed again.
        while open_fds(daemon) > bound + 64:
            assert time.monotonic() - began < 10, f"{open_fds(daemon)} descriptors open"
            time.sleep(0.05)
        # The last refusals linger for LINGER_SECONDS; past REFUSING_MAX lingering at once a
        # connection is closed unanswered (a flood), which is not what this client is.
        time.sleep(LINGER_SECONDS + 0.5)

        outcomes: list[str] = []
        refusals: list[openai.APIStatusError] = []
        while time.monotonic() - began < 15 and "answered" not in outcomes[-1:]:
            try:
                client.chat.completions.create(
                    model="mock", messages=[{"role": "user", "content": "hi"}], max_tokens=2
                )
                outcomes.append("answered")
            except openai.APIStatusError as exc:  # anything else (a reset) fails the test
                refusals.append(exc)
                outcomes.append("503")
                time.sleep(0.2)

        rest = [chunk for chunk in streaming]
        for sock in silent:
            sock.close()
        assert "503" in outcomes  # refused while the silent ones held every slot
        assert {exc.status_code for exc in refusals} == {503}
        assert all("max_connections" in exc.message for exc in refusals)
        assert all(uuid.UUID(exc.response.headers["x-request-id"]) for exc in refusals)
        assert outcomes[-1] == "answered"  # served once the header timeout closed them
        assert first.choices[0].delta.role == "assistant"
        assert rest[-1].choices[0].finish_reason is not None  # never reset mid-stream
        assert "Too many open files" not in daemon.log
        assert "Traceback" not in daemon.log, daemon.log


# -- half-closed and vanished clients ---------------------------------------------------


@pytest.mark.parametrize("stream", [False, True], ids=["whole", "stream"])
def test_a_half_closed_client_gets_its_answer(start: Any, sqlite_url: str, stream: bool) -> None:
    daemon = start()
    sock = connect(daemon)
    sock.sendall(chat_request(stream))
    sock.shutdown(socket.SHUT_WR)  # as `nc -N` does: still reading

    response = read_until_closed(sock)

    sock.close()
    assert status_of(response) == 200
    assert response.endswith(b"data: [DONE]\n\n\r\n0\r\n\r\n" if stream else b"}")
    (request,) = stored_when_settled(sqlite_url, 1).requests.values()
    assert request["status"] == "completed"


def test_half_closed_pipelined_requests_are_all_answered_without_tracebacks(
    start: Any, sqlite_url: str
) -> None:
    daemon = start()
    sock = connect(daemon)
    sock.sendall(chat_request(True) + chat_request(False) + chat_request(True))
    sock.shutdown(socket.SHUT_WR)

    data = read_until_closed(sock)

    sock.close()
    assert responses(data) == [200, 200, 200]
    store = stored_when_settled(sqlite_url, 3)
    assert sorted(r["status"] for r in store.requests.values()) == ["completed"] * 3
    assert "Traceback" not in daemon.log, daemon.log
    assert " ERROR " not in daemon.log, daemon.log


@pytest.mark.parametrize(("stream", "tokens"), [(True, 1), (False, 1)], ids=["stream", "whole"])
def test_a_client_that_closes_at_once_is_stored_interrupted_with_its_tokens(
    start: Any, database_url: str, stream: bool, tokens: int
) -> None:
    daemon = start(database_url)
    for _ in range(10):
        sock = connect(daemon)
        # A half-closed connection is still answered, so the close is seen by a write: a
        # stream's first token (20 ms in) finds the client gone before the next, a whole
        # reply (100 ms) at once. An instant stream could end within one step of its task,
        # before the loop learns of the reset: a reply the client missed, stored completed.
        sock.sendall(chat_request(stream, tokens=5, delay_ms=20))
        sock.close()

    # Every request has ended once; a reply's write that finds the client gone journals its
    # ends again, interrupted, and a flush between the two stores `completed` for a moment.
    # The drain stores what was journaled before the daemon exits.
    stored_when_settled(database_url, 10)
    assert daemon.stop() == 0, daemon.log
    store = read_store(database_url)

    assert [r["status"] for r in store.requests.values()] == ["interrupted"] * 10
    for request_id, request in store.requests.items():
        assert request["error"] == "client disconnected"
        attempt = store.only_attempt(request_id)
        assert attempt["status"] == "interrupted"
        assert attempt["token_count"] == tokens
        assert len(store.tokens[attempt["id"]]) == tokens  # every journaled token stored
    assert "Traceback" not in daemon.log, daemon.log

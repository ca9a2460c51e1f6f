"""End to end: the official `openai` SDK → `llmsvc run` → a real OpenAI-compatible upstream.

Real processes, real sockets, real signals, a real SQLite file or PostgreSQL database. The
judge is the invariant: what a client received, the store holds, exactly once, in order.
"""

from __future__ import annotations

import concurrent.futures
import json
import re
import socket
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import openai
import pytest
from daemon_process import DaemonProcess, UpstreamProcess, daemon_env, read_store, run_cli
from raw_http import dechunk

pytestmark = pytest.mark.timeout(90)

KEY = "sk-upstream-secret"
MESSAGES: list[Any] = [{"role": "user", "content": "count for me"}]
FAIL = "X-Upstream-Fail"


def upstream_text(n: int) -> str:
    """What the upstream sends for `max_tokens=n` (tests/upstreams/openai_upstream.py)."""
    return "".join(f"t{i} " for i in range(n))


@dataclass
class Received:
    """What one client call got: the request id header and every token, in order."""

    request_id: str
    stream: bool
    headers: dict[str, str] = field(default_factory=dict)
    tokens: list[str] = field(default_factory=list)
    usage: Any = None
    error: Exception | None = None

    @property
    def text(self) -> str:
        return "".join(self.tokens)


def stream(client: openai.OpenAI, model: str, n: int, **kwargs: Any) -> Received:
    raw = client.chat.completions.with_raw_response.create(
        model=model,
        messages=MESSAGES,
        max_tokens=n,
        stream=True,
        stream_options={"include_usage": True},
        **kwargs,
    )
    got = Received(raw.headers["x-request-id"], True, dict(raw.headers))
    try:
        for chunk in raw.parse():
            if chunk.usage is not None:
                got.usage = chunk.usage
            for choice in chunk.choices:
                if choice.delta.content:
                    got.tokens.append(choice.delta.content)
    except openai.APIError as exc:
        got.error = exc
    return got


def complete(client: openai.OpenAI, model: str, n: int, **kwargs: Any) -> Received:
    raw = client.chat.completions.with_raw_response.create(
        model=model, messages=MESSAGES, max_tokens=n, **kwargs
    )
    completion = raw.parse()
    content = completion.choices[0].message.content
    assert content is not None
    return Received(
        raw.headers["x-request-id"], False, dict(raw.headers), [content], completion.usage
    )


def providers(up: UpstreamProcess) -> str:
    """`gpt-test` served normally; `gpt-500` and `gpt-broken` by steered paths of one upstream.

    llmsvc forwards a client's body, not its headers, so `X-Upstream-Fail` cannot come
    from the client: each failure mode is a provider of its own (tests/daemon_process.py).
    """
    entries = [
        ("upstream", up.base_url, "gpt-test"),
        ("upstream-500", up.steered_url(FAIL, "status:500"), "gpt-500"),
        ("upstream-broken", up.steered_url(FAIL, "after:3"), "gpt-broken"),
    ]
    return json.dumps(
        [
            {"name": name, "kind": "openai", "base_url": url, "api_key": KEY, "models": [model]}
            for name, url, model in entries
        ]
    )


@pytest.fixture
def upstream() -> Iterator[UpstreamProcess]:
    # A small pace per token, so concurrent streams really overlap inside the daemon.
    with UpstreamProcess(api_key=KEY, token_delay_ms=2) as up:
        yield up


@pytest.fixture
def env(database_url: str, tmp_path: Path, upstream: UpstreamProcess) -> dict[str, str]:
    return daemon_env(database_url, tmp_path / "wal", providers=providers(upstream))


def client_for(daemon: DaemonProcess) -> openai.OpenAI:
    return openai.OpenAI(
        base_url=f"{daemon.base_url}/v1", api_key="unused", max_retries=0, timeout=30
    )


def test_every_token_a_client_received_is_stored_once_in_order(
    env: dict[str, str], database_url: str
) -> None:
    got: list[Received] = []
    with DaemonProcess(env) as daemon, client_for(daemon) as client:
        got.append(stream(client, "gpt-test", 5))
        got.append(complete(client, "gpt-test", 7))
        calls = [(stream, 20), (stream, 30), (stream, 40), (stream, 50)]
        calls += [(complete, 10), (complete, 12)]
        with concurrent.futures.ThreadPoolExecutor(len(calls)) as pool:
            futures = [pool.submit(call, client, "gpt-test", n) for call, n in calls]
            got += [f.result(timeout=30) for f in futures]
        got.append(stream(client, "gpt-test", 3))
        assert daemon.stop() == 0, daemon.log
    wal_end = int(re.findall(r"wal closed next_lsn=(\d+)", daemon.log)[-1]) - 1

    sizes = [5, 7, *(n for _, n in calls), 3]
    for received, n in zip(got, sizes, strict=True):
        assert received.error is None
        assert received.text == upstream_text(n)  # the client got the whole reply
        assert received.usage.completion_tokens == n
    assert len({r.request_id for r in got}) == len(got)

    store = read_store(database_url)
    assert len(store.requests) == len(got)
    for received, n in zip(got, sizes, strict=True):
        request = store.request(received.request_id)
        attempt = store.only_attempt(received.request_id)
        assert (request["status"], attempt["status"]) == ("completed", "completed")
        assert (request["provider"], attempt["provider"]) == ("upstream", "upstream")
        assert (request["prompt_tokens"], request["completion_tokens"]) == (3, n)
        assert store.texts(received.request_id) == received.tokens
        assert attempt["token_count"] == len(received.tokens)
        assert attempt["http_status"] == 200
    # Every record the daemon wrote is in the database, the checkpoint says so...
    assert list(store.checkpoints.values()) == [wal_end]
    # ...and a restart finds nothing left to replay and nothing left open.
    with DaemonProcess(env) as again:
        assert again.stop() == 0, again.log
    assert "boot: wal replayed records=0 " in again.log
    assert "marked interrupted count=0" in again.log
    assert "boot: consistency check ok gaps=0 count_mismatches=0" in again.log


def test_a_client_that_stops_reading_mid_stream_gets_every_token_in_order_later(
    env: dict[str, str], database_url: str
) -> None:
    """Tokens are written to a reading client from the upstream connection's callback; one
    that stops reading makes the daemon wait for it (its socket buffers fill), and what it
    reads later is the whole reply, in order, as stored."""
    n = 3000  # ~600 KB of frames at 2 ms a token: far past what the sockets buffer
    body = json.dumps(
        {"model": "gpt-test", "messages": MESSAGES, "max_tokens": n, "stream": True}
    ).encode()
    with DaemonProcess(env) as daemon:
        sock = socket.socket()
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        sock.connect(("127.0.0.1", daemon.port))
        head = (
            f"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json"
            f"\r\nContent-Length: {len(body)}\r\nConnection: close\r\n\r\n"
        )
        sock.sendall(head.encode() + body)
        first = sock.recv(4096)
        assert first.startswith(b"HTTP/1.1 200"), first
        time.sleep(3)  # not reading while the upstream sends most of the reply
        raw = bytearray(first)
        while chunk := sock.recv(65536):
            raw += chunk
        sock.close()
        assert daemon.stop() == 0, daemon.log

    head_end = raw.index(b"\r\n\r\n") + 4
    headers = bytes(raw[:head_end]).lower()
    assert b"transfer-encoding: chunked" in headers
    whole = dechunk(bytes(raw[head_end:]))
    assert whole is not None, "the body did not end with its last chunk"
    events = [json.loads(line[6:]) for line in whole[0].split(b"\n\n")
              if line.startswith(b"data: {")]  # fmt: skip
    tokens = [e["choices"][0]["delta"].get("content") for e in events if e["choices"]]
    tokens = [t for t in tokens if t]
    assert "".join(tokens) == upstream_text(n)
    request_id = uuid.UUID(events[0]["id"].removeprefix("chatcmpl-"))
    stored = read_store(database_url)
    assert stored.request(request_id)["status"] == "completed"
    assert stored.texts(request_id) == tokens


def test_status_and_show_list_what_clients_received(env: dict[str, str], database_url: str) -> None:
    with DaemonProcess(env) as daemon, client_for(daemon) as client:
        got = [stream(client, "gpt-test", 6), complete(client, "gpt-test", 4)]
        assert daemon.stop() == 0, daemon.log

    status = run_cli(env, "status", "--json")
    assert status.returncode == 0, status.stderr
    listed = {row["id"]: row for row in json.loads(status.stdout)}
    assert set(listed) == {r.request_id for r in got}
    for received in got:
        row = listed[received.request_id]
        assert (row["model"], row["provider"]) == ("gpt-test", "upstream")
        assert (row["status"], row["stream"]) == ("completed", received.stream)
        assert row["completion_tokens"] == len(received.text.split())
    for received in got:
        show = run_cli(env, "show", received.request_id, "--json")
        assert show.returncode == 0, show.stderr
        doc = json.loads(show.stdout)
        assert doc["request"]["id"] == received.request_id
        assert doc["request"]["status"] == "completed"
        assert [a["text"] for a in doc["attempts"]] == [received.text]
    missing = run_cli(env, "show", str(uuid.uuid4()), "--json")
    assert missing.returncode == 1
    assert missing.stderr.startswith("llmsvc: no request ")


TRACE_ID = "4bf92f3577b34da6a3ce929d0e0e4736"


def test_correlation_ids_are_echoed_and_stored_as_sent(
    env: dict[str, str], database_url: str
) -> None:
    """Ids applications already send (not UUIDs) are taken as they are; a W3C traceparent
    gives its trace id when no X-Correlation-ID comes; an id past the rule, like `n: 2`, is
    refused with a request id, stored nowhere and logged once."""
    prefixed, decimal = "req_01HZX3K9Q7V5M2N8P4R6T0W1Y3", "8472937462918374659"
    traceparent = f"00-{TRACE_ID}-00f067aa0ba902b7-01"
    with DaemonProcess(env) as daemon, client_for(daemon) as client:
        streamed = stream(client, "gpt-test", 4, extra_headers={"X-Correlation-ID": prefixed})
        whole = complete(client, "gpt-test", 4, extra_headers={"X-Correlation-ID": decimal})
        traced = complete(client, "gpt-test", 2, extra_headers={"traceparent": traceparent})
        fresh = complete(client, "gpt-test", 2)
        with pytest.raises(openai.BadRequestError) as bad:
            complete(client, "gpt-test", 2, extra_headers={"X-Correlation-ID": "x" * 129})
        with pytest.raises(openai.BadRequestError) as many:
            client.chat.completions.create(model="gpt-test", messages=MESSAGES, n=2)
        assert daemon.stop() == 0, daemon.log
    assert "the X-Correlation-ID header is 129 bytes long" in bad.value.message
    assert many.value.message.endswith("send n requests for n choices")
    for refused in (bad.value, many.value):  # not stored, but answered and logged by an id
        request_id = refused.response.headers["x-request-id"]
        assert f" status=400 code=invalid_request request_id={request_id} " in daemon.log
    assert streamed.headers["x-correlation-id"] == prefixed
    assert whole.headers["x-correlation-id"] == decimal
    assert traced.headers["x-correlation-id"] == TRACE_ID
    assert uuid.UUID(fresh.headers["x-correlation-id"])  # one is made up when none is sent

    store = read_store(database_url)
    assert len(store.requests) == 4  # the refused request left nothing behind
    for received in (streamed, whole, traced, fresh):
        stored = store.request(received.request_id)["correlation_id"]
        assert stored == received.headers["x-correlation-id"]


def test_upstream_failures_reach_the_client_and_the_store(
    env: dict[str, str], database_url: str
) -> None:
    with DaemonProcess(env) as daemon, client_for(daemon) as client:
        # Before the first token: a plain HTTP error, no stream.
        with pytest.raises(openai.APIStatusError) as before:
            stream(client, "gpt-500", 10)
        with pytest.raises(openai.APIStatusError) as whole:
            complete(client, "gpt-500", 10)
        # Mid-stream: the tokens so far, then an error event.
        broken = stream(client, "gpt-broken", 10)
        assert daemon.stop() == 0, daemon.log

    assert before.value.status_code == 502
    assert whole.value.status_code == 502
    # The upstream sent three tokens before it dropped the connection: all three reach the
    # client (the upstream client hands over what it read before the break), and the store
    # must hold exactly what the client got.
    assert broken.tokens == ["t0 ", "t1 ", "t2 "]
    assert isinstance(broken.error, openai.APIError)

    store = read_store(database_url)
    assert len(store.requests) == 3
    # An error before the first byte carries the X-Request-ID of the request it stored.
    for failed, streamed in ((before, True), (whole, False)):
        request = store.request(failed.value.response.headers["x-request-id"])
        assert (request["model"], request["stream"]) == ("gpt-500", streamed)
        attempts = store.attempts[request["id"]]
        assert [a["attempt_no"] for a in attempts] == [1, 2]  # a 500 is retried once
        assert {(a["status"], a["http_status"]) for a in attempts} == {("failed", 500)}
        assert request["status"] == "failed"
        assert all(not store.tokens.get(a["id"]) for a in attempts)
    request = store.request(broken.request_id)
    attempt = store.only_attempt(broken.request_id)
    assert (request["status"], attempt["status"]) == ("failed", "failed")
    assert store.texts(broken.request_id) == broken.tokens
    assert attempt["token_count"] == len(broken.tokens)

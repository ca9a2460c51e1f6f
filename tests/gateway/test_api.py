"""The HTTP API end to end: a real socket, real uvicorn, a real WAL.

Bad input gets a 4xx in OpenAI's error shape naming the problem, and the WAL
gets nothing. Good input streams what the mock sends, and the WAL holds what
the client was sent.

`served` builds what the daemon builds (WalWriter, Journal, Router, Gateway)
minus the store, and serves it with uvicorn on 127.0.0.1 in the test's event
loop. Two providers: the mock (model `mock`) and an OpenAI-kind provider whose
port is bound but never listening, so every call to it is refused.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import re
import socket
import uuid
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp
import anyio
import orjson
import pytest
import uvicorn
from policies import circuit_policy, retry_policy, wal_policy
from pydantic import SecretStr

from llmsvc.config import ProviderConfig
from llmsvc.errors import BodyTooLarge, ClientError, WalFatal
from llmsvc.gateway import app, rejections
from llmsvc.gateway.app import Gateway
from llmsvc.gateway.attribution import Attribution
from llmsvc.gateway.breaker import Breakers
from llmsvc.gateway.chat import Exchange
from llmsvc.gateway.errors import describe
from llmsvc.gateway.journal import Journal
from llmsvc.gateway.request import MAX_DEPTH, ChatRequest
from llmsvc.gateway.router import Router
from llmsvc.providers import build_provider
from llmsvc.providers.mock import token
from llmsvc.wal.codec import MAX_PAYLOAD, RecordType, decode_json, decode_token
from llmsvc.wal.reader import WalReader
from llmsvc.wal.segment import instance_id
from llmsvc.wal.writer import WalWriter

MAX_BODY_BYTES = 4096
UNREACHABLE_KEY = "sk-unreachable-0123456789abcdef"
UNREACHABLE_MODEL = "far-model"


class _QuietServer(uvicorn.Server):
    """uvicorn without its signal handlers: pytest owns the process's signals."""

    @contextlib.contextmanager
    def capture_signals(self) -> Iterator[None]:
        yield


@dataclass
class Served:
    """A running gateway: its URL, its parts, and what its WAL holds."""

    url: str
    host: str
    port: int
    gateway: Gateway
    writer: WalWriter
    wal_dir: Path
    wal_id: uuid.UUID
    session: aiohttp.ClientSession

    async def records(self) -> list[tuple[RecordType, Any]]:
        """Every record journaled so far, decoded: JSON bodies, or token tuples."""
        reader = WalReader(self.wal_dir, self.wal_id)
        try:
            await reader.seek(1)
            raw: list[tuple[int, bytes]] = []
            while batch := await reader.read(self.writer.end, 1000):
                raw += batch
        finally:
            await reader.close()
        return [
            (
                RecordType(rtype),
                decode_token(payload) if rtype == RecordType.TOKEN else decode_json(payload),
            )
            for rtype, payload in raw
        ]


@pytest.fixture
def refused_port() -> Iterator[int]:
    """A port bound but not listening: connecting to it is refused, and nobody else gets it."""
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    try:
        yield sock.getsockname()[1]
    finally:
        sock.close()


@pytest.fixture
async def served(
    tmp_path: Path, refused_port: int, monkeypatch: pytest.MonkeyPatch
) -> AsyncIterator[Served]:
    # Each test has the rejected-request log's budget to itself, whatever ran the same second.
    monkeypatch.setattr(rejections, "_budget", rejections._Budget())
    wal_dir = tmp_path / "wal"
    wal_dir.mkdir()
    wal_id = instance_id(wal_dir)
    fatal: list[WalFatal] = []
    writer = WalWriter(wal_dir, wal_id, wal_policy())
    writer.open(asyncio.get_running_loop(), fatal.append)

    configs = [
        ProviderConfig(name="mock", kind="mock", models=["mock"]),
        ProviderConfig(
            name="far",
            kind="openai",
            base_url=f"http://127.0.0.1:{refused_port}/v1",
            api_key=SecretStr(UNREACHABLE_KEY),
            models=[UNREACHABLE_MODEL],
            timeout_seconds=5,
        ),
    ]
    providers = {c.name: build_provider(c) for c in configs}
    gateway = Gateway(
        Journal(writer),
        Router(configs, providers, Breakers(circuit_policy())),
        max_body_bytes=MAX_BODY_BYTES,
        policy=retry_policy(),
    )

    listener = socket.socket()
    listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    listener.bind(("127.0.0.1", 0))
    host, port = listener.getsockname()
    config = uvicorn.Config(
        gateway,
        http="httptools",
        lifespan="off",
        log_config=None,
        access_log=False,
        timeout_graceful_shutdown=2,
    )
    server = _QuietServer(config)
    task = asyncio.create_task(server.serve(sockets=[listener]))
    try:
        async with asyncio.timeout(5):
            while not server.started:
                if task.done():
                    task.result()  # raises why it did not start
                    pytest.fail("uvicorn stopped before it started")
                await asyncio.sleep(0.01)
        async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=10)) as session:
            yield Served(
                f"http://{host}:{port}", host, port, gateway, writer, wal_dir, wal_id, session
            )
    finally:
        server.should_exit = True
        await asyncio.wait_for(task, timeout=10)
        listener.close()
        for provider in providers.values():
            await provider.close()
        await writer.close()
    assert not fatal, f"the WAL failed: {fatal}"


CHAT = "/v1/chat/completions"
MESSAGES = [{"role": "user", "content": "hello there"}]  # two prompt tokens to the mock
ERROR_KEYS = {"message", "type", "param", "code"}


async def _post(served: Served, body: Any, **headers: str) -> tuple[int, dict[str, str], bytes]:
    """POST a body (a dict becomes JSON; bytes go as they are) and read the whole response."""
    data = body if isinstance(body, bytes) else orjson.dumps(body)
    headers = {"Content-Type": "application/json", **headers}
    async with served.session.post(served.url + CHAT, data=data, headers=headers) as r:
        return r.status, dict(r.headers), await r.read()


def _error(status: int, raw: bytes, expected_status: int) -> dict[str, Any]:
    """The OpenAI `error` object of a response, after checking its shape."""
    assert status == expected_status, raw
    doc = orjson.loads(raw)
    assert set(doc) == {"error"}
    assert set(doc["error"]) == ERROR_KEYS
    assert isinstance(doc["error"]["message"], str)
    assert doc["error"]["message"]
    return dict(doc["error"])


async def _assert_nothing_recorded(served: Served) -> None:
    assert served.writer.appended_lsn == 0
    assert await served.records() == []


def _events(raw: bytes) -> list[bytes]:
    """The data payloads of an SSE body, which must end with a complete event."""
    assert raw.endswith(b"\n\n"), raw[-200:]
    events = raw[:-2].split(b"\n\n")
    assert all(e.startswith(b"data: ") for e in events), events
    return [e[len(b"data: ") :] for e in events]


async def _raw_http(served: Served, request: bytes) -> tuple[int, bytes]:
    """Send exact request bytes and read the response until the server closes."""
    reader, writer = await asyncio.open_connection(served.host, served.port)
    try:
        writer.write(request)
        await writer.drain()
        async with asyncio.timeout(5):
            response = await reader.read()
    finally:
        writer.close()
        await writer.wait_closed()
    head, _, body = response.partition(b"\r\n\r\n")
    status = int(head.split(b" ", 2)[1])
    return status, body


def _by_type(records: list[tuple[RecordType, Any]], rtype: RecordType) -> list[Any]:
    return [body for t, body in records if t == rtype]


# --- bad input: a clear 4xx, and nothing journaled -------------------------------------


@pytest.mark.parametrize(
    "body",
    [b'{"model": "mock", "messages": ', b"", b"\xff\xfe", b"not json"],
    ids=["truncated", "empty", "not-utf8", "bare-words"],
)
async def test_malformed_json_is_400_and_records_nothing(served: Served, body: bytes) -> None:
    error = _error(*(await _post(served, body))[::2], 400)
    assert "not valid JSON" in error["message"]
    assert error["type"] == "invalid_request_error"
    assert error["param"] is None
    await _assert_nothing_recorded(served)


@pytest.mark.parametrize("body", [[1, 2], "chat", 42, None], ids=["list", "str", "int", "null"])
async def test_body_that_is_not_an_object_is_400_and_records_nothing(
    served: Served, body: Any
) -> None:
    error = _error(*(await _post(served, body))[::2], 400)
    assert "JSON object" in error["message"]
    await _assert_nothing_recorded(served)


def _chat(**fields: Any) -> dict[str, Any]:
    """A valid request to the mock, with fields changed; a field set to _DROP is left out."""
    body = {"model": "mock", "messages": MESSAGES, **fields}
    return {k: v for k, v in body.items() if v is not _DROP}


_DROP = object()
INVALID_FIELDS = {
    "model-missing": (_chat(model=_DROP), "model"),
    "model-int": (_chat(model=5), "model"),
    "model-empty": (_chat(model=""), "model"),
    "messages-missing": (_chat(messages=_DROP), "messages"),
    "messages-empty": (_chat(messages=[]), "messages"),
    "messages-str": (_chat(messages="hello"), "messages"),
    "message-str": (_chat(messages=["hello"]), "messages.0"),
    "role-invalid": (_chat(messages=[{"role": "robot", "content": "hi"}]), "messages.0.role"),
    "role-missing": (_chat(messages=[{"content": "hi"}]), "messages.0.role"),
    "stream-yes": (_chat(stream="yes"), "stream"),
    "max_tokens-negative": (_chat(max_tokens=-1), "max_tokens"),
    "max_tokens-zero": (_chat(max_tokens=0), "max_tokens"),
    "max_tokens-str": (_chat(max_tokens="5"), "max_tokens"),
    "max_completion_tokens-negative": (_chat(max_completion_tokens=-3), "max_completion_tokens"),
    "temperature-9": (_chat(temperature=9), "temperature"),
    "temperature-str": (_chat(temperature="hot"), "temperature"),
    "mock_delay_ms-negative": (_chat(mock_delay_ms=-1), "mock_delay_ms"),
    "n-2": (_chat(n=2), "n"),  # one choice per request: the store keeps one reply
    "include_usage-int": (
        _chat(stream=True, stream_options={"include_usage": 1}),
        "stream_options.include_usage",
    ),
}


@pytest.mark.parametrize(("body", "field"), list(INVALID_FIELDS.values()), ids=list(INVALID_FIELDS))
async def test_invalid_field_is_400_naming_it_and_records_nothing(
    served: Served, body: dict[str, Any], field: str
) -> None:
    error = _error(*(await _post(served, body))[::2], 400)
    assert error["param"] == field
    assert error["message"].startswith(f"{field}: ")
    assert error["type"] == "invalid_request_error"
    assert error["code"] == "invalid_request"
    await _assert_nothing_recorded(served)


async def test_invalid_content_is_400_naming_the_field_not_a_union_member(
    served: Served,
) -> None:
    """`content` may be a string, a list of parts or null; the param is the field's path."""
    body = _chat(messages=[{"role": "user", "content": 5}])
    error = _error(*(await _post(served, body))[::2], 400)
    assert error["param"] == "messages.0.content"
    assert error["message"].startswith("messages.0.content: ")
    await _assert_nothing_recorded(served)


def _nested_body(levels: int) -> bytes:
    """A valid request `levels` deep in all, written as bytes: orjson cannot write past 254."""
    inner = levels - 1
    return orjson.dumps(_chat())[:-1] + b',"payload":' + b"[" * inner + b"]" * inner + b"}"


@pytest.mark.parametrize("levels", [MAX_DEPTH + 1, 255, 1024])
async def test_a_body_nested_past_the_depth_limit_is_400_naming_it_in_one_line(
    served: Served, levels: int, caplog: pytest.LogCaptureFixture
) -> None:
    """Past the limit, below and beyond what the WAL's encoder takes: 400 and the one line of
    a rejected request, not a traceback."""
    with caplog.at_level(logging.INFO):
        error = _error(*(await _post(served, _nested_body(levels)))[::2], 400)
    assert f"deeper than {MAX_DEPTH} levels" in error["message"]
    lines = [
        (r.levelno, r.exc_info, r.getMessage().split()[0])
        for r in caplog.records
        if r.name != "uvicorn.access"
    ]
    assert lines == [(logging.INFO, None, "rejected")]
    await _assert_nothing_recorded(served)


async def test_a_body_at_the_depth_limit_is_served_and_journaled(served: Served) -> None:
    status, _, raw = await _post(served, _nested_body(MAX_DEPTH))
    assert status == 200, raw
    (start,) = _by_type(await served.records(), RecordType.REQUEST_START)
    assert start["params"]["payload"] == orjson.loads(_nested_body(MAX_DEPTH))["payload"]


async def test_a_start_record_the_wal_cannot_encode_is_a_client_error_logged_once(
    served: Served, caplog: pytest.LogCaptureFixture
) -> None:
    """The backstop behind the depth limit: an exchange given a body too deep to encode
    journals nothing, logs its one request line and raises what errors.py makes a 400."""
    data = _chat()
    for _ in range(300):
        data["payload"] = {"k": data.get("payload")}
    gateway = served.gateway
    sent: list[Any] = []

    async def send(message: Any) -> None:
        sent.append(message)

    async def receive() -> Any:
        return {"type": "http.request", "body": b""}

    exchange = Exchange(
        gateway.journal, gateway.router, gateway.policy, data,
        ChatRequest.model_validate(data), uuid.uuid4(), "corr", send, receive, lambda: False,
        caller=None, attribution=Attribution(),
    )  # fmt: skip
    with caplog.at_level(logging.INFO), pytest.raises(ClientError) as raised:
        await exchange.run(anyio.CancelScope())

    assert "cannot be journaled" in str(raised.value)
    assert describe(raised.value)[0] == 400
    assert (exchange.status, sent) == ("failed", [])
    assert [(r.levelno, r.getMessage().split()[0]) for r in caplog.records] == [
        (logging.INFO, "request")
    ]
    await _assert_nothing_recorded(served)


async def test_a_start_record_past_the_wals_record_limit_is_413_and_records_nothing(
    served: Served,
) -> None:
    """Only a max_body_bytes raised far past its default can get here: a record the WAL
    would read back as damage is refused instead of journaled."""
    messages = [{"role": "user", "content": "x" * MAX_PAYLOAD}]
    with pytest.raises(BodyTooLarge) as raised:
        served.gateway.journal.request_start(uuid.uuid4(), "corr", "mock", False,
                                             messages, {})  # fmt: skip

    assert describe(raised.value)[0] == 413
    await _assert_nothing_recorded(served)


async def test_unknown_model_is_404_model_not_found_and_records_nothing(served: Served) -> None:
    status, _, raw = await _post(served, {"model": "gpt-nowhere", "messages": MESSAGES})
    error = _error(status, raw, 404)
    assert error["code"] == "model_not_found"
    assert error["param"] == "model"
    assert "gpt-nowhere" in error["message"]
    await _assert_nothing_recorded(served)


async def test_body_declared_over_the_limit_is_413_before_it_is_sent(served: Served) -> None:
    """The declared length is enough: the server answers without waiting for the body."""
    request = (
        f"POST {CHAT} HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
        f"Content-Length: {MAX_BODY_BYTES + 1}\r\nConnection: close\r\n\r\n"
    ).encode()
    status, raw = await _raw_http(served, request)
    error = _error(status, raw, 413)
    assert error["code"] == "request_too_large"
    assert str(MAX_BODY_BYTES) in error["message"]
    await _assert_nothing_recorded(served)


async def test_chunked_body_over_the_limit_is_413(served: Served) -> None:
    """No Content-Length to trust: the limit is enforced while reading."""
    body = orjson.dumps(
        {"model": "mock", "messages": [{"role": "user", "content": "x" * MAX_BODY_BYTES}]}
    )
    chunks = b"".join(
        b"%x\r\n%s\r\n" % (len(body[i : i + 1000]), body[i : i + 1000])
        for i in range(0, len(body), 1000)
    )
    request = (
        (
            f"POST {CHAT} HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
            "Transfer-Encoding: chunked\r\nConnection: close\r\n\r\n"
        ).encode()
        + chunks
        + b"0\r\n\r\n"
    )
    status, raw = await _raw_http(served, request)
    error = _error(status, raw, 413)
    assert error["code"] == "request_too_large"
    assert str(MAX_BODY_BYTES) in error["message"]
    await _assert_nothing_recorded(served)


async def test_chunked_body_under_the_limit_is_served(served: Served) -> None:
    """The other side of the limit: a chunked body that fits is read whole."""
    body = orjson.dumps({"model": "mock", "messages": MESSAGES, "max_tokens": 2})
    request = (
        f"POST {CHAT} HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
        "Transfer-Encoding: chunked\r\nConnection: close\r\n\r\n"
    ).encode()
    for i in range(0, len(body), 7):
        request += b"%x\r\n%s\r\n" % (len(body[i : i + 7]), body[i : i + 7])
    status, raw = await _raw_http(served, request + b"0\r\n\r\n")
    assert status == 200, raw
    assert orjson.loads(raw)["choices"][0]["message"]["content"] == token(0) + token(1)


@pytest.mark.parametrize("value", ["x" * 129, "two words", ""], ids=["long", "space", "empty"])
async def test_invalid_correlation_id_is_400_and_records_nothing(
    served: Served, value: str
) -> None:
    body = {"model": "mock", "messages": MESSAGES}
    error = _error(*(await _post(served, body, **{"X-Correlation-ID": value}))[::2], 400)
    assert error["message"].startswith("the X-Correlation-ID header ")
    assert "1 to 128 visible ASCII characters" in error["message"]
    await _assert_nothing_recorded(served)


@pytest.mark.parametrize(
    "value",
    [
        "req_8d2f0c",
        "12345678901234567890",
        "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
    ],
    ids=["prefixed", "decimal", "traceparent"],
)
async def test_a_correlation_id_that_is_not_a_uuid_is_echoed_and_journaled_as_sent(
    served: Served, value: str
) -> None:
    body = {"model": "mock", "messages": MESSAGES, "max_tokens": 1}
    status, headers, raw = await _post(served, body, **{"X-Correlation-ID": value})
    assert status == 200, raw
    assert headers["X-Correlation-ID"] == value
    [start] = _by_type(await served.records(), RecordType.REQUEST_START)
    assert start["correlation_id"] == value


@pytest.mark.parametrize("path", ["/", "/v1/chat", "/v1/chat/completions/", "/v1/models/mock"])
async def test_unknown_path_is_404_and_records_nothing(served: Served, path: str) -> None:
    async with served.session.post(served.url + path, json={"model": "mock"}) as r:
        error = _error(r.status, await r.read(), 404)
    assert error["code"] == "not_found"
    assert path in error["message"]
    await _assert_nothing_recorded(served)


WRONG_METHODS = [("GET", CHAT, "POST"), ("PUT", CHAT, "POST"), ("POST", "/v1/models", "GET")]


@pytest.mark.parametrize(("method", "path", "allowed"), WRONG_METHODS)
async def test_wrong_method_is_405_naming_the_allowed_one_and_records_nothing(
    served: Served, method: str, path: str, allowed: str
) -> None:
    body = orjson.dumps({"model": "mock", "messages": MESSAGES})
    async with served.session.request(method, served.url + path, data=body) as r:
        error = _error(r.status, await r.read(), 405)
    assert error["code"] == "method_not_allowed"
    assert allowed in error["message"]
    await _assert_nothing_recorded(served)


async def test_405_carries_the_allow_header(served: Served) -> None:
    """RFC 9110 section 15.5.6: a 405 response MUST list the allowed methods in Allow."""
    allow = {}
    for method, path, _ in WRONG_METHODS:
        async with served.session.request(method, served.url + path) as r:
            assert r.status == 405
            allow[method, path] = r.headers.get("Allow")
    assert allow == {(method, path): allowed for method, path, allowed in WRONG_METHODS}


REJECTED = [
    ("POST", "/nowhere", b"{}", 404, "not_found"),
    ("GET", CHAT, b"", 405, "method_not_allowed"),
    ("POST", CHAT, b"{not json", 400, "invalid_request"),
    ("POST", CHAT, orjson.dumps(_chat(model="gpt-nowhere")), 404, "model_not_found"),
    ("POST", CHAT, orjson.dumps(_chat(n=3)), 400, "invalid_request"),
    ("POST", CHAT, b"x" * (MAX_BODY_BYTES + 1), 413, "request_too_large"),
]
ANSWERED = [
    ("GET", "/v1/models", b"", 200),
    ("GET", "/api/health", b"", 200),
    ("GET", "/api/ready", b"", 200),
    ("GET", "/api/metrics", b"", 200),
    ("POST", CHAT, orjson.dumps(_chat(max_tokens=1)), 200),
]


async def test_every_answer_carries_an_x_request_id_and_each_rejection_one_log_line(
    served: Served, caplog: pytest.LogCaptureFixture
) -> None:
    """Errors raised before routing, 404, 405, 400, 413 and the small JSON answers all say
    which request they answer; a rejection is logged once by that id, without its body."""
    secret = "the prompt must never reach the log"
    ids: list[uuid.UUID] = []
    with caplog.at_level(logging.INFO):
        for method, path, body, status, *_ in REJECTED + ANSWERED:
            data = body.replace(b"hello there", secret.encode())
            async with served.session.request(method, served.url + path, data=data) as r:
                assert r.status == status, await r.read()
                ids.append(uuid.UUID(r.headers["X-Request-ID"]))

    assert len(set(ids)) == len(REJECTED) + len(ANSWERED)
    rejected = [r for r in caplog.records if r.getMessage().startswith("rejected ")]
    assert len(rejected) == len(REJECTED)
    for (method, path, _, status, code), request, record in zip(
        REJECTED,
        ids,
        rejected,
        strict=False,  # the answered ones' ids come after
    ):
        line = record.getMessage()
        assert line.startswith(
            f"rejected method={method} path={path} status={status} code={code} "
            f"request_id={request} reason="
        ), line
    assert all(secret not in r.getMessage() for r in caplog.records)
    assert served.writer.appended_lsn == 5  # only the chat answered: its five records


# --- good input --------------------------------------------------------------------------


async def test_stream_sends_role_tokens_finish_usage_done_and_journals_them(
    served: Served,
) -> None:
    correlation = uuid.uuid4()
    body = {
        "model": "mock",
        "messages": MESSAGES,
        "stream": True,
        "max_tokens": 5,
        "stream_options": {"include_usage": True},
    }
    status, headers, raw = await _post(served, body, **{"X-Correlation-ID": str(correlation)})
    assert status == 200, raw
    assert headers["Content-Type"] == "text/event-stream"
    request_id = uuid.UUID(headers["X-Request-ID"])
    assert headers["X-Correlation-ID"] == str(correlation)

    events = _events(raw)
    assert events[-1] == b"[DONE]"
    chunks = [orjson.loads(e) for e in events[:-1]]
    assert {c["id"] for c in chunks} == {f"chatcmpl-{request_id.hex}"}
    assert all(c["object"] == "chat.completion.chunk" and c["model"] == "mock" for c in chunks)
    role, *tokens, finish, usage = chunks
    assert role["choices"][0]["delta"] == {"role": "assistant", "content": ""}
    assert [t["choices"][0]["delta"]["content"] for t in tokens] == [token(i) for i in range(5)]
    assert all(t["choices"][0]["finish_reason"] is None for t in tokens)
    assert finish["choices"][0]["delta"] == {}
    assert finish["choices"][0]["finish_reason"] == "length"
    assert usage["choices"] == []
    assert usage["usage"] == {"prompt_tokens": 2, "completion_tokens": 5, "total_tokens": 7}

    records = await served.records()
    [start] = _by_type(records, RecordType.REQUEST_START)
    assert start["id"] == str(request_id)
    assert start["correlation_id"] == str(correlation)
    assert start["messages"] == MESSAGES
    [attempt] = _by_type(records, RecordType.ATTEMPT_START)
    journaled = _by_type(records, RecordType.TOKEN)
    assert [(aid, seq, text) for aid, seq, text, _ in journaled] == [
        (uuid.UUID(attempt["id"]).bytes, i, token(i)) for i in range(5)
    ]
    [end] = _by_type(records, RecordType.REQUEST_END)
    assert end["status"] == "completed"
    assert end["completion_tokens"] == 5


async def test_stream_without_limit_or_usage_sends_default_tokens_and_stop(
    served: Served,
) -> None:
    status, headers, raw = await _post(
        served, {"model": "mock", "messages": MESSAGES, "stream": True}
    )
    assert status == 200, raw
    uuid.UUID(headers["X-Correlation-ID"])  # one is made up when the client sends none
    events = _events(raw)
    assert events[-1] == b"[DONE]"
    role, *tokens, finish = [orjson.loads(e) for e in events[:-1]]
    assert "role" in role["choices"][0]["delta"]
    assert [t["choices"][0]["delta"]["content"] for t in tokens] == [token(i) for i in range(16)]
    assert finish["choices"][0]["finish_reason"] == "stop"
    assert "usage" not in finish


async def test_non_streaming_returns_a_completion_with_usage(served: Served) -> None:
    correlation = str(uuid.uuid4())
    body = {"model": "mock", "messages": MESSAGES, "max_tokens": 3}
    status, headers, raw = await _post(served, body, **{"X-Correlation-ID": correlation})
    assert status == 200, raw
    assert headers["Content-Type"] == "application/json"
    assert headers["X-Correlation-ID"] == correlation
    request_id = uuid.UUID(headers["X-Request-ID"])
    doc = orjson.loads(raw)
    assert doc["object"] == "chat.completion"
    assert doc["id"] == f"chatcmpl-{request_id.hex}"
    [choice] = doc["choices"]
    assert choice["message"] == {"role": "assistant", "content": token(0) + token(1) + token(2)}
    assert choice["finish_reason"] == "length"
    assert doc["usage"] == {"prompt_tokens": 2, "completion_tokens": 3, "total_tokens": 5}
    records = await served.records()
    [end] = _by_type(records, RecordType.REQUEST_END)
    assert end["id"] == str(request_id)
    assert end["status"] == "completed"


async def test_explicit_null_mock_delay_is_the_default_delay(served: Served) -> None:
    """`null` passes validation (the field is optional), so the provider must accept it too."""
    body = {"model": "mock", "messages": MESSAGES, "max_tokens": 2, "mock_delay_ms": None}
    status, _, raw = await _post(served, body)
    assert status == 200, raw
    assert orjson.loads(raw)["choices"][0]["message"]["content"] == token(0) + token(1)


async def test_models_lists_every_routed_model(served: Served) -> None:
    async with served.session.get(served.url + "/v1/models") as r:
        assert r.status == 200
        assert r.headers["Content-Type"] == "application/json"
        doc = orjson.loads(await r.read())
    assert doc["object"] == "list"
    assert [m["id"] for m in doc["data"]] == ["mock", UNREACHABLE_MODEL]
    assert all(m["object"] == "model" for m in doc["data"])
    await _assert_nothing_recorded(served)


# --- failures after the request was accepted ---------------------------------------------


@pytest.mark.parametrize("stream", [False, True], ids=["whole", "stream"])
async def test_unreachable_provider_is_502_without_the_key_and_journaled_failed(
    served: Served, stream: bool
) -> None:
    body = {"model": UNREACHABLE_MODEL, "messages": MESSAGES, "stream": stream}
    status, _, raw = await _post(served, body)
    error = _error(status, raw, 502)
    assert error["type"] == "upstream_error"
    assert error["code"] == "upstream_unreachable"
    assert "far" in error["message"]
    assert UNREACHABLE_KEY not in raw.decode()

    records = await served.records()
    [start] = _by_type(records, RecordType.REQUEST_START)
    # A connect error is transient: tried again once (the default), then given up.
    starts = _by_type(records, RecordType.ATTEMPT_START)
    assert [a["attempt_no"] for a in starts] == [1, 2]
    ends = _by_type(records, RecordType.ATTEMPT_END)
    assert [e["id"] for e in ends] == [a["id"] for a in starts]
    for attempt_end in ends:
        assert attempt_end["status"] == "failed"
        assert attempt_end["error_code"] == "upstream_unreachable"
        assert attempt_end["token_count"] == 0
    [request_end] = _by_type(records, RecordType.REQUEST_END)
    assert request_end["id"] == start["id"]
    assert request_end["status"] == "failed"
    assert request_end["provider"] == "far"
    assert UNREACHABLE_KEY not in orjson.dumps([body for _, body in records]).decode()


async def _read_first_token(
    served: Served, body: dict[str, Any]
) -> tuple[Any, bytes, asyncio.Task[bytes]]:
    """Start a slow stream; once its first token arrived, return what was read and a task
    reading the rest."""
    response = await served.session.post(served.url + CHAT, json=body)
    assert response.status == 200
    head = b""
    while f'"content":{orjson.dumps(token(0)).decode()}'.encode() not in head:
        line = await response.content.readline()
        assert line, "the stream ended before its first token"
        head += line
    return response, head, asyncio.create_task(response.content.read())


async def test_draining_interrupts_a_slow_stream_and_refuses_new_requests(served: Served) -> None:
    body = {"model": "mock", "messages": MESSAGES, "stream": True, "max_tokens": 200}
    response, head, rest = await _read_first_token(served, {**body, "mock_delay_ms": 50})
    try:
        draining = asyncio.create_task(served.gateway.finish_requests(0.2))
        await asyncio.sleep(0.05)
        assert not draining.done()
        error = _error(*(await _post(served, body))[::2], 503)
        assert error["type"] == "service_unavailable"
        assert "shutting down" in error["message"]
        async with asyncio.timeout(3):
            assert await draining == 1
            raw = head + await rest
    finally:
        response.release()

    events = _events(raw)
    assert events[-1] == b"[DONE]"
    last = orjson.loads(events[-2])
    assert set(last) == {"error"}
    assert set(last["error"]) == ERROR_KEYS
    assert last["error"]["type"] == "service_unavailable"
    role, *tokens = [orjson.loads(e) for e in events[:-2]]
    assert role["choices"][0]["delta"]["role"] == "assistant"
    texts = [t["choices"][0]["delta"]["content"] for t in tokens]
    assert texts == [token(i) for i in range(len(texts))]  # no finish chunk, no usage

    records = await served.records()
    assert len(_by_type(records, RecordType.REQUEST_START)) == 1  # the refused one left none
    [attempt_end] = _by_type(records, RecordType.ATTEMPT_END)
    assert attempt_end["status"] == "interrupted"
    assert 1 <= attempt_end["token_count"] < 200
    assert attempt_end["token_count"] == len(_by_type(records, RecordType.TOKEN))
    assert attempt_end["token_count"] >= len(texts)  # the client got nothing unjournaled
    [request_end] = _by_type(records, RecordType.REQUEST_END)
    assert request_end["status"] == "interrupted"


async def test_draining_says_how_many_requests_it_waits_for_and_again_while_it_waits(
    served: Served, caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A grace period is not silence: the count at its start, then a line every few seconds."""
    monkeypatch.setattr(app, "PROGRESS_SECONDS", 0.05)
    body = {"model": "mock", "messages": MESSAGES, "stream": True, "max_tokens": 200}
    response, _, rest = await _read_first_token(served, {**body, "mock_delay_ms": 50})
    try:
        with caplog.at_level(logging.INFO, logger="llmsvc.gateway.app"):
            assert await served.gateway.finish_requests(1.0) == 1
        async with asyncio.timeout(3):
            await rest
    finally:
        response.release()

    lines = [r.getMessage() for r in caplog.records if r.name == "llmsvc.gateway.app"]
    assert lines[0] == "shutdown: waiting for open requests count=1 grace_seconds=1.0"
    progress = lines[1:]
    assert progress  # the grace is twenty progress intervals long
    assert all(
        re.fullmatch(r"shutdown: still waiting for open requests count=1 seconds_left=[\d.]+", line)
        for line in progress
    ), progress


async def test_draining_with_nothing_open_logs_no_wait(
    served: Served, caplog: pytest.LogCaptureFixture
) -> None:
    with caplog.at_level(logging.INFO, logger="llmsvc.gateway.app"):
        assert await served.gateway.finish_requests(5) == 0
    assert [r for r in caplog.records if r.name == "llmsvc.gateway.app"] == []


async def test_draining_interrupts_a_slow_non_streaming_request_with_503(served: Served) -> None:
    """Nothing was sent yet, so the interruption is still an HTTP error in OpenAI's shape."""
    body = {"model": "mock", "messages": MESSAGES, "max_tokens": 200, "mock_delay_ms": 50}
    pending = asyncio.create_task(_post(served, body))
    for _ in range(300):
        if served.gateway.inflight:
            break
        await asyncio.sleep(0.01)
    assert await served.gateway.finish_requests(0.2) == 1
    async with asyncio.timeout(3):
        status, _, raw = await pending
    error = _error(status, raw, 503)
    assert error["type"] == "service_unavailable"
    [request_end] = _by_type(await served.records(), RecordType.REQUEST_END)
    assert request_end["status"] == "interrupted"

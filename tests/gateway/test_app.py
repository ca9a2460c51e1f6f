"""The ASGI app over a real socket: its routes, its answers' request ids, draining.

Bad input gets a 4xx in OpenAI's error shape naming the problem, and the WAL
gets nothing.
"""

from __future__ import annotations

import asyncio
import logging
import re
import uuid
from typing import Any

import openai
import orjson
import pytest
from served_gateway import (
    CHAT,
    ERROR_KEYS,
    MAX_BODY_BYTES,
    MESSAGES,
    UNREACHABLE_MODEL,
    Served,
    _assert_nothing_recorded,
    _by_type,
    _chat,
    _error,
    _events,
    _post,
)

from llmsvc.gateway import app
from llmsvc.providers.mock import token
from llmsvc.wal.codec import RecordType


@pytest.mark.parametrize("path", ["/", "/v1/chat", "/v1/chat/completions/", "/v1/model/mock"])
async def test_unknown_path_is_404_and_records_nothing(served: Served, path: str) -> None:
    async with served.session.post(served.url + path, json={"model": "mock"}) as r:
        error = _error(r.status, await r.read(), 404)
    assert error["code"] == "not_found"
    assert path in error["message"]
    await _assert_nothing_recorded(served)


WRONG_METHODS = [
    ("GET", CHAT, "POST"),
    ("PUT", CHAT, "POST"),
    ("POST", "/v1/models", "GET, HEAD"),
    ("POST", "/v1/models/mock", "GET, HEAD"),
]


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


@pytest.mark.parametrize("path", ["/v1/models", "/v1/models/mock", "/api/health"])
async def test_head_is_get_without_the_body(served: Served, path: str) -> None:
    """RFC 9110 section 9.3.2: HEAD answers as GET does, with the same head and no body."""
    async with served.session.get(served.url + path) as r:
        got_status, body = r.status, await r.read()
        got_type = r.headers["Content-Type"]
    async with served.session.head(served.url + path) as r:
        assert (r.status, r.headers["Content-Type"]) == (got_status, got_type)
        assert int(r.headers["Content-Length"]) == len(body) > 0
        assert await r.read() == b""
    async with served.session.get(served.url + path) as r:  # the connection still serves
        assert r.status == got_status


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


async def test_models_lists_every_routed_model(served: Served) -> None:
    async with served.session.get(served.url + "/v1/models") as r:
        assert r.status == 200
        assert r.headers["Content-Type"] == "application/json"
        doc = orjson.loads(await r.read())
    assert doc["object"] == "list"
    assert [m["id"] for m in doc["data"]] == ["mock", UNREACHABLE_MODEL]
    assert all(m["object"] == "model" for m in doc["data"])
    assert all(m["created"] == served.gateway.created > 0 for m in doc["data"])
    await _assert_nothing_recorded(served)


async def test_a_model_is_retrieved_through_the_sdk_as_listed(served: Served) -> None:
    """`client.models.retrieve()` calls GET /v1/models/{model}; the id may hold slashes."""
    client = openai.AsyncOpenAI(base_url=served.url + "/v1", api_key="x", max_retries=0)
    async with client:
        listed = (await client.models.list()).data
        retrieved = await client.models.retrieve("mock")
        with pytest.raises(openai.NotFoundError) as missing:
            await client.models.retrieve("vendor/no-such-model")
    assert retrieved == listed[0]
    assert (retrieved.id, retrieved.object, retrieved.owned_by) == ("mock", "model", "llmsvc")
    assert retrieved.created == served.gateway.created
    error = missing.value.body
    assert isinstance(error, dict)
    assert (error["code"], error["param"]) == ("model_not_found", None)
    assert "'vendor/no-such-model' is not served" in error["message"]
    await _assert_nothing_recorded(served)


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
        draining = asyncio.create_task(served.gateway.finish_requests(0.2, 10))
        await asyncio.sleep(0.05)
        assert not draining.done()
        error = _error(*(await _post(served, body))[::2], 503)
        assert error["type"] == "service_unavailable"
        assert "shutting down" in error["message"]
        async with asyncio.timeout(10):
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
            assert await served.gateway.finish_requests(1.0, 10) == 1
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
        assert await served.gateway.finish_requests(5, 10) == 0
    assert [r for r in caplog.records if r.name == "llmsvc.gateway.app"] == []


async def test_draining_interrupts_a_slow_non_streaming_request_with_503(served: Served) -> None:
    """Nothing was sent yet, so the interruption is still an HTTP error in OpenAI's shape."""
    body = {"model": "mock", "messages": MESSAGES, "max_tokens": 200, "mock_delay_ms": 50}
    pending = asyncio.create_task(_post(served, body))
    for _ in range(300):
        if served.gateway.inflight:
            break
        await asyncio.sleep(0.01)
    assert await served.gateway.finish_requests(0.2, 10) == 1
    async with asyncio.timeout(3):
        status, _, raw = await pending
    error = _error(status, raw, 503)
    assert error["type"] == "service_unavailable"
    [request_end] = _by_type(await served.records(), RecordType.REQUEST_END)
    assert request_end["status"] == "interrupted"

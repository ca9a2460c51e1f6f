"""One chat completion over HTTP: what the client is sent is what the WAL holds.

Good input streams what the mock sends; a provider that refuses connections is a 502
journaled as failed; a start record the WAL cannot take is refused, not journaled.
"""

from __future__ import annotations

import asyncio
import logging
import uuid
from typing import Any

import openai
import orjson
import pytest
from served_gateway import (
    MESSAGES,
    UNREACHABLE_KEY,
    UNREACHABLE_MODEL,
    UPSTREAM_MODEL,
    Served,
    _assert_nothing_recorded,
    _by_type,
    _chat,
    _error,
    _events,
    _post,
)

from llmsvc.errors import ClientError
from llmsvc.gateway.attribution import Attribution
from llmsvc.gateway.chat import Exchange
from llmsvc.gateway.errors import describe
from llmsvc.gateway.ids import new_id
from llmsvc.gateway.sse import ChatWire
from llmsvc.providers.mock import token
from llmsvc.wal.codec import RecordType


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

    exchange = Exchange(
        gateway.journal, gateway.router, gateway.policy, data,
        data["model"], False, uuid.uuid4(), "corr", send, lambda: False, lambda body: False,
        lambda status, headers, body, more: None,
        caller=None, attribution=Attribution(),
        wire=lambda rid, created: ChatWire(f"chatcmpl-{rid}", created, data["model"], False),
        api="chat",
    )  # fmt: skip
    with caplog.at_level(logging.INFO), pytest.raises(ClientError) as raised:
        await exchange.run()

    assert "cannot be journaled" in str(raised.value)
    assert describe(raised.value)[0] == 400
    assert (exchange.status, sent) == ("failed", [])
    assert [(r.levelno, r.getMessage().split()[0]) for r in caplog.records] == [
        (logging.INFO, "request")
    ]
    await _assert_nothing_recorded(served)


async def test_a_pumped_batch_already_journaled_is_written_when_the_next_read_comes_first(
    served: Served,
) -> None:
    """A stream's next read can arrive after its held batch's WAL write and before that
    write's done callback runs: the held batch then goes to the client at once and the pump
    takes the next, which reaches the client only once its own write is done."""
    exchange, written = _pumping(served)
    loop = asyncio.get_running_loop()
    assert exchange._take(["a"])
    first = exchange.unconfirmed[0]
    assert first is not None
    taken: asyncio.Future[tuple[bool, asyncio.Future[int] | None]] = loop.create_future()

    def next_read() -> None:  # after the round's WAL write, before its done callbacks
        assert first.done(), "the round's write is not done on the loop"
        assert written == []
        taken.set_result((exchange._take(["b"]), exchange.unconfirmed[0]))

    loop.call_soon(next_read)
    took, second = await taken
    assert took
    assert second is not None
    assert second is not first
    await second
    for _ in range(3):  # the done callbacks of both writes
        await asyncio.sleep(0)

    wire = exchange.wire
    assert [body for body, _ in written] == [wire.tokens(["a"]), wire.tokens(["b"])]
    assert written[0][1] > first.result()  # each after its WAL write: the next LSN is past it
    assert written[1][1] > second.result()
    assert exchange.held is None
    records = await served.records()
    assert [text for _a, _s, text, _t in _by_type(records, RecordType.TOKEN)] == ["a", "b"]


async def test_a_pumped_batch_read_before_the_held_one_is_written_joins_its_wal_write(
    served: Served,
) -> None:
    """Two reads of a stream in one loop round: the second is journaled into the first's WAL
    write and goes to the client with it, in one write, once that write is done."""
    exchange, written = _pumping(served)
    assert exchange._take(["a"])
    first = exchange.unconfirmed[0]
    assert exchange._take(["b"])

    assert exchange.unconfirmed == (first, 2)
    assert written == []
    assert first is not None
    await first
    await asyncio.sleep(0)  # its done callback

    wire = exchange.wire
    assert [body for body, _ in written] == [wire.tokens(["a"]) + wire.tokens(["b"])]
    assert written[0][1] > first.result() == 2
    assert (exchange.held, exchange.unconfirmed, exchange.seq) == (None, (None, 0), 2)
    records = await served.records()
    assert [text for _a, _s, text, _t in _by_type(records, RecordType.TOKEN)] == ["a", "b"]


def _pumping(served: Served) -> tuple[Exchange, list[tuple[bytes, int]]]:
    """A streaming exchange whose pump writes to a list: each frame, with the WAL's next LSN
    as it went (a frame's records are journaled when that is past them)."""
    gateway, data = served.gateway, _chat()
    writer = gateway.journal.writer
    written: list[tuple[bytes, int]] = []

    def write(body: bytes) -> bool:
        written.append((body, writer.end.lsn))
        return True

    exchange = Exchange(
        gateway.journal, gateway.router, gateway.policy, data,
        data["model"], True, uuid.uuid4(), "corr", _no_send, lambda: False, write,
        lambda status, headers, body, more: None,
        caller=None, attribution=Attribution(),
        wire=lambda rid, created: ChatWire(f"chatcmpl-{rid}", created, data["model"], True),
        api="chat",
    )  # fmt: skip
    exchange.attempt_id = new_id()
    return exchange, written


async def _no_send(message: Any) -> None:
    raise AssertionError(f"sent by the task, not the pump: {message}")


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
    content = token(0) + token(1) + token(2)
    # `refusal` is required (nullable) in OpenAI's schema: null unless the model declined.
    assert choice["message"] == {"role": "assistant", "content": content, "refusal": None}
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


REFUSAL = "I cannot help with that."


async def test_an_upstreams_refusal_reaches_the_sdk_whole(served_upstream: Served) -> None:
    client = openai.AsyncOpenAI(base_url=served_upstream.url + "/v1", api_key="x", max_retries=0)
    async with client:
        reply = await client.chat.completions.create(
            model=UPSTREAM_MODEL, messages=[{"role": "user", "content": f"refuse:{REFUSAL}"}]
        )
    message = reply.choices[0].message
    assert (message.refusal, message.content) == (REFUSAL, None)
    assert reply.choices[0].finish_reason == "stop"
    journaled = _by_type(await served_upstream.records(), RecordType.TOKEN)
    assert [text for _, _, text, _ in journaled] == [REFUSAL]  # what the client got, stored


async def test_an_upstreams_refusal_deltas_are_streamed_as_delta_refusal(
    served_upstream: Served,
) -> None:
    client = openai.AsyncOpenAI(base_url=served_upstream.url + "/v1", api_key="x", max_retries=0)
    async with client:
        stream = await client.chat.completions.create(
            model=UPSTREAM_MODEL,
            messages=[{"role": "user", "content": f"refuse:{REFUSAL}"}],
            stream=True,
        )
        chunks = [chunk async for chunk in stream]
    deltas = [c.choices[0].delta for c in chunks if c.choices]
    assert "".join(d.refusal or "" for d in deltas) == REFUSAL
    assert "".join(d.content or "" for d in deltas) == ""
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "stop"
    journaled = _by_type(await served_upstream.records(), RecordType.TOKEN)
    assert "".join(text for _, _, text, _ in journaled) == REFUSAL  # journaled before it was sent
    assert [seq for _, seq, _, _ in journaled] == list(range(len(journaled)))

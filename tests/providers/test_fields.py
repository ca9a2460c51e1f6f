"""Odd upstream values, through each adapter over real HTTP: what reaches a `Reply` or a
record is of the type and range the store takes, or None, or a clean ProviderError.

A local aiohttp server answers every POST with the bytes a test gives it, so each case
is exactly what an upstream put on the wire.
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

import orjson
import pytest
from aiohttp import web

from llmsvc.config import ProviderConfig
from llmsvc.errors import ProviderError
from llmsvc.providers.anthropic import AnthropicProvider
from llmsvc.providers.base import ToolCallDeltas
from llmsvc.providers.fields import INT4_MAX, UPSTREAM_MAX_BYTES, arguments
from llmsvc.providers.http import HttpProvider, HttpReply
from llmsvc.providers.openai import OpenAIProvider

BIG_TEXT = "x" * 10_000
ODD_COUNTS = {
    "past int4": 3_000_000_000,
    "negative": -1,
    "true": True,
    "float": 1.5,
    "string": "12",
    "list": [1, 2],
    "object": {"n": 1},
    "long string": BIG_TEXT,
}


@dataclass
class Canned:
    """What the local upstream answers next: `body` as SSE (`stream`) or as JSON."""

    url: str = ""
    body: bytes = b""
    stream: bool = False


@pytest.fixture
async def canned() -> AsyncIterator[Canned]:
    state = Canned()

    async def answer(request: web.Request) -> web.Response:
        kind = "text/event-stream" if state.stream else "application/json"
        return web.Response(body=state.body, content_type=kind)

    app = web.Application()
    app.router.add_post("/{tail:.*}", answer)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", 0).start()
    state.url = f"http://127.0.0.1:{runner.addresses[0][1]}"
    try:
        yield state
    finally:
        await runner.cleanup()


BODY = {"model": "m", "messages": [{"role": "user", "content": "hi"}]}


def provider(canned: Canned, kind: str) -> HttpProvider:
    if kind == "openai":
        return OpenAIProvider(ProviderConfig(name="up", kind="openai", base_url=canned.url + "/v1",
                                             models=["m"]))  # fmt: skip
    return AnthropicProvider(
        ProviderConfig(name="up", kind="anthropic", base_url=canned.url, models=["m"])
    )


async def call(
    canned: Canned, kind: str, events: list[Any] | None = None, whole: Any = None
) -> tuple[HttpReply, list[Any]]:
    """One call answered with `events` (a stream) or `whole` (a JSON body): the reply and
    every batch it yielded."""
    canned.stream = events is not None
    if events is not None:
        end = [b"data: [DONE]\n\n"] if kind == "openai" else []
        canned.body = b"".join([b"data: " + orjson.dumps(e) + b"\n\n" for e in events] + end)
    else:
        canned.body = whole if isinstance(whole, bytes) else orjson.dumps(whole)
    upstream = provider(canned, kind)
    try:
        reply = await upstream.open(BODY, "m", canned.stream)
        assert isinstance(reply, HttpReply)
        batches = [batch async for batch in reply.batches()]
    finally:
        await upstream.close()
    return reply, batches


def openai_chunk(delta: dict[str, Any], finish: Any = None, **extra: Any) -> dict[str, Any]:
    choice = {"index": 0, "delta": delta, "finish_reason": finish}
    return {"id": "c", "object": "chat.completion.chunk", "choices": [choice], **extra}


def openai_whole(message: dict[str, Any], usage: Any, finish: Any = "stop") -> dict[str, Any]:
    choice = {"index": 0, "message": message, "finish_reason": finish}
    return {"id": "c", "object": "chat.completion", "choices": [choice], "usage": usage}


def anthropic_stream(input_tokens: Any, output_tokens: Any, stop: Any = "end_turn") -> list[Any]:
    text = {"type": "text_delta", "text": "hi"}
    return [
        {"type": "message_start", "message": {"usage": {"input_tokens": input_tokens}}},
        {"type": "content_block_delta", "index": 0, "delta": text},
        {"type": "message_delta", "delta": {"stop_reason": stop},
         "usage": {"output_tokens": output_tokens}},
        {"type": "message_stop"},
    ]  # fmt: skip


def anthropic_whole(usage: Any, content: Any = None, stop: Any = "end_turn") -> dict[str, Any]:
    content = [{"type": "text", "text": "hi"}] if content is None else content
    return {"type": "message", "content": content, "stop_reason": stop, "usage": usage}


def dropped(caplog: pytest.LogCaptureFixture) -> list[str]:
    """The warnings the adapters logged, each checked to name no long value's content."""
    lines = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert all(BIG_TEXT[:50] not in line for line in lines), lines
    return lines


# --- usage: an int within int4, else None with one warning ------------------------------


@pytest.mark.parametrize("value", list(ODD_COUNTS.values()), ids=list(ODD_COUNTS))
@pytest.mark.parametrize("stream", [True, False], ids=["stream", "whole"])
async def test_an_odd_openai_usage_count_is_none_with_one_warning(
    canned: Canned, caplog: pytest.LogCaptureFixture, value: Any, stream: bool
) -> None:
    usage = {"prompt_tokens": value, "completion_tokens": 7}
    if stream:
        events = [openai_chunk({"content": "hi"}), openai_chunk({}, "stop"),
                  {"id": "c", "choices": [], "usage": usage}]  # fmt: skip
        reply, batches = await call(canned, "openai", events=events)
    else:
        reply, batches = await call(canned, "openai", whole=openai_whole({"content": "hi"}, usage))

    assert (reply.prompt_tokens, reply.completion_tokens) == (None, 7)
    assert batches == [["hi"]]
    assert dropped(caplog) == [
        "upstream value dropped provider=up field=prompt_tokens value="
        + (f"{type(value).__name__} of length {len(value)}"
           if isinstance(value, str | list | dict) else repr(value))
    ]  # fmt: skip


@pytest.mark.parametrize("value", list(ODD_COUNTS.values()), ids=list(ODD_COUNTS))
@pytest.mark.parametrize("stream", [True, False], ids=["stream", "whole"])
async def test_an_odd_anthropic_usage_count_is_none_with_one_warning(
    canned: Canned, caplog: pytest.LogCaptureFixture, value: Any, stream: bool
) -> None:
    if stream:
        reply, _ = await call(canned, "anthropic", events=anthropic_stream(value, 4))
    else:
        usage = {"input_tokens": 3, "output_tokens": value}
        reply, _ = await call(canned, "anthropic", whole=anthropic_whole(usage))

    assert (reply.prompt_tokens, reply.completion_tokens) == ((None, 4) if stream else (3, None))
    (line,) = dropped(caplog)
    assert f"provider=up field={'input_tokens' if stream else 'output_tokens'} " in line


@pytest.mark.parametrize("kind", ["openai", "anthropic"])
async def test_usage_at_the_edges_of_int4_is_kept_without_a_warning(
    canned: Canned, caplog: pytest.LogCaptureFixture, kind: str
) -> None:
    if kind == "openai":
        usage = {"prompt_tokens": 0, "completion_tokens": INT4_MAX}
        reply, _ = await call(canned, kind, whole=openai_whole({"content": "hi"}, usage))
    else:
        usage = {"input_tokens": 0, "output_tokens": INT4_MAX}
        reply, _ = await call(canned, kind, whole=anthropic_whole(usage))

    assert (reply.prompt_tokens, reply.completion_tokens) == (0, INT4_MAX)
    assert dropped(caplog) == []


@pytest.mark.parametrize("usage", [None, [1, 2], "lots", 7, {}], ids=repr)
async def test_a_usage_that_is_not_an_object_is_no_usage(canned: Canned, usage: Any) -> None:
    events = [openai_chunk({"content": "hi"}, "stop"), {"id": "c", "choices": [], "usage": usage}]
    stream, _ = await call(canned, "openai", events=events)
    whole, _ = await call(canned, "openai", whole=openai_whole({"content": "hi"}, usage))
    ant, _ = await call(canned, "anthropic", whole=anthropic_whole(usage))

    for reply in (stream, whole, ant):
        assert (reply.prompt_tokens, reply.completion_tokens) == (None, None)


# --- finish reasons: a short string, else None ------------------------------------------


@pytest.mark.parametrize("finish", [BIG_TEXT, 5, ["stop"], {"r": "stop"}], ids=repr)
async def test_an_odd_finish_reason_is_none(
    canned: Canned, caplog: pytest.LogCaptureFixture, finish: Any
) -> None:
    events = [openai_chunk({"content": "hi"}, finish)]
    stream, _ = await call(canned, "openai", events=events)
    whole, _ = await call(canned, "openai", whole=openai_whole({"content": "hi"}, {}, finish))
    ant, _ = await call(canned, "anthropic", events=anthropic_stream(1, 1, finish))

    assert (stream.finish_reason, whole.finish_reason, ant.finish_reason) == (None, None, None)
    assert len(dropped(caplog)) == 3


# --- tool calls: index an int in range (else the position), id and name strings (else None),
# --- arguments a string (else its JSON)


async def test_odd_openai_tool_call_deltas_are_flattened_to_their_types(canned: Canned) -> None:
    calls = [
        {"index": "zero", "id": 5, "function": {"name": ["f"], "arguments": {"q": 1}}},
        {"index": -1, "id": "c2", "function": {"name": "g", "arguments": None}},
        {"index": 2**40, "function": "not an object"},
        "not a call",
        {"index": 3, "id": "c4", "function": {"name": "h", "arguments": '{"a"'}},
        {"index": True, "function": {"arguments": 12}},
    ]
    events = [openai_chunk({"tool_calls": calls}), openai_chunk({}, "tool_calls")]

    _, batches = await call(canned, "openai", events=events)

    assert batches == [
        ToolCallDeltas(
            [
                {"index": 0, "id": None, "name": None, "arguments": '{"q":1}'},
                {"index": 1, "id": "c2", "name": "g", "arguments": ""},
                {"index": 2, "id": None, "name": None, "arguments": ""},
                {"index": 3, "id": "c4", "name": "h", "arguments": '{"a"'},
                {"index": 4, "id": None, "name": None, "arguments": "12"},
            ]
        )
    ]


async def test_odd_openai_whole_tool_calls_are_numbered_in_order(canned: Canned) -> None:
    calls = ["junk", {"index": 9, "id": 1, "function": {"name": "f", "arguments": [1]}}]
    message = {"content": None, "tool_calls": calls}

    reply, batches = await call(canned, "openai", whole=openai_whole(message, {}, "tool_calls"))

    assert batches == []
    assert reply.tool_calls == [{"index": 0, "id": None, "name": "f", "arguments": "[1]"}]


async def test_odd_anthropic_tool_use_blocks_are_flattened_to_their_types(canned: Canned) -> None:
    block = {"type": "tool_use", "id": ["t"], "name": 7, "input": {}}
    events = [
        {"type": "message_start", "message": {"usage": {"input_tokens": 1}}},
        {"type": "content_block_start", "index": "one", "content_block": block},
        {"type": "content_block_delta", "index": [0],
         "delta": {"type": "input_json_delta", "partial_json": {"q": 1}}},
        {"type": "message_delta", "delta": {"stop_reason": "tool_use"}, "usage": {}},
        {"type": "message_stop"},
    ]  # fmt: skip
    _, stream = await call(canned, "anthropic", events=events)
    uses = [{"type": "tool_use", "id": "t1", "name": "f", "input": [1, {"a": None}]}, "junk"]
    reply, _ = await call(canned, "anthropic", whole=anthropic_whole({}, uses, "tool_use"))

    assert stream == [
        ToolCallDeltas(
            [
                {"index": 0, "id": None, "name": None, "arguments": ""},
                {"index": 0, "arguments": '{"q":1}'},
            ]
        )
    ]
    assert reply.tool_calls == [
        {"index": 0, "id": "t1", "name": "f", "arguments": '[1,{"a":null}]'}
    ]


async def test_tool_input_nested_past_the_encoder_is_a_malformed_reply(canned: Canned) -> None:
    deep = b"[" * 300 + b"]" * 300
    whole = (b'{"type":"message","stop_reason":"tool_use","usage":{},"content":'
             b'[{"type":"tool_use","id":"t","name":"f","input":' + deep + b"}]}")  # fmt: skip

    with pytest.raises(ProviderError) as raised:
        await call(canned, "anthropic", whole=whole)

    assert (raised.value.code, raised.value.retryable) == ("upstream_malformed", False)


async def test_a_request_that_translates_past_the_encoder_is_refused_as_the_clients(
    canned: Canned,
) -> None:
    """Anthropic takes tool-call arguments as JSON, parsed from the client's string: one
    nested too deep is refused before any byte goes upstream."""
    call_ = {"id": "c", "type": "function",
             "function": {"name": "f", "arguments": "[" * 300 + "]" * 300}}  # fmt: skip
    body = {"model": "m", "messages": [
        {"role": "user", "content": "hi"},
        {"role": "assistant", "content": None, "tool_calls": [call_]},
    ]}  # fmt: skip
    upstream = provider(canned, "anthropic")
    try:
        with pytest.raises(ProviderError) as raised:
            await upstream.open(body, "m", stream=False)
    finally:
        await upstream.close()

    assert (raised.value.status, raised.value.code) == (400, "invalid_request")


# --- content: text or nothing; anything else is a malformed reply ------------------------


@pytest.mark.parametrize("content", [5, ["hi"], {"text": "hi"}, True], ids=repr)
@pytest.mark.parametrize("kind", ["openai", "anthropic"])
@pytest.mark.parametrize("stream", [True, False], ids=["stream", "whole"])
async def test_content_that_is_not_text_is_a_malformed_reply(
    canned: Canned, content: Any, kind: str, stream: bool
) -> None:
    if kind == "openai" and stream:
        events: list[Any] | None = [openai_chunk({"content": content}, "stop")]
        whole = None
    elif kind == "openai":
        events, whole = None, openai_whole({"content": content}, {})
    elif stream:
        events, whole = anthropic_stream(1, 1), None
        events[1]["delta"]["text"] = content
    else:
        events, whole = None, anthropic_whole({}, [{"type": "text", "text": content}])

    with pytest.raises(ProviderError) as raised:
        await call(canned, kind, events=events, whole=whole)

    assert (raised.value.code, raised.value.retryable) == ("upstream_malformed", False)


@pytest.mark.parametrize("kind", ["openai", "anthropic"])
async def test_a_whole_reply_that_is_not_an_object_is_a_malformed_reply(
    canned: Canned, kind: str
) -> None:
    with pytest.raises(ProviderError) as raised:
        await call(canned, kind, whole=[{"choices": []}])

    assert raised.value.code == "upstream_malformed"


@pytest.mark.parametrize("kind", ["openai", "anthropic"])
async def test_stream_events_that_are_not_objects_are_skipped(canned: Canned, kind: str) -> None:
    good = [openai_chunk({"content": "hi"}, "stop")] if kind == "openai" else anthropic_stream(1, 1)
    events = [5, "text", [1], None, *good]

    reply, batches = await call(canned, kind, events=events)

    assert batches == [["hi"]]
    assert reply.finish_reason == "stop"


@pytest.mark.parametrize("message", [{"deep": [[["x"]]]}, 12, None, BIG_TEXT])
@pytest.mark.parametrize("kind", ["openai", "anthropic"])
async def test_an_error_event_with_an_odd_message_is_a_provider_error_of_short_text(
    canned: Canned, kind: str, message: Any
) -> None:
    error = {"message": message, "code": {"odd": 1}, "type": ["odd"]}
    event = {"error": error} if kind == "openai" else {"type": "error", "error": error}

    with pytest.raises(ProviderError) as raised:
        await call(canned, kind, events=[event])

    text = str(raised.value)
    assert text.startswith("up: upstream said: ")
    assert len(text) <= 520
    assert raised.value.code == "upstream_error"
    assert orjson.dumps({"error": text, "code": raised.value.code})


# --- sizes: what an upstream sends must fit one WAL record -------------------------------


@pytest.mark.parametrize("kind", ["openai", "anthropic"])
@pytest.mark.parametrize("stream", [True, False], ids=["stream", "whole"])
async def test_a_reply_or_event_past_the_upstream_limit_is_refused(
    canned: Canned, kind: str, stream: bool
) -> None:
    huge = "x" * UPSTREAM_MAX_BYTES
    if kind == "openai":
        events = [openai_chunk({"content": huge})]
        whole: Any = openai_whole({"content": huge}, {})
    else:
        events = anthropic_stream(1, 1)
        events[1]["delta"]["text"] = huge
        whole = anthropic_whole({}, [{"type": "text", "text": huge}])

    with pytest.raises(ProviderError) as raised:
        await call(canned, kind, **({"events": events} if stream else {"whole": whole}))

    assert (raised.value.code, raised.value.retryable) == ("upstream_too_large", False)


def test_arguments_written_back_past_the_upstream_limit_are_refused() -> None:
    assert arguments("up", ["x" * 100]) == '["' + "x" * 100 + '"]'
    with pytest.raises(ProviderError) as raised:
        arguments("up", ["x" * UPSTREAM_MAX_BYTES])

    assert raised.value.code == "upstream_too_large"


@pytest.mark.parametrize(
    ("sent", "told"),
    [("stop", "stop"), ("length", "length"), ("tool_calls", "tool_calls"),
     ("content_filter", "content_filter"), ("abort", "stop"), ("eos_token", "stop")],
)  # fmt: skip
@pytest.mark.parametrize("stream", [True, False])
async def test_an_openai_compatible_finish_reason_outside_openais_enum_is_told_as_stop(
    canned: Canned, sent: str, told: str, stream: bool
) -> None:
    """vLLM's `abort` or a server's own word would fail the SDK's enum: the client is told
    `stop`, and the reply keeps the word as its stop reason for the attempt row."""
    if stream:
        reply, _ = await call(canned, "openai", events=[openai_chunk({"content": "hi"}, sent)])
    else:
        reply, _ = await call(canned, "openai", whole=openai_whole({"content": "hi"}, {}, sent))

    assert (reply.finish_reason, reply.stop_reason) == (told, sent)

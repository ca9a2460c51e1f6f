"""An openai provider with `responses = true` forwards Responses requests natively: against the
fake OpenAI upstream's `/v1/responses` (tests/upstreams/openai_upstream.py) over real HTTP."""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

import orjson
import pytest
from aiohttp import web
from upstreams.openai_upstream import Upstream, expected_content

from llmsvc.config import ProviderConfig
from llmsvc.errors import ProviderError, ProviderUnavailable
from llmsvc.providers.base import Native, RefusalDeltas, ToolCallDeltas
from llmsvc.providers.http import HttpReply
from llmsvc.providers.openai import OpenAIProvider

CHAT = {"model": "client-name", "messages": [{"role": "user", "content": "hi"}]}
TOOLS = [{"type": "function", "name": "lookup", "parameters": {"type": "object"}}]


@pytest.fixture
async def upstream() -> AsyncIterator[Upstream]:
    async with Upstream() as up:
        await up.start()
        yield up


async def call(
    base_url: str,
    body: dict[str, Any],
    stream: bool,
    responses: bool = True,
    steer: str = "",
    got: list[Any] | None = None,
) -> tuple[HttpReply, list[Any]]:
    """One Responses request (`body`, CHAT its chat form) through a provider of the upstream
    at `base_url` (`steer`: a `/with/<header>/<value>` before its `/v1`): the reply and every
    batch it yielded (into `got`, if given, so a test sees them when the reply then fails)."""
    base_url = base_url.replace("/v1", steer + "/v1")
    config = ProviderConfig(
        name="up", kind="openai", base_url=base_url, models=["m"], responses=responses
    )
    provider = OpenAIProvider(config)
    try:
        reply = await provider.open(CHAT, "upstream-name", stream, Native("responses", body))
        batches = [] if got is None else got
        async for batch in reply.batches():
            batches.append(batch)
    finally:
        await provider.close()
    return reply, batches


def texts(batches: list[Any]) -> str:
    return "".join(t for b in batches if type(b) is list for t in b)


@pytest.mark.parametrize("stream", [True, False], ids=["streamed", "whole"])
async def test_text_usage_and_what_the_upstream_was_sent(upstream: Upstream, stream: bool) -> None:
    body = {"model": "client-name", "input": "say hello world", "instructions": "be brief"}

    reply, batches = await call(upstream.base_url, body, stream)

    assert texts(batches) == expected_content(16)
    assert (reply.finish_reason, reply.prompt_tokens, reply.completion_tokens) == (
        "stop",
        5,
        16,
    )  # words of input and instructions
    assert reply.http_status == 200
    assert (reply.tool_calls, reply.refusal) == ([], None)
    assert upstream.responses_received == [{**body, "model": "upstream-name", "stream": stream,
                                            "store": False}]  # fmt: skip


@pytest.mark.parametrize("stream", [True, False], ids=["streamed", "whole"])
async def test_max_output_tokens_reached_is_length(upstream: Upstream, stream: bool) -> None:
    body = {"model": "m", "input": [{"role": "user", "content": "hi"}], "max_output_tokens": 3}

    reply, batches = await call(upstream.base_url, body, stream)

    assert texts(batches) == "t0 t1 t2 "
    assert (reply.finish_reason, reply.completion_tokens) == ("length", 3)


async def test_a_streamed_function_call_is_tool_call_deltas_numbered_from_0(
    upstream: Upstream,
) -> None:
    body = {"model": "m", "input": [{"role": "user", "content": "call:lookup"}], "tools": TOOLS}

    reply, batches = await call(upstream.base_url, body, stream=True)

    deltas = [d for b in batches if isinstance(b, ToolCallDeltas) for d in b]
    assert deltas == [
        {"index": 0, "id": "call_test", "name": "lookup", "arguments": ""},
        {"index": 0, "id": None, "name": None, "arguments": '{"q"'},
        {"index": 0, "id": None, "name": None, "arguments": ': "x"}'},
    ]
    assert texts(batches) == ""
    assert (reply.finish_reason, reply.prompt_tokens, reply.completion_tokens) == (
        "tool_calls", 1, 5)  # fmt: skip


async def test_a_whole_replys_function_call_is_a_flat_tool_call(upstream: Upstream) -> None:
    body = {"model": "m", "input": "call:lookup", "tools": TOOLS}

    reply, batches = await call(upstream.base_url, body, stream=False)

    assert reply.tool_calls == [
        {"index": 0, "id": "call_test", "name": "lookup", "arguments": '{"q": "x"}'}
    ]
    assert (batches, reply.finish_reason) == ([], "tool_calls")


@pytest.mark.parametrize("stream", [True, False], ids=["streamed", "whole"])
async def test_a_refusal_is_a_refusal_not_content(upstream: Upstream, stream: bool) -> None:
    body = {"model": "m", "input": [{"role": "user", "content": [
        {"type": "input_text", "text": "refuse:I will not"}]}]}  # fmt: skip

    reply, batches = await call(upstream.base_url, body, stream)

    refused = "".join(t for b in batches if isinstance(b, RefusalDeltas) for t in b)
    # streamed, refusal deltas; whole, the reply's `refusal`
    assert (refused, reply.refusal) == (("I will not", None) if stream else ("", "I will not"))
    assert (texts(batches), reply.finish_reason) == ("", "stop")


async def test_a_failed_response_mid_stream_is_a_retryable_error_after_its_tokens(
    upstream: Upstream,
) -> None:
    got: list[Any] = []
    with pytest.raises(ProviderUnavailable) as failed:
        await call(
            upstream.base_url,
            {"input": "hi"},
            True,
            steer="/with/X-Upstream-Fail/failed:2",
            got=got,
        )

    assert texts(got) == "t0 t1 "
    assert failed.value.retryable
    assert failed.value.code == "server_error"
    assert "The server had an error" in str(failed.value)


async def test_a_stream_cut_before_its_end_is_a_broken_stream(upstream: Upstream) -> None:
    with pytest.raises(ProviderUnavailable) as broken:
        await call(
            upstream.base_url, {"input": "hi"}, stream=True, steer="/with/X-Upstream-Fail/after:2"
        )

    assert broken.value.code == "upstream_stream_broken"


async def test_an_upstream_refusing_the_request_is_its_error(upstream: Upstream) -> None:
    with pytest.raises(ProviderError) as refused:
        await call(upstream.base_url, {"model": "m"}, stream=True)  # no input

    assert (refused.value.status, refused.value.retryable) == (400, False)
    assert "'input'" in str(refused.value)


async def test_without_responses_the_chat_form_goes_to_chat_completions(
    upstream: Upstream,
) -> None:
    reply, batches = await call(upstream.base_url, {"input": "hi"}, stream=True, responses=False)

    assert texts(batches) == expected_content(16)
    assert reply.prompt_tokens == 1  # CHAT's one word, not the native body's
    assert upstream.responses_received == []


def sse(*events: dict[str, Any]) -> bytes:
    """Events framed as OpenAI frames Responses events: `event:` then `data:`."""
    return b"".join(
        b"event: " + e["type"].encode() + b"\ndata: " + orjson.dumps(e) + b"\n\n" for e in events
    )


TEXT = {"type": "response.output_text.delta", "item_id": "msg_1", "output_index": 0,
        "content_index": 0, "delta": "hi", "logprobs": []}  # fmt: skip
DONE = {"type": "response.completed", "response": {"status": "completed", "output": [],
        "usage": {"input_tokens": 3_000_000_000, "output_tokens": 1}}}  # fmt: skip


@pytest.mark.parametrize(
    ("events", "error", "code"),
    [
        ([TEXT, {"type": "error", "code": "rate_limit_exceeded", "message": "slow down",
                 "param": None}], ProviderUnavailable, "rate_limit_exceeded"),
        ([TEXT, {**TEXT, "delta": ["hi"]}, DONE], ProviderError, "upstream_malformed"),
        ([TEXT, {"type": "response.function_call_arguments.delta", "item_id": "fc_9",
                 "output_index": 5, "delta": "{}"}, DONE], ProviderError, "upstream_malformed"),
        ([TEXT, DONE], None, None),
    ],
    ids=["error-event", "text-not-a-string", "arguments-of-no-call", "odd-usage"],
)  # fmt: skip
async def test_what_an_odd_upstream_streams(
    events: list[dict[str, Any]], error: type[ProviderError] | None, code: str | None
) -> None:
    """Bytes as an upstream put them on the wire: an `error` event is its error (retryable,
    after the text before it), odd values a malformed reply or dropped."""

    async def answer(request: web.Request) -> web.Response:
        return web.Response(body=sse(*events), content_type="text/event-stream")

    app = web.Application()
    app.router.add_post("/v1/responses", answer)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", 0).start()
    base_url = f"http://127.0.0.1:{runner.addresses[0][1]}/v1"
    got: list[Any] = []
    try:
        if error is None:
            reply, _ = await call(base_url, {"input": "hi"}, True, got=got)
            assert (reply.prompt_tokens, reply.completion_tokens) == (None, 1)
        else:
            with pytest.raises(error) as raised:
                await call(base_url, {"input": "hi"}, True, got=got)
            assert raised.value.code == code
    finally:
        await runner.cleanup()
    if code != "upstream_malformed":  # a malformed reply's text may go with it
        assert texts(got) == "hi"

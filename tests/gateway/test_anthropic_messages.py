"""`POST /v1/messages` with the official anthropic SDK: the mock, the fake OpenAI upstream
(the chat translation) and the fake Anthropic upstream (the client's body forwarded as sent).

The WAL is read back after each reply: whatever the client received is journaled once.
"""

from __future__ import annotations

from typing import Any

import anthropic
import orjson
import pytest
from served_gateway import (
    ANTHROPIC_MODEL,
    UNREACHABLE_MODEL,
    UPSTREAM_MODEL,
    Served,
    _by_type,
)
from upstreams.anthropic_upstream import Upstream as AnthropicUpstream
from upstreams.openai_upstream import expected_content

from llmsvc.providers.mock import token
from llmsvc.tokens import count_prompt
from llmsvc.wal.codec import RecordType

TOOLS: list[Any] = [
    {
        "name": "lookup",
        "description": "Look a thing up",
        "input_schema": {"type": "object", "properties": {"q": {"type": "string"}}},
    }
]
CALL = [{"role": "user", "content": "call:lookup"}]


def client(served: Served) -> anthropic.AsyncAnthropic:
    return anthropic.AsyncAnthropic(base_url=served.url, api_key="unused", max_retries=0)


async def stored_texts(served: Served) -> list[str]:
    """Every token text the WAL holds, in journal order."""
    return [text for _, _, text, _ in _by_type(await served.records(), RecordType.TOKEN)]


async def stored_tool_arguments(served: Served) -> str:
    deltas = _by_type(await served.records(), RecordType.TOOL_DELTA)
    return "".join(delta.get("arguments") or "" for _, _, delta, _ in deltas)


async def test_a_whole_message_from_the_mock_is_journaled_with_its_native_body(
    served: Served,
) -> None:
    async with client(served) as sdk:
        message = await sdk.messages.create(
            model="mock",
            max_tokens=5,
            system="be brief",
            messages=[{"role": "user", "content": "hello there"}],
            metadata={"user_id": "u-1"},
            extra_body={"top_k": 3},  # no SDK argument: Anthropic's, not OpenAI's
        )
    assert message.type == "message"
    assert message.role == "assistant"
    assert message.content[0].type == "text"
    assert message.content[0].text == "".join(token(i) for i in range(5))
    assert message.stop_reason == "max_tokens"  # the mock was limited by max_tokens
    assert message.usage.output_tokens == 5
    assert message.usage.input_tokens == 4  # the mock's count: a word a token, system included
    assert message.id.startswith("msg_")
    records = await served.records()
    (start,) = _by_type(records, RecordType.REQUEST_START)
    assert start["api"] == "messages"
    assert message.id == "msg_" + start["id"].replace("-", "")
    assert start["params"]["top_k"] == 3  # the client's own body, minus its model
    assert start["params"]["system"] == "be brief"
    assert start["messages"] == [
        {"role": "system", "content": "be brief"},
        {"role": "user", "content": "hello there"},
    ]
    assert start["user"] == "u-1"
    assert await stored_texts(served) == [message.content[0].text]


async def test_a_streamed_message_sends_anthropic_events_of_journaled_text(
    served: Served,
) -> None:
    async with (
        client(served) as sdk,
        sdk.messages.stream(
            model="mock",
            max_tokens=4,
            messages=[{"role": "user", "content": "hello there"}],
            extra_body={"mock_delay_ms": 1},  # a batch a token
        ) as stream,
    ):
        kinds, texts = [], []
        async for event in stream:
            kinds.append(event.type)
            if event.type == "content_block_delta" and event.delta.type == "text_delta":
                texts.append(event.delta.text)
        final = await stream.get_final_message()
    assert kinds[0] == "message_start"
    assert kinds[-2:] == ["message_delta", "message_stop"]
    assert "content_block_start" in kinds
    assert "content_block_stop" in kinds
    assert texts == [token(i) for i in range(4)]
    assert await stored_texts(served) == texts  # each delta stored once, in order
    assert final.content[0].text == "".join(texts)
    assert final.stop_reason == "max_tokens"
    assert final.usage.output_tokens == 4
    assert final.usage.input_tokens == 2


async def test_the_openai_upstream_gets_the_chat_form_and_its_tool_calls_come_back(
    served_upstream: Served,
) -> None:
    served = served_upstream
    async with client(served) as sdk:
        whole = await sdk.messages.create(
            model=UPSTREAM_MODEL, max_tokens=8, tools=TOOLS, messages=CALL
        )
        async with sdk.messages.stream(
            model=UPSTREAM_MODEL, max_tokens=8, tools=TOOLS, messages=CALL
        ) as stream:
            streamed = await stream.get_final_message()
        # The tool's result, sent back: the translation makes a `tool` message of it.
        answer = await sdk.messages.create(
            model=UPSTREAM_MODEL,
            max_tokens=3,
            stop_sequences=["never"],
            tool_choice={"type": "any"},
            tools=TOOLS,
            messages=[
                *CALL,
                {"role": "assistant", "content": [_block(b) for b in whole.content]},
                {
                    "role": "user",
                    "content": [
                        {"type": "tool_result", "tool_use_id": whole.content[0].id, "content": "42"}
                    ],
                },
            ],
        )
    for message in (whole, streamed):
        assert message.stop_reason == "tool_use"
        (use,) = message.content
        assert use.type == "tool_use"
        assert use.name == "lookup"
        assert use.input == {"q": "x"}
    assert answer.content[0].text == expected_content(3)
    assert answer.stop_reason == "max_tokens"
    records = await served.records()
    starts = _by_type(records, RecordType.REQUEST_START)
    assert starts[2]["messages"][1:] == [
        {
            "role": "assistant",
            "content": None,
            "tool_calls": [
                {
                    "id": whole.content[0].id,
                    "type": "function",
                    "function": {"name": "lookup", "arguments": '{"q":"x"}'},
                }
            ],
        },
        {"role": "tool", "tool_call_id": whole.content[0].id, "content": "42"},
    ]
    assert await stored_tool_arguments(served) == '{"q": "x"}' * 2


def assert_batches_of(sent: list[str], stored: list[str]) -> None:
    """Each text_delta sent is one journaled batch: consecutive stored tokens, all of them,
    each once, in order."""
    rest = list(stored)
    for delta in sent:
        batch = ""
        while len(batch) < len(delta) and rest:
            batch += rest.pop(0)
        assert batch == delta, (sent, stored)
    assert rest == []


def _block(block: Any) -> dict[str, Any]:
    return dict(block.model_dump(exclude_none=True))


async def test_an_anthropic_provider_is_sent_the_clients_body_as_is(
    served_anthropic: tuple[Served, AnthropicUpstream],
) -> None:
    served, upstream = served_anthropic
    body: dict[str, Any] = {
        "max_tokens": 3,
        "system": [{"type": "text", "text": "be brief", "cache_control": {"type": "ephemeral"}}],
        "messages": [{"role": "user", "content": [{"type": "text", "text": "hi"}]}],
    }
    async with client(served) as sdk:
        whole = await sdk.messages.create(model=ANTHROPIC_MODEL, **body)
        async with sdk.messages.stream(model=ANTHROPIC_MODEL, **body) as stream:
            texts = [text async for text in stream.text_stream]
            streamed = await stream.get_final_message()
        async with sdk.messages.stream(
            model=ANTHROPIC_MODEL, max_tokens=8, tools=TOOLS, messages=CALL
        ) as stream:
            called = await stream.get_final_message()
        counted = await sdk.messages.count_tokens(
            model=ANTHROPIC_MODEL, messages=body["messages"], system=body["system"]
        )
    assert upstream.requests[0] == {"model": ANTHROPIC_MODEL, **body, "stream": False}
    assert upstream.requests[1] == {"model": ANTHROPIC_MODEL, **body, "stream": True}
    assert whole.content[0].text == "w0 w1 w2 "
    assert whole.usage.input_tokens == 3  # the upstream's count: a word a token
    assert "".join(texts) == "w0 w1 w2 "
    assert streamed.content[0].text == "w0 w1 w2 "
    assert streamed.stop_reason == "max_tokens"
    assert (streamed.usage.input_tokens, streamed.usage.output_tokens) == (3, 3)
    assert called.content[0].type == "tool_use"
    assert called.content[0].input == {"q": "x"}
    assert called.stop_reason == "tool_use"
    assert counted.input_tokens == 3
    assert upstream.counted == [
        {"model": ANTHROPIC_MODEL, "messages": body["messages"], "system": body["system"]}
    ]
    assert upstream.betas == [None] * 4  # no beta asked for, none sent
    stored = await stored_texts(served)
    assert stored[0] == whole.content[0].text  # a whole reply is one piece
    assert_batches_of(texts, stored[1:])


async def test_an_anthropic_provider_is_sent_the_clients_betas(
    served_anthropic: tuple[Served, AnthropicUpstream],
) -> None:
    """Claude Code calls the beta namespace (`?beta=true`, an `anthropic-beta` header): a beta's
    body fields are refused upstream unless its header comes along."""
    served, upstream = served_anthropic
    betas = ["context-management-2025-06-27", "interleaved-thinking-2025-05-14"]
    messages: Any = [{"role": "user", "content": "hi"}]
    async with client(served) as sdk:
        async with sdk.beta.messages.stream(
            model=ANTHROPIC_MODEL, max_tokens=2, messages=messages, betas=betas
        ) as stream:
            texts = [text async for text in stream.text_stream]
        counted = await sdk.beta.messages.count_tokens(
            model=ANTHROPIC_MODEL, messages=messages, betas=betas[:1]
        )
    assert "".join(texts) == "w0 w1 "
    assert counted.input_tokens == 1
    streamed_betas, counted_betas = upstream.betas
    assert streamed_betas == ",".join(betas)
    assert counted_betas is not None  # the SDK adds its token-counting beta to ours
    assert betas[0] in counted_betas.split(",")
    assert_batches_of(texts, await stored_texts(served))


async def test_a_failure_mid_stream_is_an_anthropic_error_event_after_journaled_text(
    served_anthropic: tuple[Served, AnthropicUpstream],
) -> None:
    served, _ = served_anthropic
    provider = served.gateway.router.targets(ANTHROPIC_MODEL)[0].provider
    provider.url = provider.url.replace("/v1/messages", "/with/fail/error-after:2/v1/messages")  # type: ignore[attr-defined]
    raw = await served.session.post(
        served.url + "/v1/messages",
        json={
            "model": ANTHROPIC_MODEL,
            "max_tokens": 5,
            "stream": True,
            "messages": [{"role": "user", "content": "hi"}],
        },
    )
    body = await raw.read()
    events = [frame.split(b"\ndata: ") for frame in body.rstrip(b"\n").split(b"\n\n")]
    kinds = [kind.removeprefix(b"event: ").decode() for kind, _ in events]
    assert kinds[0] == "message_start"
    assert kinds[-1] == "error"
    error = orjson.loads(events[-1][1])
    assert error["type"] == "error"
    assert error["error"]["type"] == "overloaded_error"  # a retryable upstream failure
    sent = [
        orjson.loads(data)["delta"]["text"]
        for kind, data in events
        if kind == b"event: content_block_delta"
    ]
    assert "".join(sent) == "w0 w1 "
    assert_batches_of(sent, await stored_texts(served))


@pytest.mark.parametrize(
    ("body", "error", "field"),
    [
        (
            {"model": "mock", "max_tokens": 0, "messages": [{"role": "user", "content": "x"}]},
            "BadRequest",
            "max_tokens",
        ),
        (
            {"model": "mock", "max_tokens": 2, "messages": [{"role": "system", "content": "x"}]},
            "BadRequest",
            "messages.0.role",
        ),
        (
            {
                "model": "mock",
                "max_tokens": 2,
                "messages": [{"role": "user", "content": [{"type": "tool_use", "id": "t"}]}],
            },
            "BadRequest",
            "messages.0.content.0.name",
        ),
        (
            {"model": "nope", "max_tokens": 2, "messages": [{"role": "user", "content": "x"}]},
            "NotFound",
            "nope",
        ),
        (
            {
                "model": UNREACHABLE_MODEL,
                "max_tokens": 2,
                "messages": [{"role": "user", "content": "x"}],
            },
            "InternalServer",
            "far",
        ),
    ],
    ids=["zero-max-tokens", "bad-role", "bad-block", "unknown-model", "upstream-down"],
)
async def test_errors_are_in_anthropics_shape_and_the_sdk_raises_its_class(
    served: Served, body: dict[str, Any], error: str, field: str
) -> None:
    expected = getattr(anthropic, error + "Error")
    async with client(served) as sdk:
        with pytest.raises(expected) as caught:
            await sdk.messages.create(**body)
    doc = caught.value.body
    assert isinstance(doc, dict)
    assert doc["type"] == "error"
    assert set(doc["error"]) == {"type", "message"}
    assert field in doc["error"]["message"]
    if error == "BadRequest":
        assert doc["error"]["type"] == "invalid_request_error"
        assert served.writer.appended_lsn == 0  # nothing journaled for a bad request


async def test_routes_under_messages_answer_in_anthropics_shape(served: Served) -> None:
    async with served.session.get(served.url + "/v1/messages") as r:
        assert r.status == 405
        assert (await r.json())["error"]["type"] == "invalid_request_error"
    async with served.session.post(served.url + "/v1/messages/nope", json={}) as r:
        assert r.status == 404
        assert await r.json() == {
            "type": "error",
            "error": {"type": "not_found_error", "message": "no route /v1/messages/nope"},
        }
    big = {"model": "mock", "max_tokens": 1, "messages": [{"role": "user", "content": "x" * 5000}]}
    async with served.session.post(served.url + "/v1/messages", json=big) as r:
        assert r.status == 413
        assert (await r.json())["error"]["type"] == "request_too_large"


async def test_count_tokens_for_another_kind_is_llmsvcs_tokenizer_count(served: Served) -> None:
    async with client(served) as sdk:
        counted = await sdk.messages.count_tokens(
            model="mock", system="be brief", messages=[{"role": "user", "content": "hello"}]
        )
    messages = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "hello"}]
    assert counted.input_tokens == count_prompt("mock", messages)[0]
    assert served.writer.appended_lsn == 0  # not a generation: nothing journaled


async def test_claude_codes_beta_requests_and_images_reach_the_chat_form(served: Served) -> None:
    """The SDK's beta client adds `?beta=true` and an `anthropic-beta` header, as Claude Code
    does; images become OpenAI `image_url` parts."""
    content: list[Any] = [
        {"type": "text", "text": "what is this", "cache_control": {"type": "ephemeral"}},
        {"type": "image", "source": {"type": "base64", "media_type": "image/png", "data": "iVBO"}},
        {"type": "image", "source": {"type": "url", "url": "http://127.0.0.1/a.png"}},
    ]
    async with client(served) as sdk:
        message = await sdk.beta.messages.create(
            model="mock",
            max_tokens=2,
            messages=[{"role": "user", "content": content}],
            betas=["interleaved-thinking-2025-05-14"],
        )
    assert message.content[0].text == token(0) + token(1)
    (start,) = _by_type(await served.records(), RecordType.REQUEST_START)
    assert start["messages"] == [
        {
            "role": "user",
            "content": [
                {"type": "text", "text": "what is this"},
                {"type": "image_url", "image_url": {"url": "data:image/png;base64,iVBO"}},
                {"type": "image_url", "image_url": {"url": "http://127.0.0.1/a.png"}},
            ],
        }
    ]
    assert start["params"]["messages"][0]["content"] == content  # as the client sent it


async def test_a_refusal_is_sent_as_journaled_text(served_upstream: Served) -> None:
    async with (
        client(served_upstream) as sdk,
        sdk.messages.stream(
            model=UPSTREAM_MODEL,
            max_tokens=5,
            messages=[{"role": "user", "content": "refuse:I will not do that"}],
        ) as stream,
    ):
        texts = [text async for text in stream.text_stream]
        final = await stream.get_final_message()
    assert "".join(texts) == "I will not do that"
    assert final.content[0].text == "I will not do that"
    assert_batches_of(texts, await stored_texts(served_upstream))

"""`POST /v1/responses` on the wire, through the official `openai` SDK: the mock, the fake
OpenAI chat upstream and the fake Anthropic upstream (translated), streamed and not; every
delta a client gets is the journal's."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator, Callable
from typing import Any

import openai
import pytest
from served_gateway import (
    ANTHROPIC_MODEL,
    UPSTREAM_MODEL,
    Served,
    _assert_nothing_recorded,
    _by_type,
)
from upstreams.openai_upstream import expected_content

from llmsvc.gateway.responses import forwardable
from llmsvc.providers.mock import token
from llmsvc.wal.codec import RecordType

TOOLS: list[Any] = [
    {
        "type": "function",
        "name": "lookup",
        "description": "find a thing",
        "parameters": {"type": "object", "properties": {"q": {"type": "string"}}},
        "strict": False,
    }
]


Client = Callable[[Served], openai.AsyncOpenAI]


@pytest.fixture
async def sdk() -> AsyncIterator[Client]:
    """The official SDK's async client for a served gateway; closed after the test."""
    made: list[openai.AsyncOpenAI] = []

    def make(served: Served) -> openai.AsyncOpenAI:
        made.append(openai.AsyncOpenAI(base_url=served.url + "/v1", api_key="x", max_retries=0))
        return made[-1]

    yield make
    for client in made:
        await client.close()


async def journaled_text(served: Served) -> list[str]:
    return [text for _a, _s, text, _ts in _by_type(await served.records(), RecordType.TOKEN)]


async def test_a_whole_response_in_openais_shape(served: Served, sdk: Client) -> None:
    response = await sdk(served).responses.create(
        model="mock",
        input=[{"role": "user", "content": [{"type": "input_text", "text": "hello there"}]}],
        instructions="be brief",
        max_output_tokens=5,
        metadata={"team": "a"},
    )
    text = "".join(token(i) for i in range(5))
    assert response.id.startswith("resp_")
    assert response.object == "response"
    assert response.status == "incomplete"  # it stopped at max_output_tokens
    assert response.incomplete_details is not None
    assert response.incomplete_details.reason == "max_output_tokens"
    assert response.output_text == text
    [message] = response.output
    assert message.type == "message"
    assert message.id.startswith("msg_")
    assert message.content[0].type == "output_text"
    assert message.content[0].annotations == []
    assert (response.instructions, response.metadata) == ("be brief", {"team": "a"})
    assert response.max_output_tokens == 5
    assert response.store is True
    assert response.usage is not None
    assert (response.usage.input_tokens, response.usage.output_tokens) == (4, 5)
    assert response.usage.total_tokens == 9
    records = await served.records()
    [start] = _by_type(records, RecordType.REQUEST_START)
    assert start["api"] == "responses"
    assert start["messages"] == [
        {"role": "system", "content": "be brief"},
        {"role": "user", "content": "hello there"},
    ]
    assert start["params"]["instructions"] == "be brief"
    assert "model" not in start["params"]
    assert await journaled_text(served) == [text]


async def test_a_stream_in_openais_order_each_delta_journaled(served: Served, sdk: Client) -> None:
    events = []
    async with sdk(served).responses.stream(
        model="mock", input="hello there", max_output_tokens=4, extra_body={"mock_delay_ms": 1}
    ) as stream:
        async for event in stream:
            events.append(event)
    final = events[-1].response  # an incomplete response: get_final_response wants completed
    kinds = [e.type for e in events]
    deltas = [e.delta for e in events if e.type == "response.output_text.delta"]
    assert kinds == [
        "response.created",
        "response.in_progress",
        "response.output_item.added",
        "response.content_part.added",
        *["response.output_text.delta"] * len(deltas),
        "response.output_text.done",
        "response.content_part.done",
        "response.output_item.done",
        "response.incomplete",
    ]
    assert [e.sequence_number for e in events] == list(range(len(events)))
    assert deltas == await journaled_text(served)  # each delta, as journaled, in order
    assert "".join(deltas) == "".join(token(i) for i in range(4)) == final.output_text
    assert final.status == "incomplete"


@pytest.mark.parametrize("stream", [False, True], ids=["whole", "stream"])
async def test_tool_calls_from_an_openai_chat_upstream(
    served_upstream: Served, stream: bool, sdk: Client
) -> None:
    body: dict[str, Any] = {"model": UPSTREAM_MODEL, "input": "call:lookup", "tools": TOOLS}
    if stream:
        async with sdk(served_upstream).responses.stream(**body) as events:
            kinds = [event.type async for event in events]
            response = await events.get_final_response()
        assert kinds[2:] == [
            "response.output_item.added",
            "response.function_call_arguments.delta",
            "response.function_call_arguments.delta",
            "response.function_call_arguments.done",
            "response.output_item.done",
            "response.completed",
        ]
    else:
        response = await sdk(served_upstream).responses.create(**body)
    [call] = response.output
    assert call.type == "function_call"
    assert (call.name, call.arguments, call.status) == ("lookup", '{"q": "x"}', "completed")
    assert call.call_id
    assert call.id is not None
    assert call.id.startswith("fc_")
    assert response.tools[0].type == "function"
    assert response.tools[0].name == "lookup"
    records = await served_upstream.records()
    [start] = _by_type(records, RecordType.REQUEST_START)
    assert start["messages"][0] == {"role": "user", "content": "call:lookup"}
    journaled = [delta for _a, _s, delta, _ts in _by_type(records, RecordType.TOOL_DELTA)]
    assert "".join(d.get("arguments") or "" for d in journaled) == call.arguments
    assert journaled[0]["name"] == "lookup"
    assert journaled[0]["id"] == call.call_id


async def test_a_function_call_output_continues_the_conversation(
    served_upstream: Served, sdk: Client
) -> None:
    response = await sdk(served_upstream).responses.create(
        model=UPSTREAM_MODEL,
        input=[
            {"role": "user", "content": "find x"},
            {"type": "function_call", "call_id": "c1", "name": "lookup", "arguments": "{}"},
            {"type": "function_call_output", "call_id": "c1", "output": "x is 3"},
        ],
        tools=TOOLS,
        max_output_tokens=3,
    )
    assert response.output_text == expected_content(3)
    [start] = _by_type(await served_upstream.records(), RecordType.REQUEST_START)
    assert start["messages"][1:] == [
        {
            "role": "assistant",
            "content": None,
            "tool_calls": [
                {"id": "c1", "type": "function", "function": {"name": "lookup", "arguments": "{}"}}
            ],
        },
        {"role": "tool", "tool_call_id": "c1", "content": "x is 3"},
    ]


@pytest.mark.parametrize("stream", [False, True], ids=["whole", "stream"])
async def test_a_refusal_is_a_refusal_part(
    served_upstream: Served, stream: bool, sdk: Client
) -> None:
    body: dict[str, Any] = {"model": UPSTREAM_MODEL, "input": "refuse:not that"}
    if stream:
        async with sdk(served_upstream).responses.stream(**body) as events:
            kinds = [event.type async for event in events]
            response = await events.get_final_response()
        assert "response.refusal.delta" in kinds
        assert "response.refusal.done" in kinds
    else:
        response = await sdk(served_upstream).responses.create(**body)
    [message] = response.output
    assert message.type == "message"
    assert [(p.type, getattr(p, "refusal", None)) for p in message.content] == [
        ("refusal", "not that")
    ]


async def test_an_anthropic_upstream_streams_text_and_calls_tools(
    served_anthropic: tuple[Served, Any], sdk: Client
) -> None:
    served = served_anthropic[0]
    async with sdk(served).responses.stream(
        model=ANTHROPIC_MODEL, input="hello", instructions="sys", max_output_tokens=3
    ) as stream:
        events = [event async for event in stream]
    deltas = [e.delta for e in events if e.type == "response.output_text.delta"]
    final = events[-1].response
    assert "".join(deltas) == "w0 w1 w2 " == final.output_text
    assert "".join(deltas) == "".join(await journaled_text(served))  # batches joined
    called = await sdk(served).responses.create(
        model=ANTHROPIC_MODEL, input="call:lookup", tools=TOOLS
    )
    async with sdk(served).responses.stream(
        model=ANTHROPIC_MODEL, input="call:lookup", tools=TOOLS
    ) as stream:
        streamed = await stream.get_final_response()
    for response in (called, streamed):
        [call] = response.output
        assert call.type == "function_call"
        assert (call.name, json.loads(call.arguments)) == ("lookup", {"q": "x"})
    answered = await sdk(served).responses.create(
        model=ANTHROPIC_MODEL,
        input=[
            {"role": "user", "content": "call:lookup"},
            {"type": "function_call", "call_id": call.call_id, "name": "lookup", "arguments": "{}"},
            {"type": "function_call_output", "call_id": call.call_id, "output": "x is 3"},
        ],
        tools=TOOLS,
        max_output_tokens=2,
    )
    assert answered.output_text == "w0 w1 "  # tool_use and tool_result blocks, as Anthropic takes


@pytest.mark.parametrize(
    ("body", "param"),
    [
        ({"model": "mock"}, "input"),
        ({"model": "mock", "input": [{"role": "tool", "content": "x"}]}, "input.0.message.role"),
        ({"model": "mock", "input": "x", "tools": [{"type": "web_search"}]}, "tools.0"),
        ({"model": "mock", "input": "x", "reasoning": {"effort": "low"}}, "reasoning"),
        ({"model": "mock", "input": "x", "max_output_tokens": 0}, "max_output_tokens"),
    ],
    ids=["no-input", "bad-role", "hosted-tool", "unknown-field", "no-tokens"],
)
async def test_bad_input_is_a_400_naming_the_field(
    served: Served, body: dict[str, Any], param: str, sdk: Client
) -> None:
    with pytest.raises(openai.BadRequestError) as caught:
        await sdk(served).post("/responses", body=body, cast_to=dict)
    error = caught.value.body
    assert isinstance(error, dict)
    assert error["param"] == param, error
    await _assert_nothing_recorded(served)


async def test_a_stream_cut_by_shutdown_ends_with_response_failed(
    served: Served, sdk: Client
) -> None:
    stream = await sdk(served).responses.create(
        model="mock",
        input="hello there",
        max_output_tokens=1000,
        stream=True,
        extra_body={"mock_delay_ms": 5},
    )
    events = []
    stopping = None
    async for event in stream:
        events.append(event)
        if event.type == "response.output_text.delta" and stopping is None:
            stopping = asyncio.create_task(served.gateway.finish_requests(0, 5))
    assert stopping is not None
    assert await stopping == 1
    last = events[-1]
    assert last.type == "response.failed"
    assert last.response.status == "failed"
    assert last.response.error is not None
    assert "shut down" in last.response.error.message
    deltas = [e.delta for e in events if e.type == "response.output_text.delta"]
    assert deltas == await journaled_text(served)
    [message] = last.response.output
    assert message.status == "incomplete"
    assert message.content[0].text == "".join(deltas)


def test_a_continued_body_forwards_its_history_as_input_items() -> None:
    """The body a Responses upstream gets: the stored turn as items, then the client's input,
    without previous_response_id (the upstream never saw that response)."""
    history = [
        {"role": "user", "content": "find x"},
        {
            "role": "assistant",
            "content": "looking",
            "tool_calls": [
                {"id": "c1", "type": "function", "function": {"name": "f", "arguments": "{}"}}
            ],
        },
        {"role": "tool", "tool_call_id": "c1", "content": "3"},
        {"role": "assistant", "content": "x is 3"},
    ]
    client = {"model": "m", "input": "thanks", "previous_response_id": "resp_1", "store": True}
    assert forwardable(client, history) == {
        "model": "m",
        "store": True,
        "input": [
            {
                "type": "message",
                "role": "user",
                "content": [{"type": "input_text", "text": "find x"}],
            },
            {
                "type": "message",
                "role": "assistant",
                "content": [{"type": "output_text", "text": "looking", "annotations": []}],
            },
            {"type": "function_call", "call_id": "c1", "name": "f", "arguments": "{}"},
            {"type": "function_call_output", "call_id": "c1", "output": "3"},
            {
                "type": "message",
                "role": "assistant",
                "content": [{"type": "output_text", "text": "x is 3", "annotations": []}],
            },
            {"type": "message", "role": "user", "content": "thanks"},
        ],
    }

"""`POST /v1/responses` to an upstream that serves the Responses API itself (`responses =
true`): the client's body goes there as sent, the reply's pieces are journaled before the
client gets them, and what the client gets, from every kind of provider, validates against
OpenAI's published schemas (the `Response` object and every stream event)."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from typing import Any

import openai
import pytest
from openai_schema import assert_valid
from served_gateway import UPSTREAM_MODEL, Served, _by_type
from upstreams.openai_upstream import Upstream, expected_content

from llmsvc.errors import ProviderUnavailable
from llmsvc.gateway.errors import describe
from llmsvc.gateway.responses_wire import ResponsesWire, echoed
from llmsvc.wal.codec import RecordType

TOOLS: list[Any] = [
    {
        "type": "function",
        "name": "lookup",
        "parameters": {"type": "object", "properties": {"q": {"type": "string"}}},
    }
]


@pytest.fixture
async def native(served_responses: tuple[Served, Upstream]) -> AsyncIterator[Any]:
    """The gateway, its upstream and an SDK client of the gateway."""
    served, upstream = served_responses
    async with openai.AsyncOpenAI(
        base_url=served.url + "/v1", api_key="x", max_retries=0
    ) as client:
        yield served, upstream, client


async def _journaled(served: Served) -> str:
    return "".join(t for _a, _s, t, _ts in _by_type(await served.records(), RecordType.TOKEN))


async def _events(client: openai.AsyncOpenAI, **body: Any) -> list[dict[str, Any]]:
    """A streamed response's events as sent, each checked against ResponseStreamEvent."""
    raw = await client.responses.with_raw_response.create(stream=True, **body)
    text = (await raw.http_response.aread()).decode()
    events = [json.loads(line[6:]) for line in text.splitlines() if line.startswith("data: ")]
    for event in events:
        assert_valid(event, "ResponseStreamEvent")
    return events


async def test_a_whole_response_is_forwarded_as_sent_and_validates(native: Any) -> None:
    served, upstream, client = native
    raw = await client.responses.with_raw_response.create(
        model=UPSTREAM_MODEL, input="hello there", instructions="brief", max_output_tokens=3
    )
    body = json.loads(raw.text)
    assert_valid(body, "Response")
    sent = upstream.responses_received[-1]
    assert (sent["input"], sent["instructions"], sent["store"]) == ("hello there", "brief", False)
    text = body["output"][0]["content"][0]["text"]
    assert text == expected_content(3) == await _journaled(served)
    assert body["status"] == "incomplete"  # max_output_tokens reached, as the upstream said


async def test_a_stream_is_journaled_delta_by_delta_and_every_event_validates(
    native: Any,
) -> None:
    served, upstream, client = native
    events = await _events(client, model=UPSTREAM_MODEL, input="hello there")
    deltas = [e["delta"] for e in events if e["type"] == "response.output_text.delta"]
    assert "".join(deltas) == expected_content(16) == await _journaled(served)
    assert events[0]["type"] == "response.created"
    assert events[-1]["type"] == "response.completed"
    assert [e["sequence_number"] for e in events] == list(range(len(events)))
    assert upstream.responses_received[-1]["stream"] is True


async def test_a_function_call_streams_and_its_deltas_are_journaled(native: Any) -> None:
    served, _upstream, client = native
    events = await _events(client, model=UPSTREAM_MODEL, input="call:lookup", tools=TOOLS)
    done = [e["item"] for e in events if e["type"] == "response.output_item.done"]
    calls = [item for item in done if item["type"] == "function_call"]
    assert [(c["name"], json.loads(c["arguments"])) for c in calls] == [("lookup", {"q": "x"})]
    journaled = _by_type(await served.records(), RecordType.TOOL_DELTA)
    assert (
        "".join(d.get("arguments") or "" for _a, _s, d, _ts in journaled) == calls[0]["arguments"]
    )


async def test_a_refusal_reaches_the_client_and_the_journal(native: Any) -> None:
    served, _upstream, client = native
    response = await client.responses.create(model=UPSTREAM_MODEL, input="refuse:Not that.")
    parts = [part for item in response.output if item.type == "message" for part in item.content]
    refused = "".join(p.refusal for p in parts if p.type == "refusal")
    assert refused == "Not that." == await _journaled(served)


@pytest.mark.parametrize("ask", ["text", "tool_call", "refusal"])
async def test_translated_replies_validate_too(served_upstream: Served, ask: str) -> None:
    """A chat-only upstream: the Responses object and events are llmsvc's translation."""
    inputs = {"text": "hello", "tool_call": "call:lookup", "refusal": "refuse:No."}
    body: dict[str, Any] = {"model": UPSTREAM_MODEL, "input": inputs[ask], "tools": TOOLS}
    async with openai.AsyncOpenAI(
        base_url=served_upstream.url + "/v1", api_key="x", max_retries=0
    ) as client:
        assert_valid(json.loads((await client.responses.with_raw_response.create(**body)).text),
                     "Response")  # fmt: skip
        events = await _events(client, **body)
    assert events[-1]["type"] == "response.completed"


async def test_the_mocks_replies_validate(served: Served) -> None:
    async with openai.AsyncOpenAI(base_url=served.url + "/v1", api_key="x", max_retries=0) as c:
        body = {"model": "mock", "input": "hello", "max_output_tokens": 4}
        assert_valid(json.loads((await c.responses.with_raw_response.create(**body)).text),
                     "Response")  # fmt: skip
        events = await _events(c, **body)
    assert events[-1]["type"] == "response.incomplete"  # cut at max_output_tokens


def test_the_events_that_end_a_failed_stream_validate() -> None:
    """A stream cut mid-way (shutdown, an upstream's failure) ends in `response.failed`."""
    wire = ResponsesWire("ab12", 1, "mock", echoed({"input": "x"}))
    frames = wire.tokens(["half a "]) + wire.failure(describe(ProviderUnavailable("gone"))[1])
    events = [json.loads(line[6:]) for line in frames.decode().splitlines() if line[:6] == "data: "]
    for event in events:
        assert_valid(event, "ResponseStreamEvent")
    assert events[-1]["type"] == "response.failed"
    assert events[-1]["response"]["error"]["message"]

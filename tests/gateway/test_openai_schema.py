"""llmsvc's real OpenAI-API responses validate against OpenAI's published schemas.

Every body and stream chunk a client gets from the chat-completions, models and error paths is
checked against the component schema OpenAI's OpenAPI document gives it (tests/openai_schema.py).
"""

from __future__ import annotations

import base64
import struct
from typing import Any

import orjson
import pytest
from openai_schema import SCHEMA_NAMES, assert_valid
from served_gateway import (
    UNREACHABLE_MODEL,
    UPSTREAM_MODEL,
    Served,
    _chat,
    _events,
    _post,
)

from llmsvc.errors import BudgetExceeded, ProviderUnavailable, RateLimited
from llmsvc.gateway.errors import describe
from llmsvc.gateway.sse import ChatWire

COMPLETION = "CreateChatCompletionResponse"
CHUNK = "CreateChatCompletionStreamResponse"
ERROR = "ErrorResponse"

TOOLS = [
    {
        "type": "function",
        "function": {"name": "lookup", "parameters": {"type": "object", "properties": {}}},
    }
]

# What the fake upstream answers (tests/upstreams/openai_upstream.py): a tool call, or a refusal.
UPSTREAM_ASKS = {
    "tool_call": {"messages": [{"role": "user", "content": "call:lookup"}], "tools": TOOLS},
    "refusal": {"messages": [{"role": "user", "content": "refuse:I cannot help with that."}]},
}


def _whole(status: int, raw: bytes) -> dict[str, Any]:
    assert status == 200, raw
    doc: dict[str, Any] = orjson.loads(raw)
    assert_valid(doc, COMPLETION)
    return doc


def _chunks(status: int, raw: bytes) -> list[dict[str, Any]]:
    """Every chunk of a stream, each checked against the chunk schema; `[DONE]` ends it."""
    assert status == 200, raw
    *events, done = _events(raw)
    assert done == b"[DONE]"
    chunks = [orjson.loads(event) for event in events]
    for chunk in chunks:
        assert_valid(chunk, CHUNK)
    return chunks


GOOD_COMPLETION = {
    "id": "chatcmpl-1",
    "object": "chat.completion",
    "created": 1,
    "model": "m",
    "choices": [
        {
            "index": 0,
            "message": {"role": "assistant", "content": "hi", "refusal": None},
            "finish_reason": "stop",
            "logprobs": None,
        }
    ],
}


def _broken(path: tuple[Any, ...], value: Any) -> dict[str, Any]:
    """GOOD_COMPLETION with the field at `path` set to `value` (or removed, for _DROP)."""
    doc: dict[str, Any] = orjson.loads(orjson.dumps(GOOD_COMPLETION))
    *parents, last = path
    node: Any = doc
    for key in parents:
        node = node[key]
    if value is _DROP:
        del node[last]
    else:
        node[last] = value
    return doc


_DROP = object()


def test_a_spec_conforming_completion_is_valid() -> None:
    assert_valid(GOOD_COMPLETION, COMPLETION)


@pytest.mark.parametrize(
    ("path", "value", "says"),
    [
        (("choices",), _DROP, "at $: 'choices' is a required property"),
        (("object",), "chat.completions", "at $.object: 'chat.completions' is not one of"),
        (("created",), "1", "at $.created: '1' is not of type 'integer'"),
        (("choices", 0, "finish_reason"), "done", "at $.choices[0].finish_reason: 'done' is not"),
        (("choices", 0, "message", "refusal"), _DROP, "'refusal' is a required property"),
        (("choices", 0, "message", "role"), "user", "at $.choices[0].message.role: 'user' is"),
    ],
    ids=["no-choices", "bad-object", "string-created", "bad-finish", "no-refusal", "bad-role"],
)
def test_a_broken_completion_is_rejected_naming_where(
    path: tuple[Any, ...], value: Any, says: str
) -> None:
    with pytest.raises(AssertionError, match="not a valid CreateChatCompletionResponse") as caught:
        assert_valid(_broken(path, value), COMPLETION)
    assert says in str(caught.value)


def test_the_extract_holds_every_schema_the_apis_answer_with() -> None:
    """The Responses and embeddings APIs are validated with the same extract."""
    assert {
        COMPLETION,
        CHUNK,
        "ListModelsResponse",
        "Model",
        ERROR,
        "CreateEmbeddingResponse",
        "Response",
        "ResponseStreamEvent",
        "ResponseItemList",
    } <= SCHEMA_NAMES
    with pytest.raises(KeyError, match="NoSuchSchema"):
        assert_valid({}, "NoSuchSchema")


async def test_a_whole_text_completion_is_valid(served: Served) -> None:
    doc = _whole(*(await _post(served, _chat(max_tokens=3)))[::2])
    assert doc["choices"][0]["message"]["content"]


async def test_every_chunk_of_a_text_stream_is_valid_the_usage_chunk_too(served: Served) -> None:
    body = _chat(max_tokens=3, stream=True, stream_options={"include_usage": True})
    chunks = _chunks(*(await _post(served, body))[::2])
    assert any(c["choices"] and c["choices"][0]["delta"].get("content") for c in chunks)
    assert chunks[-1]["choices"] == []
    assert chunks[-1]["usage"]["total_tokens"] > 0


@pytest.mark.parametrize("reply", list(UPSTREAM_ASKS), ids=list(UPSTREAM_ASKS))
async def test_a_whole_upstream_reply_is_valid(served_upstream: Served, reply: str) -> None:
    body = {"model": UPSTREAM_MODEL, **UPSTREAM_ASKS[reply]}
    message = _whole(*(await _post(served_upstream, body))[::2])["choices"][0]["message"]
    assert message[reply + "s" if reply == "tool_call" else reply]


@pytest.mark.parametrize("reply", list(UPSTREAM_ASKS), ids=list(UPSTREAM_ASKS))
async def test_every_chunk_of_an_upstream_stream_is_valid(
    served_upstream: Served, reply: str
) -> None:
    body = {
        "model": UPSTREAM_MODEL,
        "stream": True,
        "stream_options": {"include_usage": True},
        **UPSTREAM_ASKS[reply],
    }
    chunks = _chunks(*(await _post(served_upstream, body))[::2])
    field = "tool_calls" if reply == "tool_call" else "refusal"
    assert any(c["choices"] and c["choices"][0]["delta"].get(field) for c in chunks)
    assert chunks[-1]["usage"] is not None


async def test_the_model_list_and_a_model_are_valid(served: Served) -> None:
    async with served.session.get(served.url + "/v1/models") as r:
        assert r.status == 200
        listed = await r.json()
    assert_valid(listed, "ListModelsResponse")
    async with served.session.get(served.url + "/v1/models/mock") as r:
        assert r.status == 200
        assert_valid(await r.json(), "Model")


@pytest.mark.parametrize(
    ("body", "status"),
    [
        (b"{not json", 400),
        (orjson.dumps(_chat(temperature="hot")), 400),
        (orjson.dumps(_chat(model="gpt-nowhere")), 404),
        (orjson.dumps(_chat(model=UNREACHABLE_MODEL)), 502),
    ],
    ids=["bad-json", "bad-field", "unknown-model", "unreachable"],
)
async def test_an_error_body_is_valid(served: Served, body: bytes, status: int) -> None:
    got, _, raw = await _post(served, body)
    assert got == status, raw
    assert_valid(orjson.loads(raw), ERROR)


async def test_an_unknown_path_and_an_unknown_model_id_are_valid_errors(served: Served) -> None:
    for path in ("/v1/nowhere", "/v1/models/nowhere"):
        async with served.session.get(served.url + path) as r:
            assert r.status == 404
            assert_valid(await r.json(), ERROR)


@pytest.mark.parametrize(
    "exc",
    [
        RateLimited("over the key's requests per minute", kind="requests", headers=[]),
        BudgetExceeded("the key's budget is spent", kind="insufficient_quota", headers=[]),
        ProviderUnavailable("the upstream is rate limited", status=429),
    ],
    ids=["rate-limited", "budget-spent", "upstream-429"],
)
def test_a_429_body_is_valid(exc: Exception) -> None:
    """A served 429 needs keys with limits in a store, or an upstream steered per request;
    its body is the one `describe` builds, checked here."""
    status, error = describe(exc)
    assert status == 429
    assert_valid({"error": error}, ERROR)


def test_the_event_that_ends_a_failed_stream_is_a_valid_error() -> None:
    """After the first chunk an error can only be an SSE event: `data: {"error": ...}`."""
    wire = ChatWire("chatcmpl-1", 1, "mock", include_usage=False)
    _, error = describe(ProviderUnavailable("the upstream dropped the stream"))
    frame, done = _events(wire.failure(error))
    assert done == b"[DONE]"
    assert_valid(orjson.loads(frame), ERROR)


async def _embeddings(gateway: Served, model: str, encoding: str) -> None:
    """A list of inputs embedded, the answer checked against OpenAI's schema. The schema types
    `embedding` as the float list only, though OpenAI answers `base64` with a string of
    little-endian float32s: such an answer is checked with its strings decoded."""
    body = {"model": model, "input": ["one", "two words"], "encoding_format": encoding}
    async with gateway.session.post(gateway.url + "/v1/embeddings", json=body) as r:
        assert r.status == 200, await r.read()
        doc: dict[str, Any] = await r.json()
    if encoding == "base64":
        for item in doc["data"]:
            raw = base64.b64decode(item["embedding"], validate=True)
            item["embedding"] = list(struct.unpack(f"<{len(raw) // 4}f", raw))
    assert_valid(doc, "CreateEmbeddingResponse")
    assert [d["index"] for d in doc["data"]] == [0, 1]
    assert all(len(d["embedding"]) > 0 for d in doc["data"])


@pytest.mark.parametrize("encoding", ["float", "base64"])
async def test_the_mocks_embeddings_are_valid(served: Served, encoding: str) -> None:
    await _embeddings(served, "mock", encoding)


@pytest.mark.parametrize("encoding", ["float", "base64"])
async def test_an_upstreams_embeddings_are_valid(served_upstream: Served, encoding: str) -> None:
    await _embeddings(served_upstream, UPSTREAM_MODEL, encoding)


def test_a_batch_of_tokens_is_the_chunks_of_its_tokens_back_to_back() -> None:
    """A read of several tokens becomes one write: the same bytes as a chunk per token."""
    wire = ChatWire("chatcmpl-1", 1, "mock", include_usage=False)
    texts = ["a", ' "b"\n', "ç"]
    assert wire.tokens(texts) == b"".join(wire.tokens([t]) for t in texts)
    frames = wire.tokens(texts).split(b"\n\n")[:-1]
    assert [orjson.loads(f.removeprefix(b"data: "))["choices"][0]["delta"] for f in frames] == [
        {"content": t} for t in texts
    ]

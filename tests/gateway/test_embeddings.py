"""`POST /v1/embeddings` over HTTP, with the official `openai` SDK as the client.

The mock and the fake OpenAI upstream answer; the SDK (which asks for base64 and decodes it)
gets the vectors they made; the WAL holds the request as an `embeddings` one with its usage,
and its vectors only when `store_embeddings` asks.
"""

from __future__ import annotations

import uuid
from typing import Any

import openai
import orjson
import pytest
from served_gateway import (
    UNREACHABLE_MODEL,
    UPSTREAM_MODEL,
    Served,
    _assert_nothing_recorded,
    _by_type,
    _error,
)
from upstreams.openai_upstream import expected_embedding

from llmsvc.config import ProviderConfig
from llmsvc.errors import ClientError, ProviderError
from llmsvc.gateway.embeddings import MAX_INPUTS, parse_embeddings
from llmsvc.providers.anthropic import AnthropicProvider
from llmsvc.providers.base import Native
from llmsvc.providers.mock import vector
from llmsvc.tokens import count_input
from llmsvc.wal.codec import RecordType

EMBEDDINGS = "/v1/embeddings"


def sdk(served: Served) -> openai.AsyncOpenAI:
    return openai.AsyncOpenAI(base_url=served.url + "/v1", api_key="x", max_retries=0)


async def post(served: Served, body: Any) -> tuple[int, bytes]:
    async with served.session.post(served.url + EMBEDDINGS, data=orjson.dumps(body)) as r:
        return r.status, await r.read()


async def test_the_sdk_gets_the_mocks_vectors_in_base64_and_float_alike(served: Served) -> None:
    async with sdk(served) as client:
        encoded = await client.embeddings.create(model="mock", input=["hello there", "hi"])
        floats = await client.embeddings.create(
            model="mock", input=["hello there", "hi"], encoding_format="float"
        )
        short = await client.embeddings.create(model="mock", input="hi", dimensions=5)
    expected = [vector("hello there", 16), vector("hi", 16)]
    assert [d.embedding for d in encoded.data] == [d.embedding for d in floats.data] == expected
    assert [d.index for d in encoded.data] == [0, 1]
    assert sum(x * x for x in expected[0]) == pytest.approx(1.0)
    assert encoded.usage.prompt_tokens == encoded.usage.total_tokens == 3
    assert encoded.model == "mock"
    assert short.data[0].embedding == vector("hi", 5)


async def test_the_body_is_openais_create_embedding_response(served: Served) -> None:
    status, raw = await post(served, {"model": "mock", "input": "hi", "encoding_format": "float"})
    assert status == 200, raw
    assert orjson.loads(raw) == {
        "object": "list",
        "data": [{"object": "embedding", "index": 0, "embedding": vector("hi", 16)}],
        "model": "mock",
        "usage": {"prompt_tokens": 1, "total_tokens": 1},
    }


@pytest.mark.parametrize("store", [False, True], ids=["default", "store_embeddings"])
async def test_the_journal_holds_an_embeddings_request_and_its_vectors_only_if_asked(
    served: Served, store: bool
) -> None:
    served.gateway.store_embeddings = store
    body = {"model": "mock", "input": ["a b c", "d"], "dimensions": 4, "user": "u1"}
    status, raw = await post(served, body)
    assert status == 200, raw
    records = await served.records()
    [start] = _by_type(records, RecordType.REQUEST_START)
    assert start["api"] == "embeddings"
    assert start["messages"] == []
    assert start["params"] == {k: v for k, v in body.items() if k != "model"}
    assert start["stream"] is False
    assert start["user"] == "u1"
    [attempt] = _by_type(records, RecordType.ATTEMPT_START)
    [end] = _by_type(records, RecordType.REQUEST_END)
    assert (end["status"], end["prompt_tokens"], end["completion_tokens"]) == ("completed", 4, 0)
    assert end["prompt_tokens_source"] == end["completion_tokens_source"] == "provider"
    tokens = [(aid, seq, text) for aid, seq, text, _ in _by_type(records, RecordType.TOKEN)]
    vectors = [d["embedding"] for d in orjson.loads(raw)["data"]]
    if store:
        assert tokens == [(uuid.UUID(attempt["id"]).bytes, 0, orjson.dumps(vectors).decode())]
    else:
        assert tokens == []


async def test_a_provider_that_cannot_be_reached_is_retried_then_the_next_target_embeds(
    served: Served,
) -> None:
    router = served.gateway.router
    router.routes["emb"] = [*router.targets(UNREACHABLE_MODEL), *router.targets("mock")]
    status, raw = await post(served, {"model": "emb", "input": "hi", "encoding_format": "float"})
    assert status == 200, raw
    assert orjson.loads(raw)["data"][0]["embedding"] == vector("hi", 16)
    records = await served.records()
    attempts = [
        (a["provider"], a["attempt_no"]) for a in _by_type(records, RecordType.ATTEMPT_START)
    ]
    assert attempts == [("far", 1), ("far", 2), ("mock", 3)]
    ends = [e["status"] for e in _by_type(records, RecordType.ATTEMPT_END)]
    assert ends == ["failed", "failed", "completed"]


async def test_the_upstream_is_sent_the_body_natively_and_its_vectors_reach_the_sdk(
    served_upstream: Served,
) -> None:
    async with sdk(served_upstream) as client:
        encoded = await client.embeddings.create(
            model=UPSTREAM_MODEL, input=["one two", "three"], dimensions=6
        )
        floats = await client.embeddings.create(
            model=UPSTREAM_MODEL, input=[[1, 2, 3]], encoding_format="float"
        )
    assert [d.embedding for d in encoded.data] == [
        expected_embedding("one two", 6),
        expected_embedding("three", 6),
    ]
    assert encoded.usage.prompt_tokens == 3
    assert floats.data[0].embedding == expected_embedding([1, 2, 3])
    assert floats.usage.prompt_tokens == 3


async def test_an_integral_float_dimensions_goes_upstream_as_an_int(
    served_upstream: Served,
) -> None:
    body = {"model": UPSTREAM_MODEL, "input": "x", "dimensions": 3.0, "encoding_format": "float"}
    status, raw = await post(served_upstream, body)
    assert status == 200, raw  # the upstream refuses a float
    assert orjson.loads(raw)["data"][0]["embedding"] == expected_embedding("x", 3)


async def test_fields_openai_does_not_take_on_embeddings_stay_with_llmsvc(
    served_upstream: Served,
) -> None:
    """The fake upstream refuses fields OpenAI's embeddings do not take, as OpenAI does."""
    body = {"model": UPSTREAM_MODEL, "input": "x", "stream": False, "user": "u",
            "metadata": {"team": "a"}, "session_id": "s1"}  # fmt: skip
    status, raw = await post(served_upstream, body)
    assert status == 200, raw
    [start] = _by_type(await served_upstream.records(), RecordType.REQUEST_START)
    assert start["params"] == {"input": "x", "user": "u"}
    assert (start["metadata"], start["session_id"]) == ({"team": "a"}, "s1")


async def test_without_upstream_usage_the_input_is_counted(served_upstream: Served) -> None:
    body = {"model": UPSTREAM_MODEL, "input": ["hello world", "again"], "upstream_usage": None}
    status, raw = await post(served_upstream, body)
    assert status == 200, raw
    counted, source = count_input(UPSTREAM_MODEL, ["hello world", "again"])
    assert orjson.loads(raw)["usage"] == {"prompt_tokens": counted, "total_tokens": counted}
    [end] = _by_type(await served_upstream.records(), RecordType.REQUEST_END)
    assert (end["prompt_tokens"], end["prompt_tokens_source"]) == (counted, source)
    assert source == "estimate"  # no vocabulary is known for gpt-test


async def test_the_mock_refuses_more_vectors_than_a_reply_may_hold(served: Served) -> None:
    body = {"model": "mock", "input": ["a"] * 21, "dimensions": 65_536}
    status, raw = await post(served, body)
    assert _error(status, raw, 400)["code"] == "upstream_too_large"


async def test_an_unknown_model_is_404_and_nothing_is_journaled(served: Served) -> None:
    async with sdk(served) as client:
        with pytest.raises(openai.NotFoundError) as missing:
            await client.embeddings.create(model="nope", input="hi")
    assert missing.value.code == "model_not_found"
    await _assert_nothing_recorded(served)


BAD = {
    "no_model": ({"input": "hi"}, "model"),
    "no_input": ({"model": "mock"}, "input"),
    "empty_string": ({"model": "mock", "input": ""}, "input"),
    "empty_list": ({"model": "mock", "input": []}, "input"),
    "mixed_list": ({"model": "mock", "input": ["a", 1]}, "input"),
    "empty_tokens": ({"model": "mock", "input": [[]]}, "input"),
    "negative_token": ({"model": "mock", "input": [-1]}, "input"),
    "bool_token": ({"model": "mock", "input": [True]}, "input"),
    "object": ({"model": "mock", "input": {"a": 1}}, "input"),
    "zero_dimensions": ({"model": "mock", "input": "a", "dimensions": 0}, "dimensions"),
    "half_dimensions": ({"model": "mock", "input": "a", "dimensions": 2.5}, "dimensions"),
    "hex": ({"model": "mock", "input": "a", "encoding_format": "hex"}, "encoding_format"),
    "streamed": ({"model": "mock", "input": "a", "stream": True}, "stream"),
}


@pytest.mark.parametrize(("body", "param"), BAD.values(), ids=list(BAD))
async def test_bad_input_is_400_naming_the_field_and_nothing_is_journaled(
    served: Served, body: dict[str, Any], param: str
) -> None:
    status, raw = await post(served, body)
    assert _error(status, raw, 400)["param"] == param
    await _assert_nothing_recorded(served)


def test_more_inputs_than_openai_takes_are_refused() -> None:
    parse_embeddings(orjson.dumps({"model": "m", "input": [1] * MAX_INPUTS}))
    with pytest.raises(ClientError) as refused:
        parse_embeddings(orjson.dumps({"model": "m", "input": [1] * (MAX_INPUTS + 1)}))
    assert refused.value.param == "input"


async def test_anthropic_refuses_embeddings_before_calling_anything() -> None:
    config = ProviderConfig(
        name="claude", kind="anthropic", base_url="http://127.0.0.1:9", models=["c"]
    )
    provider = AnthropicProvider(config)
    try:
        with pytest.raises(ProviderError) as refused:
            await provider.open({"messages": []}, "c", False, Native("embeddings", {"input": "x"}))
    finally:
        await provider.close()
    assert (refused.value.status, refused.value.code, refused.value.retryable) == (
        400,
        "unsupported_api",
        False,
    )

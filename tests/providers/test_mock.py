"""The mock provider: deterministic tokens, their count, their pace, and how they end."""

from __future__ import annotations

import time
from typing import Any

import pytest

from llmsvc.config import ProviderConfig
from llmsvc.providers.mock import BATCH, DEFAULT_TOKENS, MockProvider, MockReply, token

MESSAGES = [
    {"role": "system", "content": "be brief"},
    {"role": "user", "content": "  say   hello world "},
    {"role": "user", "content": [{"type": "text", "text": "parts are not counted"}]},
    {"role": "assistant", "content": None},
]
PROMPT_TOKENS = 5  # words across the string contents above


def _provider(token_delay_ms: float = 0.0) -> MockProvider:
    return MockProvider(
        ProviderConfig(name="mock", kind="mock", models=["mock"], token_delay_ms=token_delay_ms)
    )


async def _drain(reply: MockReply) -> list[list[str]]:
    return [batch async for batch in reply.batches()]


async def _open(provider: MockProvider, **fields: Any) -> MockReply:
    return await provider.open({"model": "mock", "messages": MESSAGES, **fields}, "mock", True)


def test_tokens_cycle_through_the_words() -> None:
    assert [token(i) for i in range(3)] == ["The ", "quick ", "brown "]
    assert token(9) == token(0)
    assert token(10) == token(1)


async def test_max_tokens_is_how_many_tokens_and_ends_with_length() -> None:
    reply = await _open(_provider(), max_tokens=7)
    assert reply.completion_tokens is None  # known once the reply ended
    batches = await _drain(reply)
    assert [t for b in batches for t in b] == [token(i) for i in range(7)]
    assert reply.completion_tokens == 7
    assert reply.finish_reason == "length"
    assert reply.prompt_tokens == PROMPT_TOKENS
    assert reply.http_status == 200


async def test_max_completion_tokens_wins_over_max_tokens() -> None:
    reply = await _open(_provider(), max_tokens=7, max_completion_tokens=3)
    assert [t for b in await _drain(reply) for t in b] == [token(i) for i in range(3)]
    assert reply.finish_reason == "length"


async def test_without_a_limit_it_sends_the_default_and_ends_with_stop() -> None:
    reply = await _open(_provider())
    assert [t for b in await _drain(reply) for t in b] == [token(i) for i in range(DEFAULT_TOKENS)]
    assert reply.completion_tokens == DEFAULT_TOKENS
    assert reply.finish_reason == "stop"


async def test_instant_replies_come_in_batches() -> None:
    count = 2 * BATCH + 10
    batches = await _drain(await _open(_provider(), max_tokens=count))
    assert [len(b) for b in batches] == [BATCH, BATCH, 10]
    assert [t for b in batches for t in b] == [token(i) for i in range(count)]


async def test_request_delay_paces_each_token() -> None:
    reply = await _open(_provider(), max_tokens=5, mock_delay_ms=30)
    began = time.monotonic()
    batches = await _drain(reply)
    elapsed = time.monotonic() - began
    assert [len(b) for b in batches] == [1] * 5  # one token per pause
    assert 0.15 <= elapsed < 1.0


async def test_provider_delay_applies_when_the_request_sets_none() -> None:
    reply = await _open(_provider(token_delay_ms=30), max_tokens=4)
    began = time.monotonic()
    await _drain(reply)
    assert 0.12 <= time.monotonic() - began < 1.0


async def test_request_delay_overrides_the_provider_delay() -> None:
    reply = await _open(_provider(token_delay_ms=500), max_tokens=4, mock_delay_ms=0)
    began = time.monotonic()
    batches = await _drain(reply)
    assert time.monotonic() - began < 0.2
    assert [len(b) for b in batches] == [4]


@pytest.mark.parametrize("stream", [True, False])
async def test_stream_or_not_the_tokens_are_the_same(stream: bool) -> None:
    body = {"model": "mock", "messages": MESSAGES, "max_tokens": 4}
    reply = await _provider().open(body, "mock", stream)
    assert [t for b in await _drain(reply) for t in b] == [token(i) for i in range(4)]
    await reply.aclose()

"""The built-in mock provider: deterministic tokens, no network.

A request's `max_tokens` is how many tokens it streams (default 16). The
pause between tokens comes from the request's `mock_delay_ms` or the
provider's `token_delay_ms` setting, for demos, tests and benchmarks.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import Any

from llmsvc.config import ProviderConfig
from llmsvc.providers.base import Batch, Native

WORDS = ("The", "quick", "brown", "fox", "jumps", "over", "the", "lazy", "dog.")
DEFAULT_TOKENS = 16
BATCH = 256  # instant replies are handed over in batches of this many tokens


def token(i: int) -> str:
    """The i-th token (0-based) the mock sends."""
    return f"{WORDS[i % len(WORDS)]} "


class MockReply:
    def __init__(self, count: int, delay: float, prompt_tokens: int, limited: bool) -> None:
        self.http_status: int | None = 200
        self.count = count
        self.limited = limited
        self.delay = delay
        self.prompt_tokens: int | None = prompt_tokens
        self.completion_tokens: int | None = None
        self.finish_reason: str | None = None
        self.tool_calls: list[dict[str, Any]] = []
        self.refusal: str | None = None

    async def batches(self) -> AsyncIterator[Batch]:
        if self.delay:
            for i in range(self.count):
                await asyncio.sleep(self.delay)
                yield [token(i)]
        else:
            for start in range(0, self.count, BATCH):
                yield [token(i) for i in range(start, min(start + BATCH, self.count))]
        self.completion_tokens = self.count
        self.finish_reason = "length" if self.limited else "stop"

    async def aclose(self) -> None:
        return None


class MockProvider:
    def __init__(self, config: ProviderConfig) -> None:
        self.name = config.name
        self.delay_ms = config.token_delay_ms

    async def open(
        self, body: dict[str, Any], model: str, stream: bool, native: Native | None = None
    ) -> MockReply:
        limit = body.get("max_completion_tokens") or body.get("max_tokens")
        delay_ms = body.get("mock_delay_ms")
        if delay_ms is None:
            delay_ms = self.delay_ms
        prompt = sum(
            len(m["content"].split()) for m in body["messages"] if isinstance(m.get("content"), str)
        )
        return MockReply(limit or DEFAULT_TOKENS, delay_ms / 1000, prompt, limit is not None)

    async def close(self) -> None:
        return None

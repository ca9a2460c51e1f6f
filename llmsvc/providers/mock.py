"""The built-in mock provider: deterministic tokens, no network.

A request's `max_tokens` is how many tokens it streams (default 16). The
pause between tokens comes from the request's `mock_delay_ms` or the
provider's `token_delay_ms` setting, for demos, tests and benchmarks. An
embeddings request gets one vector per input, derived from a hash of the
input: unit length, `dimensions` long (default 16), float32 values.
"""

from __future__ import annotations

import asyncio
import hashlib
import math
from array import array
from collections.abc import AsyncIterator, Callable
from typing import Any

import orjson

from llmsvc.config import ProviderConfig
from llmsvc.errors import ProviderError
from llmsvc.providers.base import Batch, Native
from llmsvc.providers.embeddings import EMBEDDINGS, VALUE_CHARS, inputs, vectors_text
from llmsvc.providers.fields import UPSTREAM_MAX_BYTES

WORDS = ("The", "quick", "brown", "fox", "jumps", "over", "the", "lazy", "dog.")
DEFAULT_TOKENS = 16
DEFAULT_DIMENSIONS = 16  # of a mock embedding
BATCH = 256  # instant replies are handed over in batches of this many tokens


def token(i: int) -> str:
    """The i-th token (0-based) the mock sends."""
    return f"{WORDS[i % len(WORDS)]} "


class InProcess:
    """A reply made in this process: nothing to close, no connection callback to pump from."""

    def pump(self, take: Callable[[Batch], bool], stopped: Callable[[], None]) -> bool:
        return False

    def unpump(self) -> None:
        return None

    async def aclose(self) -> None:
        return None


class MockReply(InProcess):
    def __init__(self, count: int, delay: float, prompt_tokens: int, limited: bool) -> None:
        self.http_status: int | None = 200
        self.count = count
        self.limited = limited
        self.delay = delay
        self.prompt_tokens: int | None = prompt_tokens
        self.completion_tokens: int | None = None
        self.finish_reason: str | None = None
        self.stop_reason: str | None = None
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
        self.finish_reason = self.stop_reason = "length" if self.limited else "stop"


class MockVectors(InProcess):
    """An embeddings reply: its vectors as one text (providers/embeddings.py)."""

    def __init__(self, text: str, prompt_tokens: int) -> None:
        self.http_status: int | None = 200
        self.text = text
        self.prompt_tokens: int | None = prompt_tokens
        self.completion_tokens: int | None = 0
        self.finish_reason: str | None = None
        self.stop_reason: str | None = None
        self.tool_calls: list[dict[str, Any]] = []
        self.refusal: str | None = None

    async def batches(self) -> AsyncIterator[Batch]:
        yield [self.text]


def vector(value: str | list[int], dimensions: int) -> list[float]:
    """A unit vector of float32 values drawn from a hash of the input: the same input, the same
    vector, in any process (so base64 and float answers agree to the bit)."""
    seed = value.encode() if isinstance(value, str) else orjson.dumps(value)
    raw = hashlib.shake_256(seed).digest(2 * dimensions)
    values = [int.from_bytes(raw[i : i + 2], "little") / 32767.5 - 1 for i in range(0, len(raw), 2)]
    norm = math.sqrt(sum(v * v for v in values)) or 1.0
    return array("f", [v / norm for v in values]).tolist()


def embed(body: dict[str, Any]) -> MockVectors:
    """An embeddings body's mock reply; its usage is the inputs' words (or token ids). One
    larger than an upstream's reply may be is refused, as that would be, before it is made."""
    texts = inputs(body["input"])
    dimensions = body.get("dimensions") or DEFAULT_DIMENSIONS
    if len(texts) * dimensions * VALUE_CHARS > UPSTREAM_MAX_BYTES:
        raise ProviderError(
            f"mock: {len(texts)} vectors of {dimensions} dimensions are more than a reply may "
            f"hold ({UPSTREAM_MAX_BYTES} bytes); ask for fewer inputs or dimensions",
            status=400,
            code="upstream_too_large",
        )
    words = sum(len(t.split()) if isinstance(t, str) else len(t) for t in texts)
    return MockVectors(vectors_text([vector(t, dimensions) for t in texts]), words)


class MockProvider:
    def __init__(self, config: ProviderConfig) -> None:
        self.name = config.name
        self.delay_ms = config.token_delay_ms

    async def open(
        self, body: dict[str, Any], model: str, stream: bool, native: Native | None = None
    ) -> MockReply | MockVectors:
        if native is not None and native.api == EMBEDDINGS:
            return embed(native.body)
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

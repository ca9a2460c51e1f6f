"""What every provider adapter offers the gateway.

An adapter turns one upstream call into batches of token texts. It raises
`ProviderError` subclasses (with `retryable`) and makes no HTTP decisions of
its own: what the client is told is the gateway's business.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any, Protocol


class Reply(Protocol):
    """One provider call under way: token batches, then how it ended."""

    finish_reason: str | None
    prompt_tokens: int | None
    completion_tokens: int | None
    http_status: int | None

    def batches(self) -> AsyncIterator[list[str]]:
        """Token texts as they arrive, grouped by upstream read."""
        ...

    async def aclose(self) -> None: ...


class Provider(Protocol):
    name: str

    async def open(self, body: dict[str, Any], model: str, stream: bool) -> Reply:
        """Start the call; raise ProviderError if the upstream refuses before any token."""
        ...

    async def close(self) -> None: ...

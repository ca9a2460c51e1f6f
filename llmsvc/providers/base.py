"""What every provider adapter offers the gateway.

An adapter turns one upstream call into batches of token texts. It raises
`ProviderError` subclasses (with `retryable`) and makes no HTTP decisions of
its own: what the client is told is the gateway's business.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from typing import Any, Protocol


class ToolCallDeltas(list[dict[str, Any]]):
    """A batch of tool-call deltas, flat: `index`, and `id`, `name`, `arguments` as they come.

    Yielded by `Reply.batches` between token batches (a list of str); rare, so
    the gateway tells them apart with one type check per batch.
    """


class RefusalDeltas(list[str]):
    """A batch of an OpenAI upstream's `delta.refusal` texts: the model declining, in words
    that are not the reply's content. Rare, and told apart as tool calls are."""


Batch = list[str] | ToolCallDeltas | RefusalDeltas  # what Reply.batches yields


@dataclass(frozen=True, slots=True)
class Native:
    """A client's body in an API other than chat completions (`responses`, `messages`,
    `embeddings`): a provider that speaks that API is sent it as is, with its own model name;
    one that does not is sent the request's chat-completion form instead. `headers`: the
    client's headers of that API that such a provider is sent too (Anthropic's betas)."""

    api: str
    body: dict[str, Any]
    headers: tuple[tuple[str, str], ...] = ()


class Reply(Protocol):
    """One provider call under way: token batches, then how it ended."""

    finish_reason: str | None  # one of OpenAI's (fields.FINISH_REASONS), whatever the upstream
    stop_reason: str | None  # the upstream's own word for why it stopped, as it sent it
    prompt_tokens: int | None
    completion_tokens: int | None
    http_status: int | None
    tool_calls: list[dict[str, Any]]  # a whole (non-streaming) reply's calls, flat
    refusal: str | None  # a whole reply's `message.refusal`, as the upstream sent it

    def batches(self) -> AsyncIterator[Batch]:
        """Token texts as they arrive, grouped by upstream read (and ToolCallDeltas)."""
        ...

    def pump(self, take: Callable[[Batch], bool], stopped: Callable[[], None]) -> bool:
        """Between two batches of a stream: hand the next ones to `take` as they arrive,
        until it refuses one, the reply ends or fails (then `stopped` is called and `batches`
        goes on); False if this reply does not pump (it is then read by `batches` only)."""
        ...

    def unpump(self) -> None: ...

    async def aclose(self) -> None: ...


class Provider(Protocol):
    name: str

    async def open(
        self, body: dict[str, Any], model: str, stream: bool, native: Native | None = None
    ) -> Reply:
        """Start the call; raise ProviderError if the upstream refuses before any token.

        `body` is a chat-completion body; `native`, when given, the client's own body in
        another API, which the provider sends instead if it speaks that API."""
        ...

    async def close(self) -> None: ...

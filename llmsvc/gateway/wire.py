"""What one API's client sees of a reply: the `Wire` each endpoint renders replies with.

The exchange (chat.py) is the same for every API: it journals each batch a
provider yields and only then hands it to the request's wire, whose bytes go
to the socket. So whatever an API's client receives is built from journaled
pieces, and a new API is a new wire and a request translation, nothing more.
"""

from __future__ import annotations

from typing import Any, NamedTuple, Protocol


class Usage(NamedTuple):
    """The stored token counts (None where nobody knows) and how llmsvc got any it counted
    (field -> `tokenizer`, `estimate` or `deltas`), for a wire's usage object."""

    prompt_tokens: int | None
    completion_tokens: int | None
    counted: dict[str, str] | None


class Wire(Protocol):
    """One request's client-facing frames (streaming) or body (not): a wire may keep state,
    e.g. the text so far, which some APIs repeat in their closing events."""

    def opening(self, prompt_tokens: int | None) -> bytes:
        """The frames a stream begins with, sent with the first journaled piece."""
        ...

    def tokens(self, texts: list[str]) -> bytes: ...

    def tool_calls(self, deltas: list[dict[str, Any]]) -> bytes:
        """Flat tool-call deltas: `index`, and `id`, `name`, `arguments` as they came."""
        ...

    def refusal(self, texts: list[str]) -> bytes: ...

    def closing(self, finish_reason: str, usage: Usage) -> bytes:
        """The frames that end a stream that completed, its terminator included."""
        ...

    def failure(self, error: dict[str, Any]) -> bytes:
        """The frames that end a begun stream that failed; `error` is OpenAI's error object
        as gateway/errors.py describes the exception."""
        ...

    def whole(
        self,
        content: str,
        finish_reason: str,
        usage: Usage,
        tool_calls: list[dict[str, Any]],
        refusal: str | None,
    ) -> bytes:
        """A whole (non-streaming) reply's JSON body."""
        ...

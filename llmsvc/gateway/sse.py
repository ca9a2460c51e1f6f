"""Chat completions' wire: chunks as SSE frames, and the whole `chat.completion` body.

The parts of a chunk that never change within a response are rendered once;
per token only the JSON-escaped text is new, and a whole batch of tokens
becomes one bytes object (one socket write).
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, MutableMapping
from typing import Any

import orjson

from llmsvc.gateway.wire import Usage

ASGISend = Callable[[MutableMapping[str, Any]], Awaitable[None]]
ASGIReceive = Callable[[], Awaitable[MutableMapping[str, Any]]]

DONE = b"data: [DONE]\n\n"
OPEN_CHOICE = b'},"logprobs":null,"finish_reason":null}]}\n\n'  # a delta chunk's end
CONTENT = b'{"content":'


class ChatWire:
    """A chat completion's chunks; `include_usage`: the client's `stream_options` asked for a
    last chunk with the usage. One lives as long as its stream: slots, and only the
    prerendered head every token needs; the rarer chunks cut theirs from it."""

    __slots__ = ("_prefix", "completion_id", "created", "include_usage", "model")

    def __init__(self, completion_id: str, created: int, model: str, include_usage: bool) -> None:
        self.completion_id, self.created, self.model = completion_id, created, model
        self.include_usage = include_usage
        head = orjson.dumps(
            {
                "id": completion_id,
                "object": "chat.completion.chunk",
                "created": created,
                "model": model,
            }
        )[:-1]
        self._prefix = b"data: " + head + b',"choices":[{"index":0,"delta":' + CONTENT

    @property
    def _head(self) -> bytes:
        """A chunk's start up to its delta's value."""
        return self._prefix[: -len(CONTENT)]

    def tokens(self, texts: list[str]) -> bytes:
        dumps, prefix = orjson.dumps, self._prefix
        if len(texts) == 1:  # a paced stream's every batch
            return prefix + dumps(texts[0]) + OPEN_CHOICE
        return prefix + (OPEN_CHOICE + prefix).join([dumps(t) for t in texts]) + OPEN_CHOICE

    def tool_calls(self, deltas: list[dict[str, Any]]) -> bytes:
        """A chunk of tool-call deltas in OpenAI's shape (the rare path: built with orjson)."""
        calls = orjson.dumps([openai_tool_call(d) for d in deltas])
        return self._head + b'{"tool_calls":' + calls + OPEN_CHOICE

    def refusal(self, texts: list[str]) -> bytes:
        """A chunk per refusal text, `delta.refusal` as OpenAI streams it (the rare path)."""
        return b"".join(
            self._head + b'{"refusal":' + orjson.dumps(text) + OPEN_CHOICE for text in texts
        )

    def opening(self, prompt_tokens: int | None) -> bytes:
        return (
            self._head
            + b'{"role":"assistant","content":""},"logprobs":null,"finish_reason":null}]}\n\n'
        )

    def closing(self, finish_reason: str, usage: Usage) -> bytes:
        frame = (
            self._head
            + b'{},"logprobs":null,"finish_reason":'
            + orjson.dumps(finish_reason)
            + b"}]}\n\n"
        )
        if self.include_usage:
            head = self._head[: -len(b'{"index":0,"delta":')]
            frame += head + b'],"usage":' + orjson.dumps(_usage(*usage)) + b"}\n\n"
        return frame + DONE

    def failure(self, error: dict[str, Any]) -> bytes:
        return b"data: " + orjson.dumps({"error": error}) + b"\n\n" + DONE

    def whole(
        self,
        content: str,
        finish_reason: str,
        usage: Usage,
        tool_calls: list[dict[str, Any]],
        refusal: str | None,
    ) -> bytes:
        return completion_body(
            self.completion_id,
            self.created,
            self.model,
            content,
            finish_reason,
            *usage,
            tool_calls,
            refusal,
        )


def _usage(
    prompt_tokens: int | None, completion_tokens: int | None, counted: dict[str, str] | None
) -> dict[str, Any]:
    """OpenAI's usage object; a count nobody knows is null, never 0, and the counts llmsvc made
    itself are named in `llmsvc_counted` (field -> `tokenizer` or `deltas`)."""
    total = None
    if prompt_tokens is not None and completion_tokens is not None:
        total = prompt_tokens + completion_tokens
    usage: dict[str, Any] = {
        "prompt_tokens": prompt_tokens,
        "completion_tokens": completion_tokens,
        "total_tokens": total,
    }
    if counted:
        usage["llmsvc_counted"] = counted
    return usage


def completion_body(
    completion_id: str,
    created: int,
    model: str,
    content: str,
    finish_reason: str,
    prompt_tokens: int | None,
    completion_tokens: int | None,
    counted: dict[str, str] | None = None,
    tool_calls: list[dict[str, Any]] | None = None,
    refusal: str | None = None,
) -> bytes:
    """A whole (non-streaming) chat.completion object; its message always has `refusal`
    (OpenAI's schema requires it, null unless the model declined)."""
    message: dict[str, Any] = {"role": "assistant", "content": content, "refusal": refusal}
    if tool_calls or refusal:
        message["content"] = content or None
    if tool_calls:
        message["tool_calls"] = [openai_tool_call(call) for call in tool_calls]
    return orjson.dumps(
        {
            "id": completion_id,
            "object": "chat.completion",
            "created": created,
            "model": model,
            "choices": [
                {
                    "index": 0,
                    "message": message,
                    "logprobs": None,
                    "finish_reason": finish_reason,
                }
            ],
            "usage": _usage(prompt_tokens, completion_tokens, counted),
        }
    )


def openai_tool_call(delta: dict[str, Any]) -> dict[str, Any]:
    """A flat delta (`index`, `id`, `name`, `arguments`) as OpenAI writes a tool call."""
    call: dict[str, Any] = {"index": delta.get("index", 0)}
    function: dict[str, Any] = {"arguments": delta.get("arguments") or ""}
    if delta.get("id"):
        call["id"], call["type"] = delta["id"], "function"
    if delta.get("name"):
        function["name"] = delta["name"]
    call["function"] = function
    return call

"""Anthropic Messages' wire: a reply as Anthropic's SSE events, or as a whole `message`.

A stream is `message_start`, then content blocks (`content_block_start`, its
deltas, `content_block_stop`): a text block gets one `text_delta` per journaled
batch, a tool call a `tool_use` block whose `input_json_delta`s carry the
arguments as they came. `message_delta` (stop reason, usage) and `message_stop`
end it; a failure after it began is an `error` event. A refusal is sent as text.

Usage: Anthropic's schema has integers there, never null. The closing events and
a whole message tell the counts the store holds (the provider's, else llmsvc's
own, `Usage`). `message_start` is sent before a provider without usage in its
first event (OpenAI's) has told the prompt's size: it tells llmsvc's count of
the prompt instead (`llmsvc.tokens`), and `message_delta` repeats the stored
`input_tokens`, which the anthropic SDK takes over.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import orjson

from llmsvc.gateway.errors import anthropic_error
from llmsvc.gateway.wire import Usage

# The OpenAI finish reasons (what providers' replies say) in Anthropic's words.
STOP_REASONS = {
    "stop": "end_turn",
    "length": "max_tokens",
    "tool_calls": "tool_use",
    "function_call": "tool_use",
    "content_filter": "refusal",
}


def event(kind: str, data: dict[str, Any]) -> bytes:
    return b"event: " + kind.encode() + b"\ndata: " + orjson.dumps(data) + b"\n\n"


class MessagesWire:
    """One Messages reply's events; it keeps which content block is open.

    `count_prompt` is llmsvc's count of the prompt, asked only when a stream opens
    before the provider said it (see the module's docstring).
    """

    def __init__(self, message_id: str, model: str, count_prompt: Callable[[], int]) -> None:
        self.message_id, self.model, self.count_prompt = message_id, model, count_prompt
        self.blocks = 0  # content blocks started
        self.open: int | None = None  # the block open now, if any
        self.text_block: int | None = None  # the open block, if it is text
        self.tool_blocks: dict[int, int] = {}  # a tool call's index -> its block
        self.tool_ids: dict[int, str | None] = {}  # a tool call's index -> its id
        self.deltas = 0  # text and tool deltas sent: an output count if nothing better is known
        self.prompt_tokens: int | None = None  # the input_tokens message_start told

    def _start(self, block: dict[str, Any]) -> bytes:
        frame = self._stop()
        self.open = self.blocks
        self.blocks += 1
        start = {"type": "content_block_start", "index": self.open, "content_block": block}
        return frame + event("content_block_start", start)

    def _stop(self) -> bytes:
        if self.open is None:
            return b""
        frame = event("content_block_stop", {"type": "content_block_stop", "index": self.open})
        self.open = self.text_block = None
        return frame

    def opening(self, prompt_tokens: int | None) -> bytes:
        self.prompt_tokens = prompt_tokens if prompt_tokens is not None else self.count_prompt()
        message = self._message([], None, self.prompt_tokens, 0)  # no output yet
        return event("message_start", {"type": "message_start", "message": message})

    def tokens(self, texts: list[str]) -> bytes:
        frame = b""
        if self.text_block is None:
            frame = self._start({"type": "text", "text": ""})
            self.text_block = self.open
        self.deltas += len(texts)
        delta = {"type": "text_delta", "text": "".join(texts)}
        data = {"type": "content_block_delta", "index": self.text_block, "delta": delta}
        return frame + event("content_block_delta", data)

    def tool_calls(self, deltas: list[dict[str, Any]]) -> bytes:
        frame = b""
        for delta in deltas:
            call, call_id = delta.get("index", 0), delta.get("id")
            block = self.tool_blocks.get(call)
            # A new call gets a block of its own; an upstream may repeat a call's id.
            if block is None or (call_id and call_id != self.tool_ids.get(call)):
                self.tool_ids[call] = call_id
                start: dict[str, Any] = {
                    "type": "tool_use",
                    "id": call_id or "",
                    "name": delta.get("name") or "",
                    "input": {},
                }
                frame += self._start(start)
                block = self.tool_blocks[call] = self.blocks - 1
            self.deltas += 1
            if delta.get("arguments"):
                json_delta = {"type": "input_json_delta", "partial_json": delta["arguments"]}
                data = {"type": "content_block_delta", "index": block, "delta": json_delta}
                frame += event("content_block_delta", data)
        return frame

    def refusal(self, texts: list[str]) -> bytes:
        """A refusal is text to an Anthropic client: its API has no other place for one."""
        return self.tokens(texts)

    def closing(self, finish_reason: str, usage: Usage) -> bytes:
        prompt, completion = self._counts(usage)
        delta = {"stop_reason": stop_reason(finish_reason), "stop_sequence": None}
        counts = {"input_tokens": prompt, "output_tokens": completion}
        data = {"type": "message_delta", "delta": delta, "usage": counts}
        return (
            self._stop()
            + event("message_delta", data)
            + event("message_stop", {"type": "message_stop"})
        )

    def failure(self, error: dict[str, Any]) -> bytes:
        return event("error", anthropic_error(error))

    def whole(
        self,
        content: str,
        finish_reason: str,
        usage: Usage,
        tool_calls: list[dict[str, Any]],
        refusal: str | None,
    ) -> bytes:
        blocks: list[dict[str, Any]] = []
        text = content + (refusal or "")  # stored so too: the content, then the refusal
        if text:
            blocks.append({"type": "text", "text": text})
        for call in tool_calls:
            blocks.append(
                {
                    "type": "tool_use",
                    "id": call.get("id") or "",
                    "name": call.get("name") or "",
                    "input": tool_input(call.get("arguments")),
                }
            )
        self.deltas = len(blocks)
        prompt, completion = self._counts(usage)
        return orjson.dumps(self._message(blocks, stop_reason(finish_reason), prompt, completion))

    def _counts(self, usage: Usage) -> tuple[int, int]:
        """The stored counts; where the store holds none (nothing is known), the ones this
        wire told or counted: never a zero standing for "unknown"."""
        prompt = usage.prompt_tokens
        if prompt is None:
            prompt = self.prompt_tokens if self.prompt_tokens is not None else self.count_prompt()
        completion = usage.completion_tokens
        return prompt, completion if completion is not None else self.deltas

    def _message(
        self, content: list[dict[str, Any]], stop: str | None, prompt: int, completion: int
    ) -> dict[str, Any]:
        return {
            "id": self.message_id,
            "type": "message",
            "role": "assistant",
            "model": self.model,
            "content": content,
            "stop_reason": stop,
            "stop_sequence": None,
            "usage": {"input_tokens": prompt, "output_tokens": completion},
        }


def stop_reason(finish_reason: str) -> str:
    """An OpenAI finish reason in Anthropic's words (one it does not know ended the turn)."""
    return STOP_REASONS.get(finish_reason, "end_turn")


def tool_input(arguments: str | None) -> Any:
    """A tool call's arguments as the object Anthropic's `input` is; text that is not a JSON
    object (a model's malformed arguments) is kept under `arguments`, as to_anthropic does."""
    if not arguments:
        return {}
    try:
        value = orjson.loads(arguments)
    except orjson.JSONDecodeError:
        return {"arguments": arguments}
    return value if isinstance(value, dict) else {"arguments": arguments}

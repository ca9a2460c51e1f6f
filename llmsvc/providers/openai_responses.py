"""An OpenAI upstream's Responses API (`POST /responses`), for providers configured with
`responses = true`: a Responses request is forwarded as the client sent it, and the reply
read into the same batches, tool-call deltas and refusals as a chat completion's.

The upstream is told `store: false`: llmsvc keeps the conversation itself, and a
forwardable body carries its history in `input`. Events are parsed with orjson, no SDK
objects: this is the hot path.
"""

from __future__ import annotations

from typing import Any, TypeGuard

import orjson

from llmsvc.errors import ProviderError
from llmsvc.providers.base import Batch, RefusalDeltas, ToolCallDeltas
from llmsvc.providers.fields import count, items, obj, short_text, tool_delta
from llmsvc.providers.http import ErrorOf, HttpReply, nonempty
from llmsvc.providers.upstream_http import Response


def responses_payload(body: dict[str, Any], model: str, stream: bool) -> dict[str, Any]:
    """The body sent upstream: the client's, with the provider's model name and `store: false`."""
    return {**body, "model": model, "stream": stream, "store": False}


class ResponsesReply(HttpReply):
    """A Responses call under way; function calls are numbered 0, 1, ... in the order the
    upstream adds them, as a chat completion's `tool_calls` are."""

    END_EVENT = "response.completed"

    def __init__(
        self,
        name: str,
        response: Response,
        stream: bool,
        error_of: ErrorOf,
    ) -> None:
        super().__init__(name, response, stream)
        self.error_of = error_of
        # A call's ordinal by its item's `id` and by its `output_index`: argument deltas
        # name both, and an upstream may fill in only one.
        self._calls: dict[str | int, int] = {}
        self._ordinals = 0

    def _parse(self, events: list[bytes]) -> tuple[list[Batch], dict[str, Any] | None, bool]:
        """Texts, then tool-call deltas and refusals (those two made only when present, as
        they rarely are)."""
        texts: list[str] = []
        tools: ToolCallDeltas | None = None
        refusals: RefusalDeltas | None = None
        failure: dict[str, Any] | None = None
        done = False
        for data in events:
            event = orjson.loads(data)
            if not isinstance(event, dict):
                continue
            kind = event.get("type")
            if kind == "response.output_text.delta":
                if delta := event.get("delta"):
                    texts.append(self._text(delta))
            elif kind == "response.function_call_arguments.delta":
                tools = tools if tools is not None else ToolCallDeltas()
                tools.append(self._arguments(event))
            elif kind == "response.output_item.added":
                if (call := self._call_added(event)) is not None:
                    tools = tools if tools is not None else ToolCallDeltas()
                    tools.append(call)
            elif kind == "response.refusal.delta":
                if delta := event.get("delta"):
                    refusals = refusals if refusals is not None else RefusalDeltas()
                    refusals.append(self._text(delta))
            elif kind in ("response.completed", "response.incomplete"):
                self._ended(obj(event.get("response")), self._ordinals > 0)
                done = True
            elif kind in ("response.failed", "error"):
                failure = event
                break
        return nonempty(texts, tools, refusals), failure, done

    def _call_added(self, event: dict[str, Any]) -> dict[str, Any] | None:
        """A function call's first delta (its id and name), numbered; None for other items."""
        item = obj(event.get("item"))
        if item.get("type") != "function_call":
            return None
        ordinal, self._ordinals = self._ordinals, self._ordinals + 1
        for key in (item.get("id"), event.get("output_index")):
            if _is_key(key):
                self._calls[key] = ordinal
        return tool_delta(self.name, ordinal, ordinal, item.get("call_id"), item.get("name"), "")

    def _arguments(self, event: dict[str, Any]) -> dict[str, Any]:
        """An arguments fragment, as a delta of the call it continues."""
        item_id, output_index = event.get("item_id"), event.get("output_index")
        ordinal = self._calls.get(item_id) if _is_key(item_id) else None
        if ordinal is None and _is_key(output_index):
            ordinal = self._calls.get(output_index)
        if ordinal is None:
            raise ProviderError(
                f"{self.name}: the upstream sent arguments for a function call it never added",
                code="upstream_malformed",
            )
        return tool_delta(self.name, ordinal, ordinal, None, None, self._text(event.get("delta")))

    def _whole(self, body: dict[str, Any]) -> str:
        if body.get("status") == "failed":
            raise self._failure({"type": "response.failed", "response": body})
        texts: list[str] = []
        refusals: list[str] = []
        for item in items(body.get("output")):
            item = obj(item)
            if item.get("type") == "function_call":
                n, args = len(self.tool_calls), item.get("arguments")
                call = tool_delta(self.name, n, n, item.get("call_id"), item.get("name"), args)
                self.tool_calls.append(call)
            elif item.get("type") == "message":
                for part in items(item.get("content")):
                    part = obj(part)
                    if part.get("type") == "output_text":
                        texts.append(self._text(part.get("text")))
                    elif part.get("type") == "refusal":
                        refusals.append(self._text(part.get("refusal")))
        self.refusal = "".join(refusals) if refusals else None
        self._ended(body, bool(self.tool_calls))
        return "".join(texts)

    def _ended(self, response: dict[str, Any], called: bool) -> None:
        """Usage and a chat-completion finish reason from the final `response` object; its
        own stop reason is its status, or why it is incomplete."""
        usage = obj(response.get("usage"))
        self.prompt_tokens = count(self.name, "input_tokens", usage.get("input_tokens"))
        self.completion_tokens = count(self.name, "output_tokens", usage.get("output_tokens"))
        self.stop_reason = short_text(self.name, "status", response.get("status"))
        if response.get("status") == "incomplete":
            reason = obj(response.get("incomplete_details")).get("reason")
            self.stop_reason = short_text(self.name, "incomplete_details.reason", reason)
            self.finish_reason = "content_filter" if reason == "content_filter" else "length"
        else:
            self.finish_reason = "tool_calls" if called else "stop"

    def _failure(self, event: dict[str, Any]) -> ProviderError:
        """A `response.failed` or `error` event as the upstream's error, retryable as a chat
        stream's error event is (no HTTP status: the reply had begun)."""
        if event.get("type") == "error":
            error = {"message": event.get("message"), "code": event.get("code")}
        else:
            error = obj(obj(event.get("response")).get("error"))
        return self.error_of(self.name, None, {"error": error}, None)

    def _text(self, value: Any) -> str:
        """A text or refusal delta; anything but a string is not a reply a client can get."""
        if isinstance(value, str):
            return value
        raise ProviderError(
            f"{self.name}: the upstream sent text that is not a string", code="upstream_malformed"
        )


def _is_key(value: Any) -> TypeGuard[str | int]:
    """An item id or output index a call can be found by (a bool is not an index)."""
    return isinstance(value, str | int) and not isinstance(value, bool)

"""Anthropic's Messages API (`POST /v1/messages`), spoken to OpenAI chat-completion clients.

Requests are translated from OpenAI's shape (system messages become the
top-level `system`, consecutive messages of one role are merged, `stop`
becomes `stop_sequences`, `max_tokens` is required there and defaults to
4096), replies back into token batches, usage and an OpenAI finish reason.
Streams are Anthropic's SSE events: `content_block_delta` text is a token,
`message_start`/`message_delta` carry usage and the stop reason, an `error`
event is a failure of the upstream mid-stream, `ping` is ignored.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import orjson

from llmsvc.config import ProviderConfig
from llmsvc.errors import ProviderError, ProviderUnavailable
from llmsvc.providers.base import Batch, Native, ToolCallDeltas
from llmsvc.providers.embeddings import EMBEDDINGS
from llmsvc.providers.fields import (
    UPSTREAM_MAX_BYTES,
    arguments,
    count,
    error_text,
    in_int4,
    items,
    obj,
    short_text,
    tool_delta,
)
from llmsvc.providers.http import HttpProvider, HttpReply, nonempty, reading, retry_after
from llmsvc.providers.upstream_http import Response

DEFAULT_MAX_TOKENS = 4096
# Every stop reason becomes one of OpenAI's finish reasons (a client's SDK may check the
# enum); one not named here, such as `pause_turn`, ended the reply without a fault: `stop`.
FINISH = {
    "end_turn": "stop",
    "stop_sequence": "stop",
    "max_tokens": "length",
    "model_context_window_exceeded": "length",
    "tool_use": "tool_calls",
    "refusal": "content_filter",
}
PASSED = ("temperature", "top_p", "top_k")
# Fields of a Messages body that count_tokens refuses: they shape a reply, not the prompt.
COUNT_DROPS = (
    "max_tokens",
    "stream",
    "stop_sequences",
    "temperature",
    "top_p",
    "top_k",
    "metadata",
    "mock_delay_ms",
)


def to_anthropic(body: dict[str, Any], model: str, stream: bool) -> dict[str, Any]:
    """An OpenAI chat-completion body as an Anthropic Messages body."""
    system: list[str] = []
    messages: list[dict[str, Any]] = []
    for message in body["messages"]:
        role, content = message["role"], message.get("content")
        if role in ("system", "developer"):
            system.append(_text(content))
            continue
        if role in ("tool", "function"):
            role = "user"
            parts: list[dict[str, Any]] = [
                {
                    "type": "tool_result",
                    "tool_use_id": str(message.get("tool_call_id") or ""),
                    "content": _text(content),
                }
            ]
        else:
            parts = _parts(content)
            for call in message.get("tool_calls") or ():
                function = call.get("function") or {}
                parts.append(
                    {
                        "type": "tool_use",
                        "id": call.get("id"),
                        "name": function.get("name"),
                        "input": _arguments(function.get("arguments")),
                    }
                )
        if messages and messages[-1]["role"] == role:
            messages[-1]["content"].extend(parts)
        else:
            messages.append({"role": role, "content": parts})
    out: dict[str, Any] = {
        "model": model,
        "messages": messages,
        "max_tokens": body.get("max_completion_tokens")
        or body.get("max_tokens")
        or DEFAULT_MAX_TOKENS,
        "stream": stream,
    }
    if system:
        out["system"] = "\n\n".join(system)
    stop = body.get("stop")
    if stop:
        out["stop_sequences"] = [stop] if isinstance(stop, str) else list(stop)
    out.update({k: body[k] for k in PASSED if body.get(k) is not None})
    if isinstance(body.get("user"), str):  # Anthropic's metadata holds only `user_id`
        out["metadata"] = {"user_id": body["user"]}
    if body.get("tools"):
        out["tools"] = [
            {
                "name": tool["function"]["name"],
                "description": tool["function"].get("description", ""),
                "input_schema": tool["function"].get("parameters") or {"type": "object"},
            }
            for tool in body["tools"]
            if tool.get("type") == "function"
        ]
        choice = body.get("tool_choice")
        if choice == "required":
            out["tool_choice"] = {"type": "any"}
        elif isinstance(choice, dict) and choice.get("function"):
            out["tool_choice"] = {"type": "tool", "name": choice["function"]["name"]}
        elif choice in ("auto", "none"):
            out["tool_choice"] = {"type": choice}
    return out


def finish_reason(stop_reason: Any) -> str | None:
    """Anthropic's stop reason in OpenAI's words, always one of OpenAI's finish reasons."""
    if not isinstance(stop_reason, str):
        return None
    return FINISH.get(stop_reason, "stop")


def _text(content: Any) -> str:
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        return "".join(p.get("text", "") for p in content if isinstance(p, dict))
    return ""


def _parts(content: Any) -> list[dict[str, Any]]:
    if content is None or content == "":
        return []
    if isinstance(content, str):
        return [{"type": "text", "text": content}]
    parts: list[dict[str, Any]] = []
    for part in content:
        if part.get("type") != "text":
            raise ProviderError(
                f"content parts of type {part.get('type')!r} are not supported for Anthropic",
                status=400,
                code="unsupported_content",
            )
        parts.append({"type": "text", "text": part.get("text", "")})
    return parts


def _arguments(arguments: Any) -> Any:
    if isinstance(arguments, str):
        try:
            return orjson.loads(arguments) if arguments else {}
        except orjson.JSONDecodeError:
            return {"arguments": arguments}
    return arguments or {}


class AnthropicReply(HttpReply):
    END_EVENT = "message_stop"

    def __init__(self, name: str, response: Response, stream: bool) -> None:
        super().__init__(name, response, stream)
        self._tool_index: dict[int, int] = {}  # content block index -> tool call ordinal

    def _parse(self, events: list[bytes]) -> tuple[list[Batch], dict[str, Any] | None, bool]:
        """Texts, then tool-call deltas (made only when present)."""
        texts: list[str] = []
        tools: ToolCallDeltas | None = None
        stopped = False
        for data in events:
            event = orjson.loads(data)
            if not isinstance(event, dict):
                continue
            kind = event.get("type")
            if kind == "content_block_delta":
                delta = obj(event.get("delta"))
                text = delta.get("text")
                if delta.get("type") == "text_delta" and text:
                    texts.append(text if type(text) is str else self._text(text))
                elif delta.get("type") == "input_json_delta":
                    ordinal = self._tool_index.get(_block(event), 0)
                    args = arguments(self.name, delta.get("partial_json"))
                    tools = tools if tools is not None else ToolCallDeltas()
                    tools.append({"index": ordinal, "arguments": args})
            elif kind == "content_block_start":
                block = obj(event.get("content_block"))
                if block.get("type") == "tool_use":
                    index = _block(event)
                    ordinal = self._tool_index.setdefault(index, len(self._tool_index))
                    call_id, name = block.get("id"), block.get("name")
                    tools = tools if tools is not None else ToolCallDeltas()
                    tools.append(tool_delta(self.name, ordinal, ordinal, call_id, name, ""))
            elif kind == "message_start":
                usage = obj(obj(event.get("message")).get("usage"))
                self.prompt_tokens = count(self.name, "input_tokens", usage.get("input_tokens"))
            elif kind == "message_delta":
                self._finish(obj(event.get("delta")).get("stop_reason"))
                usage = obj(event.get("usage"))
                self.completion_tokens = count(
                    self.name, "output_tokens", usage.get("output_tokens")
                )
            elif kind == "message_stop":
                stopped = True
            elif kind == "error":
                return nonempty(texts, tools), event, stopped
        return nonempty(texts, tools), None, stopped

    def _failure(self, event: dict[str, Any]) -> ProviderError:
        return upstream_error(self.name, None, event)

    def _whole(self, body: dict[str, Any]) -> str:
        self._finish(body.get("stop_reason"))
        usage = obj(body.get("usage"))
        self.prompt_tokens = count(self.name, "input_tokens", usage.get("input_tokens"))
        self.completion_tokens = count(self.name, "output_tokens", usage.get("output_tokens"))
        blocks = [block for block in items(body.get("content")) if isinstance(block, dict)]
        uses = [block for block in blocks if block.get("type") == "tool_use"]
        self.tool_calls = [
            tool_delta(self.name, n, n, use.get("id"), use.get("name"), use.get("input") or {})
            for n, use in enumerate(uses)
        ]
        return "".join(self._text(b.get("text", "")) for b in blocks if b.get("type") == "text")

    def _finish(self, stop_reason: Any) -> None:
        self.stop_reason = short_text(self.name, "stop_reason", stop_reason)
        self.finish_reason = finish_reason(self.stop_reason)

    def _text(self, text: Any) -> str:
        """A text block's text; a reply whose text is anything else is not one a client can get."""
        if isinstance(text, str):
            return text
        raise ProviderError(
            f"{self.name}: the upstream sent text that is not a string", code="upstream_malformed"
        )


def _block(event: dict[str, Any]) -> int:
    """The content block an event is about (0 if it does not say as an int)."""
    index = event.get("index")
    return index if in_int4(index) else 0


class AnthropicProvider(HttpProvider):
    def __init__(self, config: ProviderConfig) -> None:
        super().__init__(config, upstream_error)
        self.url = config.base_url.rstrip("/") + "/v1/messages"
        self.count_url = self.url + "/count_tokens"
        self.headers = {
            "content-type": "application/json",
            "anthropic-version": config.anthropic_version,
        }
        if config.api_key is not None:
            self.headers["x-api-key"] = config.api_key.get_secret_value()

    async def open(
        self, body: dict[str, Any], model: str, stream: bool, native: Native | None = None
    ) -> AnthropicReply:
        """A Messages client's own body is forwarded as sent (this provider's model name and
        `stream` set, llmsvc's `mock_delay_ms` left out); a chat body is translated
        (`to_anthropic`). The reply reads the same."""
        if native is not None and native.api == "messages":
            payload = {k: v for k, v in native.body.items() if k != "mock_delay_ms"}
            payload["model"], payload["stream"] = model, stream
            response = await self.post(self.url, payload, {**self.headers, **dict(native.headers)})
            return AnthropicReply(self.name, response, stream)
        if native is not None and native.api == EMBEDDINGS:
            raise ProviderError(
                f"{self.name}: Anthropic has no embeddings API; route the model to an "
                "OpenAI-compatible provider",
                status=400,
                code="unsupported_api",
            )
        try:
            payload = to_anthropic(body, model, stream)
        except (AttributeError, KeyError, TypeError) as exc:  # a field of the wrong shape
            raise ProviderError(
                f"{self.name}: the request does not translate to Anthropic's Messages API: "
                f"{type(exc).__name__}: {exc}",
                status=400,
                code="invalid_request",
            ) from exc
        response = await self.post(self.url, payload, self.headers)
        return AnthropicReply(self.name, response, stream)

    async def count_tokens(self, native: Native, model: str) -> Any:
        """The upstream's `/v1/messages/count_tokens` answer for a Messages body (as sent, with
        this provider's model name): the JSON it sent, or its error as a ProviderError."""
        payload = {k: v for k, v in native.body.items() if k not in COUNT_DROPS}
        payload["model"] = model
        headers = {**self.headers, **dict(native.headers)}
        response = await self.post(self.count_url, payload, headers)
        try:
            with reading(self.name):
                return orjson.loads(await response.body(UPSTREAM_MAX_BYTES))
        finally:
            response.release()


def upstream_error(
    name: str, status: int | None, detail: Any, headers: Mapping[str, str] | None = None
) -> ProviderError:
    """Anthropic's `{"type": "error", "error": {"type", "message"}}` as a ProviderError.

    Retryable: no status (mid-stream), 429, 5xx and 529 (overloaded).
    """
    error = detail.get("error") if isinstance(detail, dict) else None
    error = error if isinstance(error, dict) else {}
    message = error_text(error.get("message"), 500) or f"HTTP {status}"
    code = error_text(error.get("type"), 100) or "upstream_error"
    if status is not None and status != 429 and status < 500:
        return ProviderError(f"{name}: upstream said: {message}", status=status, code=code)
    return ProviderUnavailable(
        f"{name}: upstream said: {message}",
        status=status,
        code=code,
        retry_after=retry_after(headers.get("retry-after") if headers else None),
    )

"""Any OpenAI-compatible upstream: OpenAI, vLLM, Ollama's /v1, llama.cpp's server.

The client's body is forwarded as it came, with the upstream's model name and,
when streaming, `stream_options.include_usage` so usage is always recorded.
Upstream events are parsed with orjson, no SDK objects: this is the hot path.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Mapping
from typing import Any

import orjson

from llmsvc.config import ProviderConfig
from llmsvc.errors import ProviderError, ProviderUnavailable
from llmsvc.providers.base import Batch, ToolCallDeltas
from llmsvc.providers.http import HttpProvider, HttpReply, retry_after
from llmsvc.providers.sse import SseSplitter


class OpenAIReply(HttpReply):
    async def _events(self) -> AsyncIterator[Batch]:
        splitter, done = SseSplitter(), False
        while chunk := await self._read():
            texts: list[str] = []
            tools = ToolCallDeltas()
            for data in splitter.feed(chunk):
                if data == b"[DONE]":
                    done = True
                    continue
                event = orjson.loads(data)
                if "error" in event:
                    if texts:  # what came before the error still goes out (and is journaled)
                        yield texts
                    raise upstream_error(self.name, None, event)
                if event.get("usage"):
                    self._usage(event["usage"])
                for choice in event.get("choices") or ():
                    delta = choice.get("delta") or {}
                    content = delta.get("content")
                    if content:
                        texts.append(content)
                    if delta.get("tool_calls"):  # rare: parsed only when present
                        tools.extend(_flat(call) for call in delta["tool_calls"])
                    if choice.get("finish_reason"):
                        self.finish_reason = choice["finish_reason"]
            if texts:
                yield texts
            if tools:
                yield tools
        if not done:
            raise ProviderUnavailable(
                f"{self.name}: the upstream ended the stream without [DONE]",
                code="upstream_stream_broken",
            )

    def _whole(self, body: dict[str, Any]) -> str:
        choice = (body.get("choices") or [{}])[0]
        self.finish_reason = choice.get("finish_reason")
        self._usage(body.get("usage") or {})
        message = choice.get("message") or {}
        self.tool_calls = [
            _flat({**call, "index": n}) for n, call in enumerate(message.get("tool_calls") or ())
        ]
        content = message.get("content")
        return content if isinstance(content, str) else ""

    def _usage(self, usage: dict[str, Any]) -> None:
        self.prompt_tokens = usage.get("prompt_tokens")
        self.completion_tokens = usage.get("completion_tokens")


class OpenAIProvider(HttpProvider):
    def __init__(self, config: ProviderConfig) -> None:
        super().__init__(config, config.base_url.rstrip("/") + "/chat/completions", upstream_error)
        self.headers = {"Content-Type": "application/json"}
        if config.api_key is not None:
            self.headers["Authorization"] = f"Bearer {config.api_key.get_secret_value()}"

    async def open(self, body: dict[str, Any], model: str, stream: bool) -> OpenAIReply:
        payload = {k: v for k, v in body.items() if k != "mock_delay_ms"}
        payload["model"], payload["stream"] = model, stream
        if stream:
            options = body.get("stream_options") or {}
            payload["stream_options"] = {**options, "include_usage": True}
        response = await self.post(payload, self.headers)
        return OpenAIReply(self.name, response, stream, self.idle_timeout)


def _flat(call: dict[str, Any]) -> dict[str, Any]:
    """An OpenAI tool call (or its delta) flat: index, id, name, arguments."""
    function = call.get("function") or {}
    return {
        "index": call.get("index", 0),
        "id": call.get("id"),
        "name": function.get("name"),
        "arguments": function.get("arguments") or "",
    }


def upstream_error(
    name: str, status: int | None, detail: Any, headers: Mapping[str, str] | None = None
) -> ProviderError:
    """The upstream's own message and code, never its headers (they may echo our key).

    Connect errors, timeouts, 429 and 5xx are retryable; a 429's or 503's
    Retry-After is kept for the retry's backoff.
    """
    error = detail.get("error") if isinstance(detail, dict) else None
    error = error if isinstance(error, dict) else {}
    message = str(error.get("message") or f"HTTP {status}")[:500]
    code = str(error.get("code") or error.get("type") or "upstream_error")[:100]
    if status is not None and status != 429 and status < 500:
        return ProviderError(f"{name}: upstream said: {message}", status=status, code=code)
    return ProviderUnavailable(
        f"{name}: upstream said: {message}",
        status=status,
        code=code,
        retry_after=retry_after(headers.get("Retry-After") if headers else None),
    )

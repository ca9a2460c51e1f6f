"""Any OpenAI-compatible upstream: OpenAI, vLLM, Ollama's /v1, llama.cpp's server.

The client's body is forwarded as it came, with the upstream's model name and,
when streaming, `stream_options.include_usage` so usage is always recorded. A
provider with `responses = true` is sent Responses requests natively
(openai_responses.py); any other is sent their chat-completion form.
Upstream events are parsed with orjson, no SDK objects: this is the hot path.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import orjson

from llmsvc.config import ProviderConfig
from llmsvc.errors import ProviderError, ProviderUnavailable
from llmsvc.providers.base import Batch, Native, RefusalDeltas, ToolCallDeltas
from llmsvc.providers.embeddings import EMBEDDINGS, OpenAIEmbeddingsReply, inputs
from llmsvc.providers.fields import (
    FINISH_REASONS,
    count,
    error_text,
    items,
    obj,
    short_text,
    tool_delta,
)
from llmsvc.providers.http import HttpProvider, HttpReply, nonempty, retry_after
from llmsvc.providers.openai_responses import ResponsesReply, responses_payload


class OpenAIReply(HttpReply):
    END_EVENT = "[DONE]"

    def _parse(self, events: list[bytes]) -> tuple[list[Batch], dict[str, Any] | None, bool]:
        """Texts, then tool-call deltas and refusals (those two made only when present, as
        they rarely are)."""
        texts: list[str] = []
        tools: ToolCallDeltas | None = None
        refusals: RefusalDeltas | None = None
        done = False
        for data in events:
            if data == b"[DONE]":
                done = True
                continue
            event = orjson.loads(data)
            if not isinstance(event, dict):
                continue
            if "error" in event:
                return nonempty(texts, tools, refusals), event, done
            if event.get("usage"):
                self._usage(event["usage"])
            choices = event.get("choices")
            for choice in choices if isinstance(choices, list) else ():
                if not isinstance(choice, dict):
                    continue
                delta = choice.get("delta")
                if isinstance(delta, dict):
                    content = delta.get("content")
                    if content:
                        texts.append(content if type(content) is str else self._text(content))
                    if delta.get("tool_calls"):  # rare: parsed only when present
                        tools = tools if tools is not None else ToolCallDeltas()
                        tools.extend(self._calls(delta["tool_calls"], ordinal=False))
                    if delta.get("refusal"):  # rare, as tool calls
                        refusals = refusals if refusals is not None else RefusalDeltas()
                        refusals.append(self._text(delta["refusal"]))
                if choice.get("finish_reason"):
                    self._finish(choice["finish_reason"])
        return nonempty(texts, tools, refusals), None, done

    def _failure(self, event: dict[str, Any]) -> ProviderError:
        return upstream_error(self.name, None, event)

    def _whole(self, body: dict[str, Any]) -> str:
        choice = obj((items(body.get("choices")) or [{}])[0])
        self._finish(choice.get("finish_reason"))
        self._usage(body.get("usage"))
        message = obj(choice.get("message"))
        self.tool_calls = self._calls(message.get("tool_calls"), ordinal=True)
        refusal = message.get("refusal")
        self.refusal = self._text(refusal) if refusal else None
        content = message.get("content")
        return self._text(content) if content else ""

    def _finish(self, reason: Any) -> None:
        """An OpenAI-compatible server's finish reason is passed on if it is OpenAI's (vLLM's
        `abort` is not, nor is any other server's own word): else `stop`, the plain end."""
        self.stop_reason = short_text(self.name, "finish_reason", reason)
        if self.stop_reason is not None:
            known = self.stop_reason in FINISH_REASONS
            self.finish_reason = self.stop_reason if known else "stop"

    def _usage(self, usage: Any) -> None:
        usage = obj(usage)
        self.prompt_tokens = count(self.name, "prompt_tokens", usage.get("prompt_tokens"))
        self.completion_tokens = count(
            self.name, "completion_tokens", usage.get("completion_tokens")
        )

    def _text(self, content: Any) -> str:
        """Content (or a refusal) as text; anything else is not a reply a client can get."""
        if isinstance(content, str):
            return content
        raise ProviderError(
            f"{self.name}: the upstream sent content that is not text", code="upstream_malformed"
        )

    def _calls(self, calls: Any, ordinal: bool) -> list[dict[str, Any]]:
        """OpenAI tool calls (or their deltas) flat: index, id, name, arguments. A whole
        reply's calls are numbered in order (`ordinal`); deltas keep their own `index`."""
        flat: list[dict[str, Any]] = []
        for call in items(calls):
            if not isinstance(call, dict):
                continue
            function = obj(call.get("function"))
            n = len(flat)
            index = n if ordinal else call.get("index")
            args = function.get("arguments")
            flat.append(tool_delta(self.name, n, index, call.get("id"), function.get("name"), args))
        return flat


class OpenAIProvider(HttpProvider):
    def __init__(self, config: ProviderConfig) -> None:
        super().__init__(config, upstream_error)
        base_url = config.base_url.rstrip("/")
        self.chat_url = base_url + "/chat/completions"
        self.embeddings_url = base_url + "/embeddings"
        # Set only when the upstream serves the Responses API: Responses requests go there.
        self.responses_url = base_url + "/responses" if config.responses else None
        self.headers = {"Content-Type": "application/json"}
        if config.api_key is not None:
            self.headers["Authorization"] = f"Bearer {config.api_key.get_secret_value()}"

    async def open(
        self, body: dict[str, Any], model: str, stream: bool, native: Native | None = None
    ) -> HttpReply:
        if native is not None and native.api == EMBEDDINGS:
            return await self._embed(native.body, model)
        if self.responses_url is not None and native is not None and native.api == "responses":
            payload = responses_payload(native.body, model, stream)
            response = await self.post(self.responses_url, payload, self.headers)
            return ResponsesReply(self.name, response, stream, upstream_error)
        payload = {k: v for k, v in body.items() if k != "mock_delay_ms"}
        payload["model"], payload["stream"] = model, stream
        if stream:
            options = body.get("stream_options") or {}
            payload["stream_options"] = {**options, "include_usage": True}
        response = await self.post(self.chat_url, payload, self.headers)
        return OpenAIReply(self.name, response, stream)

    async def _embed(self, body: dict[str, Any], model: str) -> OpenAIEmbeddingsReply:
        """The client's embeddings body, sent as is with the upstream's model name, asking
        for floats: the gateway encodes base64 itself, from the vectors it may store."""
        payload = {**body, "model": model, "encoding_format": "float"}
        response = await self.post(self.embeddings_url, payload, self.headers)
        expected = len(inputs(body["input"]))
        return OpenAIEmbeddingsReply(self.name, response, expected)


def upstream_error(
    name: str, status: int | None, detail: Any, headers: Mapping[str, str] | None = None
) -> ProviderError:
    """The upstream's own message and code, never its headers (they may echo our key).

    Connect errors, timeouts, 429 and 5xx are retryable; a 429's or 503's
    Retry-After is kept for the retry's backoff.
    """
    error = detail.get("error") if isinstance(detail, dict) else None
    error = error if isinstance(error, dict) else {}
    message = error_text(error.get("message"), 500) or f"HTTP {status}"
    code = error_text(error.get("code") or error.get("type"), 100) or "upstream_error"
    if status is not None and status != 429 and status < 500:
        return ProviderError(f"{name}: upstream said: {message}", status=status, code=code)
    return ProviderUnavailable(
        f"{name}: upstream said: {message}",
        status=status,
        code=code,
        retry_after=retry_after(headers.get("Retry-After") if headers else None),
    )

"""A fast, deterministic, OpenAI-compatible upstream for llmsvc's tests and benchmarks.

It stands in for a paid provider, so it speaks OpenAI's chat-completions wire format
byte for byte, while costing almost no CPU (with no pacing delay a whole stream is
prebuilt and sent in one write) so it does not distort benchmark numbers.

Reply content is deterministic: ``max_tokens`` (default 16) tokens, token ``i`` being
``f"t{i} "``. Request headers steer behaviour per request:

* ``X-Upstream-Token-Delay-Ms: <ms>`` -- pause before each streamed token.
* ``X-Upstream-Fail: status:<code>`` -- answer that HTTP status with an OpenAI error
  (a 429 with ``Retry-After: 1``).
* ``X-Upstream-Fail: after:<n>`` -- stream ``n`` tokens, then drop the connection.

With ``tools`` in the body and a last user message ``call:NAME``, the reply calls the
tool NAME with ``{"q": "x"}`` (streamed as OpenAI streams tool-call deltas). A body field
``upstream_usage`` (any JSON value) is sent as the reply's ``usage``, as an odd upstream might.
A last user message ``refuse:TEXT`` is declined: the reply is ``refusal`` TEXT, no content
(streamed as ``delta.refusal`` chunks, a word each).
* ``/with/<header>/<value>/v1/chat/completions`` -- as if the request carried that header.

``POST /v1/responses`` speaks OpenAI's Responses API (``event:``/``data:`` frames, streamed or
not) with the same content and triggers, the last user text of ``input`` standing for the last
user message: ``max_output_tokens`` tokens (16 when absent; given, the response is
``incomplete`` as chat's finish is ``length``), ``call:NAME`` with ``tools``, ``refuse:TEXT``,
``status:<code>`` and ``after:<n>``, and ``X-Upstream-Fail: failed:<n>``: ``n`` tokens, then a
``response.failed`` event (Responses only). The bodies it was sent are kept in
``Upstream.responses_received``; ``/with/<header>/<value>/v1/responses`` steers as above.

``POST /v1/embeddings`` answers as OpenAI does: one vector per input
(``expected_embedding``: ``dimensions`` long, default 8, values k/128 drawn from a hash of the
input), floats or base64 of little-endian float32 per ``encoding_format``, and usage counting
words (or token ids; ``upstream_usage`` replaces it, as for chat). ``X-Upstream-Fail:
status:<code>`` applies to it too.

Run ``python tests/upstreams/openai_upstream.py --port 0``; it prints ``LISTENING <port>`` once
ready and serves until SIGTERM/SIGINT. In-process: ``up = await serve(...)``.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import hashlib
import itertools
import os
import signal
import struct
import time
from collections.abc import Sequence
from typing import Any

import orjson
from aiohttp import web

try:
    import uvloop
except ImportError:  # pragma: no cover - uvloop is optional (e.g. on Windows)
    uvloop = None  # type: ignore[assignment]

DEFAULT_MODELS: tuple[str, ...] = ("gpt-test",)
DEFAULT_MAX_TOKENS = 16
DEFAULT_DIMENSIONS = 8  # of an embedding
# What OpenAI's embeddings take (it refuses any other field), and this fake's usage steering.
EMBEDDING_FIELDS = {"model", "input", "dimensions", "encoding_format", "user", "upstream_usage"}
DELAY_HEADER = "X-Upstream-Token-Delay-Ms"
FAIL_HEADER = "X-Upstream-Fail"

SERVER_ERROR = "The server had an error while processing your request. Sorry about that!"

_ID_PREFIX = os.urandom(6).hex()
_ID_COUNTER = itertools.count()
_DONE = b"data: [DONE]\n\n"
# Token numbers as bytes, precomputed: streams are assembled with one join (see below).
_NUMS: list[bytes] = [b"%d" % i for i in range(8192)]


def token(i: int) -> str:
    """Return the i-th (0-based) reply token, so tests can compute expected output.

    ``_StreamBuilder`` hard-codes this shape (``t<i><space>``) in its byte templates.
    """
    return f"t{i} "


def expected_content(n: int) -> str:
    """Return the full reply content for ``n`` tokens."""
    return "".join(token(i) for i in range(n))


def count_prompt_tokens(messages: Sequence[Any]) -> int:
    """Count whitespace-separated words in string message contents (a cheap tokenizer)."""
    return sum(
        len(m["content"].split())
        for m in messages
        if isinstance(m, dict) and isinstance(m.get("content"), str)
    )


def expected_embedding(value: str | list[int], dimensions: int = DEFAULT_DIMENSIONS) -> list[float]:
    """The vector the upstream answers for one input: values k/128, exact in float32."""
    seed = value.encode() if isinstance(value, str) else orjson.dumps(value)
    raw = hashlib.shake_256(b"upstream:" + seed).digest(dimensions)
    return [(b - 128) / 128 for b in raw]


class _BadRequest(Exception):
    """A request OpenAI would reject; carries the OpenAI error fields."""

    def __init__(
        self, message: str, param: str | None = None, code: str | None = None, status: int = 400
    ) -> None:
        super().__init__(message)
        self.message, self.param, self.code, self.status = message, param, code, status


def error_response(
    status: int, message: str, param: str | None = None, code: str | None = None
) -> web.Response:
    """Build an OpenAI-shaped error response, the shape the SDK maps to exceptions."""
    if status == 429:
        etype = "requests"
        code = code or "rate_limit_exceeded"
    elif status >= 500:
        etype = "server_error"
    else:
        etype = "invalid_request_error"
    body = {"error": {"message": message, "type": etype, "param": param, "code": code}}
    # As OpenAI does: a rate limit says when to come back.
    headers = {"Retry-After": "1"} if status == 429 else None
    return web.Response(
        status=status, body=orjson.dumps(body), content_type="application/json", headers=headers
    )


def _new_id() -> str:
    """Return a unique, cheap ``chatcmpl-`` id (random per process, then a counter)."""
    return f"chatcmpl-{_ID_PREFIX}{next(_ID_COUNTER):012d}"


def _canned_whole(
    body: dict[str, Any], message: dict[str, Any], finish: str, usage: dict[str, int]
) -> web.Response:
    """A whole chat completion of one choice, as OpenAI answers one."""
    choice = {"index": 0, "message": message, "logprobs": None, "finish_reason": finish}
    doc = {"id": _new_id(), "object": "chat.completion", "created": int(time.time()),
           "model": body["model"], "choices": [choice], "usage": usage}  # fmt: skip
    return web.json_response(doc, dumps=lambda v: orjson.dumps(v).decode())


class _CannedChunks:
    """The SSE chunks of one streamed completion, as OpenAI frames them."""

    def __init__(self, body: dict[str, Any]) -> None:
        self.head = {"id": _new_id(), "object": "chat.completion.chunk",
                     "created": int(time.time()), "model": body["model"]}  # fmt: skip

    def __call__(self, delta: dict[str, Any], finish: str | None = None) -> bytes:
        choice = {"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}
        return b"data: " + orjson.dumps({**self.head, "choices": [choice]}) + b"\n\n"

    def usage(self, usage: dict[str, int]) -> bytes:
        return b"data: " + orjson.dumps({**self.head, "choices": [], "usage": usage}) + b"\n\n"


def _parse_fail(value: str | None, failed: bool = False) -> tuple[int | None, int | None, bool]:
    """Parse ``X-Upstream-Fail`` into (status, after_n, then response.failed); ``failed:<n>``
    only where `failed` is allowed (the Responses API has that event, chat has not)."""
    if not value:
        return None, None, False
    kind, _, arg = value.strip().partition(":")
    try:
        n = int(arg)
    except ValueError:
        n = -1
    if kind == "status" and 400 <= n <= 599:
        return n, None, False
    if kind in ("after", "failed") and n >= 0 and (kind == "after" or failed):
        return None, n, kind == "failed"
    raise _BadRequest(f"Invalid {FAIL_HEADER} header: {value!r}.")


def _parse_delay(value: str | None, default: float) -> float:
    """Parse the per-request token delay header (milliseconds) into seconds."""
    if value is None:
        return default / 1000.0
    try:
        ms = float(value)
    except ValueError:
        ms = -1.0
    if not ms >= 0:  # also rejects NaN
        raise _BadRequest(f"Invalid {DELAY_HEADER} header: {value!r}.")
    return ms / 1000.0


def _last_message(body: dict[str, Any]) -> str | None:
    """A chat body's last message's text, where the triggers below are read."""
    last = body["messages"][-1] if body["messages"] else {}
    content = last.get("content") if isinstance(last, dict) else None
    return content if isinstance(content, str) else None


def _tool_call(body: dict[str, Any], last: str | None) -> str | None:
    """With `tools`, a last user text `call:NAME` asks for a call of NAME."""
    if body.get("tools") and last is not None and last.startswith("call:"):
        return last[5:].strip()
    return None


def _refusal(last: str | None) -> str | None:
    """A last user text `refuse:TEXT` asks to be declined with TEXT."""
    if last is not None and last.startswith("refuse:"):
        return last[7:].strip()
    return None


def _parse_body(raw: bytes) -> tuple[dict[str, Any], int, bool]:
    """Validate a chat-completions body; return (body, n_tokens, max_tokens_given)."""
    try:
        body = orjson.loads(raw)
    except orjson.JSONDecodeError:
        raise _BadRequest(
            "We could not parse the JSON body of your request. The OpenAI API expects a "
            "JSON payload, but what was sent was not valid JSON."
        ) from None
    if not isinstance(body, dict):
        raise _BadRequest("Invalid request body: expected a JSON object.")
    model = body.get("model")
    if model is None:
        raise _BadRequest("you must provide a model parameter")
    if not isinstance(model, str):
        raise _BadRequest(
            "Invalid type for 'model': expected a string.", param="model", code="invalid_type"
        )
    messages = body.get("messages")
    if messages is None:
        raise _BadRequest(
            "Missing required parameter: 'messages'.",
            param="messages",
            code="missing_required_parameter",
        )
    if not isinstance(messages, list):
        raise _BadRequest(
            "Invalid type for 'messages': expected an array.",
            param="messages",
            code="invalid_type",
        )
    if not messages:
        raise _BadRequest(
            "Invalid 'messages': empty array. Expected an array with minimum length 1, "
            "but got an empty array instead.",
            param="messages",
            code="empty_array",
        )
    for name in ("max_tokens", "max_completion_tokens"):
        limit = body.get(name)
        if limit is None:
            continue
        if not isinstance(limit, int) or isinstance(limit, bool) or limit < 0:
            raise _BadRequest(
                f"Invalid '{name}': expected a non-negative integer.",
                param=name,
                code="invalid_value",
            )
        return body, limit, True
    return body, DEFAULT_MAX_TOKENS, False


class _StreamBuilder:
    """Builds SSE events by byte concatenation, matching orjson/OpenAI compact layout.

    Every chunk shares the same prefix; only the choice differs, so templating avoids a
    JSON encode per token (the upstream must stay cheap under benchmark load).
    """

    def __init__(self, cid: str, created: int, model: str, include_usage: bool) -> None:
        self.head = (
            b'data: {"id":'
            + orjson.dumps(cid)
            + b',"object":"chat.completion.chunk","created":'
            + str(created).encode()
            + b',"model":'
            + orjson.dumps(model)
            + b',"system_fingerprint":null,"choices":['
        )
        self.tail = b"]" + (b',"usage":null' if include_usage else b"") + b"}\n\n"
        self.tok_pre = self.head + b'{"index":0,"delta":{"content":"t'
        self.tok_post = b' "},"logprobs":null,"finish_reason":null}' + self.tail

    def _choice(self, delta: bytes, finish: bytes = b"null") -> bytes:
        return (
            self.head
            + b'{"index":0,"delta":'
            + delta
            + b',"logprobs":null,"finish_reason":'
            + finish
            + b"}"
            + self.tail
        )

    def role(self) -> bytes:
        return self._choice(b'{"role":"assistant","content":""}')

    def content(self, i: int) -> bytes:
        return self.tok_pre + b"%d" % i + self.tok_post

    def contents(self, n: int) -> list[bytes]:
        """Parts whose concatenation is the events for tokens 0..n-1.

        Interleaving shared separators with cached numbers lets the caller do a single
        ``b"".join`` over the whole stream: ~10x cheaper than building each event.
        """
        if n <= 0:
            return []
        nums = _NUMS[:n] if n <= len(_NUMS) else [b"%d" % i for i in range(n)]
        parts = [self.tok_post + self.tok_pre] * (2 * n + 1)
        parts[1::2] = nums
        parts[0] = self.tok_pre
        parts[-1] = self.tok_post
        return parts

    def finish(self, reason: str) -> bytes:
        return self._choice(b"{}", orjson.dumps(reason))

    def usage(self, usage: Any) -> bytes:
        return self.head + b'],"usage":' + orjson.dumps(usage) + b"}\n\n"


def _parse_responses_body(raw: bytes) -> tuple[dict[str, Any], int, bool]:
    """Validate a Responses body; return (body, n_tokens, max_output_tokens_given)."""
    try:
        body = orjson.loads(raw)
    except orjson.JSONDecodeError:
        raise _BadRequest("We could not parse the JSON body of your request.") from None
    if not isinstance(body, dict):
        raise _BadRequest("Invalid request body: expected a JSON object.")
    if not isinstance(body.get("model"), str):
        raise _BadRequest(
            "Missing required parameter: 'model'.", param="model", code="missing_required_parameter"
        )
    if not isinstance(body.get("input"), str | list):
        raise _BadRequest(
            "Missing required parameter: 'input'.", param="input", code="missing_required_parameter"
        )
    limit = body.get("max_output_tokens")
    if limit is None:
        return body, DEFAULT_MAX_TOKENS, False
    if not isinstance(limit, int) or isinstance(limit, bool) or limit < 0:
        raise _BadRequest(
            "Invalid 'max_output_tokens': expected a non-negative integer.",
            param="max_output_tokens",
            code="invalid_value",
        )
    return body, limit, True


def _input_texts(body: dict[str, Any]) -> list[str]:
    """The texts of a Responses `input`: a string, or its messages' strings and input_text parts."""
    if isinstance(body["input"], str):
        return [body["input"]]
    texts = []
    for item in body["input"]:
        content = item.get("content") if isinstance(item, dict) else None
        if isinstance(content, str):
            texts.append(content)
        for part in content if isinstance(content, list) else ():
            if isinstance(part, dict) and isinstance(part.get("text"), str):
                texts.append(part["text"])
    return texts


def _last_user_input(body: dict[str, Any]) -> str | None:
    """The last user text of a Responses `input`, where the triggers are read."""
    if isinstance(body["input"], str):
        return body["input"]
    users = [
        item for item in body["input"] if isinstance(item, dict) and item.get("role") == "user"
    ]
    texts = _input_texts({"input": users[-1:]})
    return texts[-1] if texts else None


def _responses_usage(input_tokens: int, output_tokens: int) -> dict[str, Any]:
    return {"input_tokens": input_tokens, "input_tokens_details": {"cached_tokens": 0},
            "output_tokens": output_tokens, "output_tokens_details": {"reasoning_tokens": 0},
            "total_tokens": input_tokens + output_tokens}  # fmt: skip


def _response_doc(
    body: dict[str, Any], output: list[dict[str, Any]], usage: Any, limited: bool
) -> dict[str, Any]:
    """A finished Responses `response` object, as OpenAI answers one (and ends a stream with)."""
    return {
        "id": f"resp_{_new_id()[9:]}", "object": "response", "created_at": int(time.time()),
        "status": "incomplete" if limited else "completed", "background": False, "error": None,
        "incomplete_details": {"reason": "max_output_tokens"} if limited else None,
        "instructions": body.get("instructions"),
        "max_output_tokens": body.get("max_output_tokens"),
        "model": body["model"], "output": output, "parallel_tool_calls": True,
        "previous_response_id": None, "reasoning": {"effort": None, "summary": None},
        "store": body.get("store", True), "temperature": 1.0,
        "text": {"format": {"type": "text"}, "verbosity": "medium"},
        "tool_choice": body.get("tool_choice", "auto"), "tools": body.get("tools", []),
        "top_p": 1.0, "truncation": "disabled", "usage": usage, "user": None, "metadata": {},
    }  # fmt: skip


def _message_item(part: dict[str, Any], status: str) -> dict[str, Any]:
    return {"id": f"msg_{_new_id()[9:]}", "type": "message", "status": status,
            "content": [part], "role": "assistant"}  # fmt: skip


class _ResponseEvents:
    """The SSE frames of one streamed response, as OpenAI sends them: `event:` and `data:`,
    numbered by `sequence_number`, each flagged whether it is a delta (a token)."""

    def __init__(self) -> None:
        self.frames: list[tuple[bytes, bool]] = []
        self._seq = itertools.count()

    def frame(self, kind: str, **fields: Any) -> bytes:
        data = orjson.dumps({"type": kind, "sequence_number": next(self._seq), **fields})
        return b"event: " + kind.encode() + b"\ndata: " + data + b"\n\n"

    def add(self, kind: str, token: bool = False, **fields: Any) -> None:
        """Append an event; `token`: it carries one delta (pacing and failures count these)."""
        self.frames.append((self.frame(kind, **fields), token))

    def build(self, doc: dict[str, Any], pieces: list[list[str]]) -> list[tuple[bytes, bool]]:
        """The events of `doc` (finished), its items' deltas being `pieces` (one list an item)."""
        started = {
            **doc,
            "status": "in_progress",
            "incomplete_details": None,
            "output": [],
            "usage": None,
        }
        self.add("response.created", response=started)
        self.add("response.in_progress", response=started)
        for i, (item, parts) in enumerate(zip(doc["output"], pieces, strict=True)):
            ids = {"item_id": item["id"], "output_index": i}
            if item["type"] == "function_call":
                self.add(
                    "response.output_item.added",
                    output_index=i,
                    item={**item, "status": "in_progress", "arguments": ""},
                )
                for part in parts:
                    self.add("response.function_call_arguments.delta", True, **ids, delta=part)
                self.add(
                    "response.function_call_arguments.done", **ids, arguments=item["arguments"]
                )
            else:
                self.add(
                    "response.output_item.added",
                    output_index=i,
                    item={**item, "status": "in_progress", "content": []},
                )
                done = item["content"][0]
                text = done["type"] == "output_text"
                key, kind = ("text", "output_text") if text else ("refusal", "refusal")
                extra = {"logprobs": []} if text else {}
                self.add(
                    "response.content_part.added", **ids, content_index=0, part={**done, key: ""}
                )
                for part in parts:
                    self.add(
                        f"response.{kind}.delta", True, **ids, content_index=0, delta=part, **extra
                    )
                self.add(
                    f"response.{kind}.done", **ids, content_index=0, **{key: done[key]}, **extra
                )
                self.add("response.content_part.done", **ids, content_index=0, part=done)
            self.add("response.output_item.done", output_index=i, item=item)
        end = "response.incomplete" if doc["status"] == "incomplete" else "response.completed"
        self.add(end, response=doc)
        return self.frames

    def failed(self, doc: dict[str, Any]) -> bytes:
        """A `response.failed` event ending the stream, as when the model errs mid-reply."""
        error = {"code": "server_error", "message": SERVER_ERROR}
        failed = {**doc, "status": "failed", "error": error, "incomplete_details": None}
        return self.frame("response.failed", response={**failed, "usage": None})


class Upstream:
    """The fake provider: holds config and the aiohttp app; one instance per server."""

    def __init__(
        self,
        api_key: str | None = None,
        token_delay_ms: float = 0.0,
        models: Sequence[str] = DEFAULT_MODELS,
    ) -> None:
        self.api_key = api_key
        self.token_delay_ms = token_delay_ms
        self.models = tuple(models)
        self._auth = f"Bearer {api_key}" if api_key else None
        self._models_body = orjson.dumps(
            {
                "object": "list",
                "data": [
                    {"id": m, "object": "model", "created": 0, "owned_by": "upstream"}
                    for m in self.models
                ],
            }
        )
        self.app = web.Application(client_max_size=64 * 1024 * 1024)
        self.app.router.add_get("/v1/models", self.handle_models)
        self.app.router.add_post("/v1/chat/completions", self.handle_chat)
        self.app.router.add_post("/with/{header}/{value}/v1/chat/completions", self.handle_steered)
        self.app.router.add_post("/v1/responses", self.handle_responses)
        self.app.router.add_post("/with/{header}/{value}/v1/responses", self.handle_steered)
        self.responses_received: list[dict[str, Any]] = []  # the bodies /v1/responses was sent
        self.chat_headers: list[dict[str, str]] = []  # the headers of each chat request
        self.app.router.add_post("/v1/embeddings", self.handle_embeddings)
        self._runner: web.AppRunner | None = None
        self.host = ""
        self.port = 0

    @property
    def base_url(self) -> str:
        """The OpenAI SDK ``base_url`` for this server."""
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"http://{host}:{self.port}/v1"

    async def start(self, host: str = "127.0.0.1", port: int = 0) -> Upstream:
        """Bind and start serving; ``port=0`` picks a free port (see ``self.port``)."""
        # access_log=None: logging every request would cost more CPU than serving it.
        runner = web.AppRunner(self.app, access_log=None, shutdown_timeout=0.25)
        await runner.setup()
        site = web.TCPSite(runner, host, port, backlog=2048)
        await site.start()
        self._runner = runner
        self.host = host
        self.port = int(runner.addresses[0][1])
        return self

    async def close(self) -> None:
        """Stop serving; in-flight streams get a short grace period, then are cut."""
        if self._runner is not None:
            runner, self._runner = self._runner, None
            await runner.cleanup()

    async def __aenter__(self) -> Upstream:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    def _check_auth(self, request: web.Request) -> web.Response | None:
        if self._auth is None or request.headers.get("Authorization") == self._auth:
            return None
        return error_response(
            401,
            "Incorrect API key provided. You can find your API key at "
            "https://platform.openai.com/account/api-keys.",
            code="invalid_api_key",
        )

    async def handle_models(self, request: web.Request) -> web.StreamResponse:
        """``GET /v1/models``: the configured model list."""
        if (denied := self._check_auth(request)) is not None:
            return denied
        return web.Response(body=self._models_body, content_type="application/json")

    async def handle_steered(self, request: web.Request) -> web.StreamResponse:
        """`/with/<header>/<value>/v1/...` acts as if the request carried that header.

        A gateway forwards bodies, not its clients' headers: this lets a test
        configure one provider per failure mode by base URL alone.
        """
        header, value = request.match_info["header"], request.match_info["value"]
        steered = request.clone(headers={**request.headers, header: value})
        if request.path.endswith("/responses"):
            return await self.handle_responses(steered)
        return await self.handle_chat(steered)

    async def _tool_reply(
        self, request: web.Request, body: dict[str, Any], name: str
    ) -> web.StreamResponse:
        """A reply that calls tool `name` with {"q": "x"}, as OpenAI streams one or not."""
        call = {"id": "call_test", "type": "function", "function": {"name": name}}
        usage = {"prompt_tokens": 1, "completion_tokens": 5, "total_tokens": 6}
        if not body.get("stream"):
            message = {
                "role": "assistant",
                "content": None,
                "tool_calls": [{**call, "function": {"name": name, "arguments": '{"q": "x"}'}}],
            }
            return _canned_whole(body, message, "tool_calls", usage)
        chunk = _CannedChunks(body)
        deltas = [
            chunk({"role": "assistant", "content": None}),
            chunk(
                {"tool_calls": [{"index": 0, **call, "function": {"name": name, "arguments": ""}}]}
            ),
            chunk({"tool_calls": [{"index": 0, "function": {"arguments": '{"q"'}}]}),
            chunk({"tool_calls": [{"index": 0, "function": {"arguments": ': "x"}'}}]}),
            chunk({}, "tool_calls"),
            chunk.usage(usage),
            _DONE,
        ]
        resp = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await resp.prepare(request)
        for part in deltas:
            await resp.write(part)
        await resp.write_eof()
        return resp

    async def _refusal_reply(
        self, request: web.Request, body: dict[str, Any], text: str
    ) -> web.StreamResponse:
        """A reply that declines with `text`, as OpenAI sends a refusal, streamed or not."""
        usage = {"prompt_tokens": 1, "completion_tokens": 2, "total_tokens": 3}
        if not body.get("stream"):
            message = {"role": "assistant", "content": None, "refusal": text}
            return _canned_whole(body, message, "stop", usage)
        chunk = _CannedChunks(body)
        words = [word + " " for word in text.split(" ")]
        words[-1] = words[-1][:-1]
        resp = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await resp.prepare(request)
        await resp.write(chunk({"role": "assistant", "content": None, "refusal": None}))
        for word in words:
            await resp.write(chunk({"refusal": word}))
        await resp.write(chunk({}, "stop"))
        await resp.write(chunk.usage(usage))
        await resp.write_eof(_DONE)
        return resp

    async def handle_responses(self, request: web.Request) -> web.StreamResponse:
        """``POST /v1/responses``: the same deterministic replies in the Responses API's
        shapes, a whole `response` object or its events."""
        if (denied := self._check_auth(request)) is not None:
            return denied
        try:
            fail_status, fail_after, failed = _parse_fail(request.headers.get(FAIL_HEADER), True)
            delay = _parse_delay(request.headers.get(DELAY_HEADER), self.token_delay_ms)
            body, n, limited = _parse_responses_body(await request.read())
        except _BadRequest as e:
            return error_response(e.status, e.message, e.param, e.code)
        self.responses_received.append(body)
        if fail_status is not None:
            return error_response(fail_status, SERVER_ERROR)
        last = _last_user_input(body)
        instructions = body.get("instructions")
        prompt = [*_input_texts(body), instructions if isinstance(instructions, str) else ""]
        prompt_tokens = sum(len(text.split()) for text in prompt)
        if (tool := _tool_call(body, last)) is not None:
            call = {
                "id": f"fc_{_new_id()[9:]}",
                "type": "function_call",
                "status": "completed",
                "arguments": '{"q": "x"}',
                "call_id": "call_test",
                "name": tool,
            }
            output, pieces, usage = [call], [['{"q"', ': "x"}']], _responses_usage(1, 5)
            limited = False
        elif (refusal := _refusal(last)) is not None:
            words = [word + " " for word in refusal.split(" ")]
            words[-1] = words[-1][:-1]
            output = [_message_item({"type": "refusal", "refusal": refusal}, "completed")]
            pieces, usage, limited = [words], _responses_usage(1, 2), False
        else:
            tokens = [token(i) for i in range(n)]
            text = {
                "type": "output_text",
                "annotations": [],
                "logprobs": [],
                "text": "".join(tokens),
            }
            output = [_message_item(text, "incomplete" if limited else "completed")]
            pieces, usage = [tokens], _responses_usage(prompt_tokens, n)
        doc = _response_doc(body, output, body.get("upstream_usage", usage), limited)
        if not body.get("stream"):
            if fail_after is not None:
                return await _drop(request, web.Response())
            return web.Response(body=orjson.dumps(doc), content_type="application/json")
        events = _ResponseEvents()
        frames = events.build(doc, pieces)
        resp = web.StreamResponse(headers={"Cache-Control": "no-cache"})
        resp.content_type = "text/event-stream"
        resp.charset = "utf-8"
        await resp.prepare(request)
        sent = 0
        try:
            for frame, token_frame in frames:
                if token_frame and sent == fail_after:
                    if not failed:
                        return await _drop(request, resp)
                    await resp.write_eof(events.failed(doc))
                    return resp
                if token_frame and delay > 0:
                    await asyncio.sleep(delay)
                sent += token_frame
                await resp.write(frame)
            await resp.write_eof()
        except ConnectionError:
            pass  # the client went away mid-stream
        return resp

    async def handle_embeddings(self, request: web.Request) -> web.StreamResponse:
        """``POST /v1/embeddings``: one deterministic vector per input, in OpenAI's wire format."""
        if (denied := self._check_auth(request)) is not None:
            return denied
        try:
            fail_status, _, _ = _parse_fail(request.headers.get(FAIL_HEADER))
            body, inputs = _embedding_inputs(await request.read())
        except _BadRequest as e:
            return error_response(e.status, e.message, e.param, e.code)
        if fail_status is not None:
            return error_response(fail_status, "The server had an error processing your request.")
        dimensions = body.get("dimensions", DEFAULT_DIMENSIONS)
        data = []
        for i, value in enumerate(inputs):
            vector: Any = expected_embedding(value, dimensions)
            if body.get("encoding_format") == "base64":
                vector = base64.b64encode(struct.pack(f"<{len(vector)}f", *vector)).decode()
            data.append({"object": "embedding", "index": i, "embedding": vector})
        tokens = sum(len(v.split()) if isinstance(v, str) else len(v) for v in inputs)
        usage = body.get("upstream_usage", {"prompt_tokens": tokens, "total_tokens": tokens})
        doc = {"object": "list", "data": data, "model": body["model"], "usage": usage}
        return web.Response(body=orjson.dumps(doc), content_type="application/json")

    async def handle_chat(self, request: web.Request) -> web.StreamResponse:
        """``POST /v1/chat/completions``: deterministic completion, streamed or not."""
        self.chat_headers.append(dict(request.headers))
        if (denied := self._check_auth(request)) is not None:
            return denied
        try:
            fail_status, fail_after, _ = _parse_fail(request.headers.get(FAIL_HEADER))
            delay = _parse_delay(request.headers.get(DELAY_HEADER), self.token_delay_ms)
            body, n, limited = _parse_body(await request.read())
        except _BadRequest as e:
            return error_response(e.status, e.message, e.param, e.code)
        if fail_status is not None:
            return error_response(fail_status, SERVER_ERROR)
        if (tool := _tool_call(body, _last_message(body))) is not None:
            return await self._tool_reply(request, body, tool)
        if (refusal := _refusal(_last_message(body))) is not None:
            return await self._refusal_reply(request, body, refusal)
        prompt_tokens = count_prompt_tokens(body["messages"])
        usage: Any = {
            "prompt_tokens": prompt_tokens,
            "completion_tokens": n,
            "total_tokens": prompt_tokens + n,
        }
        if "upstream_usage" in body:
            usage = body["upstream_usage"]
        finish = "length" if limited else "stop"
        cid, created, model = _new_id(), int(time.time()), body["model"]
        headers = {"x-request-id": f"req_{cid[9:]}"}

        if not body.get("stream"):
            if fail_after is not None:
                return await _drop(request, web.Response())
            payload = {
                "id": cid,
                "object": "chat.completion",
                "created": created,
                "model": model,
                "choices": [
                    {
                        "index": 0,
                        "message": {"role": "assistant", "content": expected_content(n)},
                        "logprobs": None,
                        "finish_reason": finish,
                    }
                ],
                "usage": usage,
                "system_fingerprint": None,
            }
            return web.Response(
                body=orjson.dumps(payload), content_type="application/json", headers=headers
            )

        opts = body.get("stream_options")
        include_usage = isinstance(opts, dict) and opts.get("include_usage") is True
        sb = _StreamBuilder(cid, created, model, include_usage)
        resp = web.StreamResponse(headers={**headers, "Cache-Control": "no-cache"})
        resp.content_type = "text/event-stream"
        resp.charset = "utf-8"
        await resp.prepare(request)  # headers are buffered and coalesced with the body
        n_sent = n if fail_after is None else min(n, fail_after)
        try:
            if delay <= 0:
                # Prebuild everything: one write, near-zero CPU per request.
                events = [sb.role(), *sb.contents(n_sent)]
                if fail_after is not None:
                    await resp.write(b"".join(events))
                    return await _drop(request, resp)
            else:
                await resp.write(sb.role())
                for i in range(n_sent):
                    await asyncio.sleep(delay)
                    await resp.write(sb.content(i))
                if fail_after is not None:
                    return await _drop(request, resp)
                events = []
            events.append(sb.finish(finish))
            if include_usage:
                events.append(sb.usage(usage))
            events.append(_DONE)
            await resp.write_eof(b"".join(events))  # with headers if unsent: one write
        except ConnectionError:
            pass  # the client went away mid-stream (e.g. a cancelled request)
        return resp


def _embedding_inputs(raw: bytes) -> tuple[dict[str, Any], list[Any]]:
    """Validate an embeddings body as OpenAI does (the parts this fake needs); its inputs."""
    try:
        body = orjson.loads(raw)
    except orjson.JSONDecodeError:
        raise _BadRequest("We could not parse the JSON body of your request.") from None
    if not isinstance(body, dict) or not isinstance(body.get("model"), str):
        raise _BadRequest("you must provide a model parameter", param="model")
    for name in body.keys() - EMBEDDING_FIELDS:
        raise _BadRequest(f"Unrecognized request argument supplied: {name}")
    value = body.get("input")
    if isinstance(value, str) or (
        isinstance(value, list) and value and all(isinstance(v, int) for v in value)
    ):
        value = [value]
    if not isinstance(value, list) or not value or not all(v for v in value):
        raise _BadRequest("'$.input' is invalid.", param="input", code="invalid_value")
    if body.get("encoding_format", "float") not in ("float", "base64"):
        raise _BadRequest(
            "Invalid value for 'encoding_format'.", param="encoding_format", code="invalid_value"
        )
    dimensions = body.get("dimensions", DEFAULT_DIMENSIONS)
    if type(dimensions) is not int or dimensions < 1:
        raise _BadRequest(
            "Invalid value for 'dimensions'.", param="dimensions", code="invalid_value"
        )
    return body, value


async def _drop(request: web.Request, resp: web.StreamResponse) -> web.StreamResponse:
    """Close the connection mid-response (no [DONE], no chunk terminator).

    ``close`` (not ``abort``) so bytes already written still reach the client; the
    body is left incomplete, which clients see as a broken stream. aiohttp's own
    write_eof then fails on the closed transport and is swallowed as a disconnect.
    """
    if request.transport is not None:
        request.transport.close()
    return resp


async def serve(
    host: str = "127.0.0.1",
    port: int = 0,
    api_key: str | None = None,
    token_delay_ms: float = 0.0,
    models: Sequence[str] = DEFAULT_MODELS,
) -> Upstream:
    """Start an upstream in the running loop; ``await up.close()`` (or ``async with``)."""
    return await Upstream(api_key, token_delay_ms, models).start(host, port)


async def _amain(args: argparse.Namespace) -> int:
    up = await serve(args.host, args.port, args.api_key, args.token_delay_ms, args.model)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    print(f"LISTENING {up.port}", flush=True)
    try:
        await stop.wait()
    finally:
        await up.close()
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """CLI entry point; uses uvloop when installed."""
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=0, help="0 picks a free port")
    p.add_argument("--api-key", default=None, help="require 'Authorization: Bearer KEY'")
    p.add_argument("--token-delay-ms", type=float, default=0.0, help="default token delay")
    p.add_argument("--model", action="append", default=None, help="model to list (repeatable)")
    args = p.parse_args(argv)
    args.model = tuple(args.model) if args.model else DEFAULT_MODELS
    if uvloop is not None:
        return uvloop.run(_amain(args))
    return asyncio.run(_amain(args))


if __name__ == "__main__":
    raise SystemExit(main())

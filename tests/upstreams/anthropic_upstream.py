#!/usr/bin/env python3
"""A local stand-in for Anthropic's Messages API, in its exact wire format, for tests.

`POST /v1/messages` checks what Anthropic checks (the `x-api-key` and
`anthropic-version` headers; `model`, `max_tokens` and `messages` present,
roles alternating and starting with `user`, `system` a top-level string, no
OpenAI-only fields) and answers a deterministic reply: token i is `w{i} `,
as many as `max_tokens`, cut at the first stop sequence it contains. With
`stream` it sends the event sequence Anthropic sends, byte for byte in form:
`message_start`, `content_block_start`, `ping`, `content_block_delta`s,
`content_block_stop`, `message_delta` (stop reason, output tokens),
`message_stop`. With `tools` and the last user text starting `call:NAME`, the
reply is one `tool_use` block calling NAME with `{"q": "x"}`, its input
streamed as `input_json_delta`s. A last user text starting `refuse` stops after two
tokens with stop reason `refusal`, as Claude's safety stop does.

Steering by path, as tests/daemon_process.py does for the OpenAI upstream:
`/with/fail/status:<code>/v1/messages` answers that status with an Anthropic
error body; `/with/fail/error-after:<n>/v1/messages` streams n tokens, then an
`error` event (overloaded_error), as Anthropic does mid-stream;
`/with/usage/<JSON>/v1/messages` sends that JSON value (URL-encoded in the path) as
every `usage` the reply carries, as an odd upstream might.

`POST /v1/messages/count_tokens` answers `{"input_tokens": N}` (a word a token, as
`input_tokens` is counted) and refuses the fields Anthropic's endpoint refuses. Every
body it accepted is kept, in order, in `requests` (messages) and `counted` (count_tokens),
and its `anthropic-beta` header in `betas`, so a test can check what llmsvc forwarded.

Usage:  python tests/upstreams/anthropic_upstream.py [--port 0] [--api-key KEY]
        (prints LISTENING <port>)
"""

from __future__ import annotations

import argparse
import asyncio
import itertools
import signal
from typing import Any

import orjson
from aiohttp import web

VERSION = "2023-06-01"
OPENAI_ONLY = ("n", "frequency_penalty", "presence_penalty", "logprobs", "response_format")


def sse(kind: str, data: dict[str, Any]) -> bytes:
    return b"event: " + kind.encode() + b"\ndata: " + orjson.dumps(data) + b"\n\n"


def last_text(body: dict[str, Any]) -> str:
    """The text of the last message, a string or its text blocks joined."""
    content = body["messages"][-1]["content"]
    if isinstance(content, str):
        return content
    return "".join(block.get("text", "") for block in content if block.get("type") == "text")


def error(status: int, kind: str, message: str) -> web.Response:
    body = {"type": "error", "error": {"type": kind, "message": message}}
    headers = {"retry-after": "1"} if status == 429 else None
    return web.json_response(
        body, status=status, headers=headers, dumps=lambda v: orjson.dumps(v).decode()
    )


ERROR_KINDS = {
    400: "invalid_request_error",
    401: "authentication_error",
    403: "permission_error",
    404: "not_found_error",
    429: "rate_limit_error",
    500: "api_error",
    529: "overloaded_error",
}


class Upstream:
    def __init__(self, api_key: str | None) -> None:
        self.api_key = api_key
        self.app = web.Application()
        self.app.router.add_post("/v1/messages", self.messages)
        self.app.router.add_post("/v1/messages/count_tokens", self.count_tokens)
        self.app.router.add_post("/with/fail/{how}/v1/messages", self.messages)
        self.app.router.add_post("/with/usage/{usage:[^/]+}/v1/messages", self.messages)
        self.requests: list[dict[str, Any]] = []
        self.counted: list[dict[str, Any]] = []
        self.betas: list[str | None] = []  # each accepted request's anthropic-beta header

    def check(self, request: web.Request, body: Any) -> web.Response | None:
        if self.api_key is not None and request.headers.get("x-api-key") != self.api_key:
            return error(401, "authentication_error", "invalid x-api-key")
        if request.headers.get("anthropic-version") != VERSION:
            return error(400, "invalid_request_error", "anthropic-version: header is required")
        if not isinstance(body, dict):
            return error(400, "invalid_request_error", "body: must be a JSON object")
        for field in ("model", "max_tokens", "messages"):
            if field not in body:
                return error(400, "invalid_request_error", f"{field}: Field required")
        for field in OPENAI_ONLY:
            if field in body:
                return error(
                    400, "invalid_request_error", f"{field}: Extra inputs are not permitted"
                )
        if "system" in body and not isinstance(body["system"], str | list):
            return error(400, "invalid_request_error", "system: must be a string")
        roles = [m.get("role") for m in body["messages"]]
        if not roles or roles[0] != "user" or any(a == b for a, b in itertools.pairwise(roles)):
            return error(400, "invalid_request_error", "messages: roles must alternate from user")
        if any(r not in ("user", "assistant") for r in roles):
            return error(400, "invalid_request_error", "messages: role must be user or assistant")
        return None

    async def count_tokens(self, request: web.Request) -> web.StreamResponse:
        body = orjson.loads(await request.read())
        refused = self.check(request, {"max_tokens": 1, **body})
        if refused is not None:
            return refused
        for field in ("max_tokens", "stream", "stop_sequences", "temperature", "metadata"):
            if field in body:
                return error(
                    400, "invalid_request_error", f"{field}: Extra inputs are not permitted"
                )
        self.counted.append(body)
        self.betas.append(request.headers.get("anthropic-beta"))
        return web.json_response({"input_tokens": sum(len(t.split()) for t in self.texts_of(body))})

    async def messages(self, request: web.Request) -> web.StreamResponse:
        try:
            body = orjson.loads(await request.read())
        except orjson.JSONDecodeError:
            return error(400, "invalid_request_error", "body: not valid JSON")
        refused = self.check(request, body)
        if refused is not None:
            return refused
        self.requests.append(body)
        self.betas.append(request.headers.get("anthropic-beta"))
        how = request.match_info.get("how", "")
        if how.startswith("status:"):
            status = int(how.split(":")[1])
            return error(status, ERROR_KINDS.get(status, "api_error"), f"steered {status}")
        fail_after = int(how.split(":")[1]) if how.startswith("error-after:") else None
        texts, stop_reason = self.reply(body)
        tool = self.tool_call(body)
        usage_in = sum(len(text.split()) for text in self.texts_of(body))
        odd = request.match_info.get("usage")
        usage: Any = {"input_tokens": usage_in, "output_tokens": len(texts)}
        start_usage: Any = {"input_tokens": usage_in, "output_tokens": 1}
        end_usage: Any = {"output_tokens": len(texts)}
        if odd is not None:
            usage = start_usage = end_usage = orjson.loads(odd)
        if not body.get("stream"):
            content: list[dict[str, Any]] = (
                [tool] if tool else [{"type": "text", "text": "".join(texts)}]
            )
            return web.json_response(
                {
                    "id": "msg_test",
                    "type": "message",
                    "role": "assistant",
                    "model": body["model"],
                    "content": content,
                    "stop_reason": "tool_use" if tool else stop_reason,
                    "stop_sequence": None,
                    "usage": usage,
                }
            )
        response = web.StreamResponse(headers={"content-type": "text/event-stream"})
        await response.prepare(request)
        start = {
            "id": "msg_test",
            "type": "message",
            "role": "assistant",
            "model": body["model"],
            "content": [],
            "stop_reason": None,
            "stop_sequence": None,
            "usage": start_usage,
        }
        await response.write(sse("message_start", {"type": "message_start", "message": start}))
        if tool:
            block = {"type": "tool_use", "id": tool["id"], "name": tool["name"], "input": {}}
            await response.write(
                sse(
                    "content_block_start",
                    {"type": "content_block_start", "index": 0, "content_block": block},
                )
            )
            for part in ('{"q"', ': "x"}'):
                delta = {"type": "input_json_delta", "partial_json": part}
                await response.write(
                    sse(
                        "content_block_delta",
                        {"type": "content_block_delta", "index": 0, "delta": delta},
                    )
                )
            stop_reason = "tool_use"
        else:
            block = {"type": "text", "text": ""}
            await response.write(
                sse(
                    "content_block_start",
                    {"type": "content_block_start", "index": 0, "content_block": block},
                )
            )
            await response.write(sse("ping", {"type": "ping"}))
            for i, text in enumerate(texts):
                if fail_after is not None and i == fail_after:
                    await response.write(
                        sse(
                            "error",
                            {
                                "type": "error",
                                "error": {"type": "overloaded_error", "message": "Overloaded"},
                            },
                        )
                    )
                    return response
                delta = {"type": "text_delta", "text": text}
                await response.write(
                    sse(
                        "content_block_delta",
                        {"type": "content_block_delta", "index": 0, "delta": delta},
                    )
                )
        await response.write(sse("content_block_stop", {"type": "content_block_stop", "index": 0}))
        end = {"stop_reason": stop_reason, "stop_sequence": None}
        await response.write(
            sse(
                "message_delta",
                {"type": "message_delta", "delta": end, "usage": end_usage},
            )
        )
        await response.write(sse("message_stop", {"type": "message_stop"}))
        return response

    @staticmethod
    def texts_of(body: dict[str, Any]) -> list[str]:
        """Every text the request carries: what input_tokens counts (a word a token)."""
        system = body.get("system") or ""
        texts = [system] if isinstance(system, str) else [b.get("text", "") for b in system]
        for message in body["messages"]:
            content = message["content"]
            if isinstance(content, str):
                texts.append(content)
            else:
                texts += [block.get("text", "") for block in content if block.get("type") == "text"]
        return texts

    @staticmethod
    def reply(body: dict[str, Any]) -> tuple[list[str], str]:
        texts = [f"w{i} " for i in range(int(body["max_tokens"]))]
        if last_text(body).startswith("refuse"):
            return texts[:2], "refusal"  # Claude's safety stop, after what it had said
        for n, text in enumerate(texts):
            if any(stop in text for stop in body.get("stop_sequences") or ()):
                return texts[:n], "stop_sequence"
        return texts, "max_tokens"

    @staticmethod
    def tool_call(body: dict[str, Any]) -> dict[str, Any] | None:
        text = last_text(body)
        if (
            body.get("tools")
            and body["messages"][-1]["role"] == "user"
            and text.startswith("call:")
        ):
            return {
                "type": "tool_use",
                "id": "toolu_test",
                "name": text[5:].strip(),
                "input": {"q": "x"},
            }
        return None


async def amain(args: argparse.Namespace) -> int:
    upstream = Upstream(args.api_key)
    runner = web.AppRunner(upstream.app, access_log=None, shutdown_timeout=0.25)
    await runner.setup()
    site = web.TCPSite(runner, args.host, args.port)
    await site.start()
    print(f"LISTENING {runner.addresses[0][1]}", flush=True)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()
    await runner.cleanup()
    return 0


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=0)
    p.add_argument("--api-key", default=None)
    return asyncio.run(amain(p.parse_args()))


if __name__ == "__main__":
    raise SystemExit(main())

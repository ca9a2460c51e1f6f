"""Replay: a stored chat request sent again, to a chosen route or provider:model target,
through the gateway itself.

The console is then one more client of the gateway: the replay is admitted,
journaled and stored like any request (the invariant holds as for every
client), not streamed, with `replay_of` (the original's id) and `replay_target`
(what was chosen) added to its metadata. A public route is routed as for any
client; a `provider:model` target is pinned through the scope the console
builds (`PINNED`), which no HTTP client can set. The answer comes once the
store holds the replay, so its page can show it beside the original.
"""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import MutableMapping
from typing import Any

import orjson

from llmsvc.errors import ClientError, ProviderError
from llmsvc.gateway.app import Gateway
from llmsvc.gateway.request import PINNED
from llmsvc.gateway.router import Router, Target
from llmsvc.store.queries import RequestDetail

CHAT_PATH = "/v1/chat/completions"


async def replay(
    gateway: Gateway,
    scope: MutableMapping[str, Any],
    original: RequestDetail,
    target: str,
    api_key: str,
) -> uuid.UUID:
    """The new request's id; ClientError if the original cannot be replayed or `target` is
    neither a route nor a provider:model target, ProviderError (with the gateway's status) if
    the gateway refused or failed it."""
    r = original.request
    if (r["api"] or "chat") != "chat":
        raise ClientError(f"only chat completions can be replayed; this one came by {r['api']}")
    target = target.strip()
    pinned = _pinned(gateway.router, target)
    metadata = {**(r["metadata"] or {}), "replay_of": str(r["id"]), "replay_target": target}
    body = {**(r["params"] or {}), "model": target, "messages": r["messages"]}
    body.update(stream=False, metadata=metadata)
    body.pop("stream_options", None)  # only for streams
    if r["end_user"]:
        body["user"] = r["end_user"]
    headers = [(b"content-type", b"application/json")]
    if api_key:
        headers.append((b"authorization", f"Bearer {api_key}".encode()))
    status, answer_headers, answer = await _call(
        gateway, scope, orjson.dumps(body), headers, pinned
    )
    if status != 200:
        try:
            message = orjson.loads(answer)["error"]["message"]
        except (orjson.JSONDecodeError, KeyError, TypeError):
            message = answer.decode(errors="replace")[:500]
        raise ProviderError(f"the gateway answered the replay with {status}: {message}",
                            status=status)  # fmt: skip
    request_id = uuid.UUID(answer_headers[b"x-request-id"].decode())
    if gateway.conversations is not None:
        await gateway.conversations.caught_up()  # the store holds the replay, ended
    return request_id


def choices(router: Router) -> tuple[list[str], list[tuple[str, bool]]]:
    """What a request may be replayed to: the public routes, and every provider:model target
    with whether its provider is disabled now."""
    pinnable = router.pinnable()
    targets = [(name, t.provider.name in router.disabled) for name, t in sorted(pinnable.items())]
    return sorted(router.routes), targets


def _pinned(router: Router, target: str) -> Target | None:
    """The target to pin for a provider:model choice; None for a route (routed as usual)."""
    if not target:
        raise ClientError("choose a route or provider:model to replay the request to",
                          param="target")  # fmt: skip
    if target in router.routes:
        return None
    pinned = router.pinnable().get(target)
    if pinned is None:
        raise ClientError(
            f"{target!r} is neither a route nor a provider:model target here; "
            "the replay form lists them",
            param="target",
        )
    return pinned


async def _call(
    gateway: Gateway,
    scope: MutableMapping[str, Any],
    body: bytes,
    headers: list[tuple[bytes, bytes]],
    pinned: Target | None,
) -> tuple[int, dict[bytes, bytes], bytes]:
    """One POST to the gateway, in process: its status, headers and whole body."""
    inner: dict[str, Any] = {
        "type": "http",
        "asgi": {"version": "3.0"},
        "http_version": "1.1",
        "method": "POST",
        "scheme": scope.get("scheme", "http"),
        "path": CHAT_PATH,
        "raw_path": CHAT_PATH.encode(),
        "query_string": b"",
        "root_path": "",
        "headers": [*headers, (b"content-length", str(len(body)).encode())],
        "client": scope.get("client"),
        "server": scope.get("server"),
    }
    if pinned is not None:
        inner[PINNED] = pinned
    answered = asyncio.Event()
    sent_body = False
    status = 500
    answer_headers: dict[bytes, bytes] = {}
    chunks: list[bytes] = []

    async def receive() -> dict[str, Any]:
        nonlocal sent_body
        if not sent_body:
            sent_body = True
            return {"type": "http.request", "body": body, "more_body": False}
        await answered.wait()  # the console's caller stays connected until the answer
        return {"type": "http.disconnect"}

    async def send(message: MutableMapping[str, Any]) -> None:
        nonlocal status
        if message["type"] == "http.response.start":
            status = message["status"]
            answer_headers.update(dict(message.get("headers", [])))
        elif message["type"] == "http.response.body":
            chunks.append(message.get("body", b""))

    try:
        await gateway(inner, receive, send)
    finally:
        answered.set()
    return status, answer_headers, b"".join(chunks)

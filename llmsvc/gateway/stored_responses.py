"""Stored responses read back: `GET` and `DELETE /v1/responses/{id}` and the response's
`input_items`, each one of the caller's own responses, from the store once it has caught up."""

from __future__ import annotations

from collections.abc import MutableMapping
from typing import Any
from urllib.parse import parse_qs

from llmsvc.errors import ClientError
from llmsvc.gateway.conversations import Conversations
from llmsvc.gateway.errors import send_json
from llmsvc.gateway.request import CALLER, request_id_header
from llmsvc.gateway.responses import get_response
from llmsvc.gateway.responses_wire import stored_object
from llmsvc.gateway.sse import ASGIReceive, ASGISend
from llmsvc.store.conversations import Turn, delete_response

Scope = MutableMapping[str, Any]


def response_id_in(scope: Scope) -> str:
    """The `{id}` of a `/v1/responses/{id}...` path."""
    return str(scope["path"].split("/")[3])


class StoredResponses:
    """The handlers; `conversations` is None in a gateway without a store (each is a 503)."""

    def __init__(self, conversations: Conversations | None) -> None:
        self.conversations = conversations

    async def _found(self, scope: Scope) -> Turn:
        return await get_response(self.conversations, response_id_in(scope), scope.get(CALLER))

    async def retrieve(self, scope: Scope, receive: ASGIReceive, send: ASGISend) -> None:
        found = await self._found(scope)
        await send_json(send, 200, stored_object(found), [request_id_header(scope)])

    async def delete(self, scope: Scope, receive: ASGIReceive, send: ASGISend) -> None:
        """Marks the stored response deleted, once the store holds all of it."""
        found = await self._found(scope)
        assert self.conversations is not None  # a response was found in it
        await self.conversations.caught_up()
        await delete_response(self.conversations.engine, found.request["id"])
        body = {"id": response_id_in(scope), "object": "response", "deleted": True}
        await send_json(send, 200, body, [request_id_header(scope)])

    async def input_items(self, scope: Scope, receive: ASGIReceive, send: ASGISend) -> None:
        page = input_items_page(await self._found(scope), scope.get("query_string", b""))
        await send_json(send, 200, page, [request_id_header(scope)])


def input_items(response_hex: str, given: str | list[dict[str, Any]]) -> list[dict[str, Any]]:
    """A response's input as OpenAI lists it: each item whole, with an id (its own, or one
    made from the response's and its place)."""
    raw = [{"role": "user", "content": given}] if isinstance(given, str) else given
    listed = []
    for n, item in enumerate(raw):
        kind = item.get("type", "message")
        made = {"message": "msg", "function_call": "fc", "function_call_output": "fco"}[kind]
        entry: dict[str, Any] = {
            "id": item.get("id") or f"{made}_{response_hex}_in{n}",
            "type": kind,
            "status": "completed",
        }
        if kind == "message":
            role, content = item["role"], item["content"]
            part = "output_text" if role == "assistant" else "input_text"
            parts = [{"type": part, "text": content}] if isinstance(content, str) else content
            if role == "assistant":
                parts = [
                    {**p, "type": "output_text", "annotations": [], "logprobs": []} for p in parts
                ]
            entry.update(role=role, content=parts)
        else:
            entry.update({k: v for k, v in item.items() if k not in ("id", "type", "status")})
        listed.append(entry)
    return listed


def input_items_page(turn: Turn, query: bytes) -> dict[str, Any]:
    """`GET /v1/responses/{id}/input_items`: the response's input items, a page of them as
    `order` (desc by default, as OpenAI's), `limit` (1 to 100, 20) and `after` (an id) ask."""
    asked = parse_qs(query.decode("latin-1"))
    order = asked.get("order", ["desc"])[0]
    if order not in ("asc", "desc"):
        raise ClientError("order: must be 'asc' or 'desc'", param="order")
    raw_limit = asked.get("limit", ["20"])[0]
    if not raw_limit.isdigit() or not 1 <= int(raw_limit) <= 100:
        raise ClientError("limit: must be an integer from 1 to 100", param="limit")
    limit = int(raw_limit)
    items = input_items(turn.request["id"].hex, turn.request["params"]["input"])
    if order == "desc":
        items.reverse()
    after = asked.get("after", [None])[0]
    if after is not None:
        ids = [item["id"] for item in items]
        if after not in ids:
            raise ClientError(f"after: no input item {after!r} in this response", param="after")
        items = items[ids.index(after) + 1 :]
    page = items[:limit]
    return {
        "object": "list",
        "data": page,
        "first_id": page[0]["id"] if page else None,
        "last_id": page[-1]["id"] if page else None,
        "has_more": len(items) > limit,
    }

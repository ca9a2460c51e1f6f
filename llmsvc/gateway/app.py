"""The ASGI application: a bare callable with a route table, no framework.

Measured (scripts/bench_stack.py): a Starlette app costs 1.4-2x the CPU per
request and per streamed event of a bare ASGI callable under uvicorn, and the
hot path has no room for that.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable, MutableMapping
from typing import Any

import anyio
import orjson

from llmsvc.errors import MethodNotAllowed, NotFound, ServiceUnavailable
from llmsvc.gateway.chat import Exchange
from llmsvc.gateway.errors import send_error
from llmsvc.gateway.journal import Journal
from llmsvc.gateway.request import ClientGone, correlation_id, parse_chat, read_body
from llmsvc.gateway.router import Router
from llmsvc.gateway.sse import ASGIReceive, ASGISend

log = logging.getLogger(__name__)

Scope = MutableMapping[str, Any]
Handler = Callable[[Scope, ASGIReceive, ASGISend], Awaitable[None]]


class Gateway:
    """The HTTP API and what shutdown needs from it: a drain switch and the open requests."""

    def __init__(self, journal: Journal, router: Router, max_body_bytes: int) -> None:
        self.journal = journal
        self.router = router
        self.max_body_bytes = max_body_bytes
        self.draining = False
        self.inflight: set[anyio.CancelScope] = set()
        self.idle = asyncio.Event()
        self.idle.set()
        self.routes: dict[str, dict[str, Handler]] = {
            "/v1/chat/completions": {"POST": self.chat_completions},
            "/v1/models": {"GET": self.list_models},
        }

    async def __call__(self, scope: Scope, receive: ASGIReceive, send: ASGISend) -> None:
        if scope["type"] != "http":
            return
        try:
            methods = self.routes.get(scope["path"])
            if methods is None:
                raise NotFound(f"no route {scope['path']}")
            handler = methods.get(scope["method"])
            if handler is None:
                allow = ", ".join(methods)
                raise MethodNotAllowed(f"{scope['path']} takes {allow}", allow=allow)
            await handler(scope, receive, send)
        except ClientGone:
            return
        except Exception as exc:  # errors.py maps it: 4xx for client errors, 500 otherwise
            await send_error(send, exc)

    async def chat_completions(self, scope: Scope, receive: ASGIReceive, send: ASGISend) -> None:
        if self.draining:
            raise ServiceUnavailable("llmsvc is shutting down and takes no new requests")
        headers = dict(scope["headers"])
        body = await read_body(receive, headers, self.max_body_bytes)
        data, request = parse_chat(body)
        target = self.router.route(request.model)
        exchange = Exchange(
            self.journal, target, data, request, correlation_id(headers), send, receive
        )
        cancel = anyio.CancelScope()
        self.inflight.add(cancel)
        self.idle.clear()
        try:
            await exchange.run(cancel)
        except Exception as exc:  # raised only before the response started
            await send_error(send, exc, exchange.headers)
        finally:
            self.inflight.discard(cancel)
            if not self.inflight:
                self.idle.set()

    async def list_models(self, scope: Scope, receive: ASGIReceive, send: ASGISend) -> None:
        models = [
            {"id": name, "object": "model", "created": 0, "owned_by": "llmsvc"}
            for name in self.router.models()
        ]
        body = orjson.dumps({"object": "list", "data": models})
        await send(
            {
                "type": "http.response.start",
                "status": 200,
                "headers": [(b"content-type", b"application/json")],
            }
        )
        await send({"type": "http.response.body", "body": body})

    async def finish_requests(self, grace: float) -> int:
        """Refuse new requests, wait up to `grace` for open ones, then interrupt the rest.

        Returns how many were interrupted; each records itself `interrupted`.
        """
        self.draining = True
        with anyio.move_on_after(grace):
            await self.idle.wait()
        interrupted = len(self.inflight)
        for cancel in list(self.inflight):
            cancel.cancel()
        with anyio.move_on_after(10):  # each interrupted request journals its end
            await self.idle.wait()
        return interrupted

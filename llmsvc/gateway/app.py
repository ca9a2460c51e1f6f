"""The ASGI application: a bare callable with a route table, no framework.

Measured (benchmarks/bench_stack.py): a Starlette app costs 1.4-2x the CPU per
request and per streamed event of a bare ASGI callable under uvicorn, and the
hot path has no room for that.
"""

from __future__ import annotations

import asyncio
import functools
import time
from collections.abc import Awaitable, Callable, Coroutine, MutableMapping
from typing import TYPE_CHECKING, Any

import anyio
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from llmsvc.callers import Caller
from llmsvc.config import RetryPolicy
from llmsvc.errors import MethodNotAllowed, NotFound, ServiceUnavailable, UnknownModel
from llmsvc.gateway import endpoints
from llmsvc.gateway.attribution import Attribution
from llmsvc.gateway.chat import Exchange
from llmsvc.gateway.conversations import Conversations
from llmsvc.gateway.endpoints import SESSION_PREFIX
from llmsvc.gateway.errors import reject, send_error, send_json
from llmsvc.gateway.http_request import body_writer, closed_check, reply_writer
from llmsvc.gateway.journal import Journal
from llmsvc.gateway.request import (
    CALLER,
    PINNED,
    ClientGone,
    correlation_id,
    read_body,
    request_id,
    request_id_header,
)
from llmsvc.gateway.router import Router
from llmsvc.gateway.sessions import Sessions
from llmsvc.gateway.sse import ASGIReceive, ASGISend
from llmsvc.gateway.starts import Starts
from llmsvc.gateway.stored_responses import StoredResponses
from llmsvc.gateway.wire import Wire
from llmsvc.limits import Limiter
from llmsvc.logs import logger
from llmsvc.metrics import Metrics, WalStatus
from llmsvc.providers.base import Native

if TYPE_CHECKING:
    from llmsvc.gateway.tracing import Tracing
    from llmsvc.keytable import KeyTable

log = logger(__name__)

Scope = MutableMapping[str, Any]
# A handler answers, or returns the serving of a generating request (endpoints.Serving).
Handler = Callable[[Scope, ASGIReceive, ASGISend], Awaitable[endpoints.Serving | None]]
Endpoint = Callable[
    [endpoints.Gateway, Scope, ASGIReceive, ASGISend], Awaitable[endpoints.Serving | None]
]
# Routes with an id in the path (see route_of).
MODEL_PREFIX = "/v1/models/"
MODEL_ROUTE = MODEL_PREFIX + "{model}"
SESSION_ROUTE = SESSION_PREFIX + "{id}"
RESPONSE_PREFIX = "/v1/responses/"
RESPONSE_ROUTE = RESPONSE_PREFIX + "{id}"
INPUT_ITEMS = "/input_items"
INPUT_ITEMS_ROUTE = RESPONSE_ROUTE + INPUT_ITEMS
# The routes with an id in their path: (prefix, suffix, route). An id holds no "/"; a model's
# name may (`org/model`), so every path under MODEL_PREFIX is that route.
ID_ROUTES = (
    (MODEL_PREFIX, "", MODEL_ROUTE),
    (SESSION_PREFIX, "", SESSION_ROUTE),
    (RESPONSE_PREFIX, "", RESPONSE_ROUTE),
    (RESPONSE_PREFIX, INPUT_ITEMS, INPUT_ITEMS_ROUTE),
)


def route_of(path: str) -> str:
    """The route table's key for a path: the pattern of a route with an id, or the path."""
    for prefix, suffix, route in ID_ROUTES:
        if path.startswith(prefix) and path.endswith(suffix):
            key = path[len(prefix) : len(path) - len(suffix)]
            if key and (route == MODEL_ROUTE or "/" not in key):
                return route
    return path


class Gateway:
    """The HTTP API and what shutdown needs from it: a drain switch and the open requests.

    `wal_status` (given by the daemon, which owns the store) is how the
    gateway sees the database and the WAL backlog: it answers `/api/health`
    from it and refuses new requests while the backlog is over its limit.
    Without it (a gateway with no store behind it) health reports only
    whether the gateway takes requests.
    """

    def __init__(
        self,
        journal: Journal,
        router: Router,
        max_body_bytes: int,
        policy: RetryPolicy,
        *,
        wal_status: Callable[[], WalStatus] | None = None,
        metrics: Metrics | None = None,
        describe: Callable[[], dict[str, Any]] | None = None,
        keys: KeyTable | None = None,
        limiter: Limiter | None = None,
        conversations: Conversations | None = None,
        store_embeddings: bool = False,
        sessions: Sessions | None = None,
        tracing: Tracing | None = None,
    ) -> None:
        self.journal = journal
        self.tracing = tracing  # spans of requests and attempts (otel_endpoint); None: off
        self.store_embeddings = store_embeddings  # journal embeddings' vectors (a setting)
        self.conversations = conversations  # stored turns to continue (responses, sessions)
        self.sessions = sessions  # /v1/sessions and chat's session_id naming one of them
        self.keys = keys  # with auth = "keys": every /v1/* request needs one of them
        self.limiter = limiter  # rate limits and budgets of callers (llmsvc.limits)
        self.router = router
        self.policy = policy
        self.max_body_bytes = max_body_bytes
        self.wal_status = wal_status
        self.describe = describe  # the daemon's parts, for /api/health's detail
        self.paused: str | None = None  # why requests are refused for a while (a restore)
        self.attempt_counts: dict[str, dict[str, int]] = {}  # provider -> outcome -> attempts
        self.metrics = metrics if metrics is not None else Metrics()
        self._refused_backlog = self.metrics.requests_refused.labels(reason="backlog")
        self._refused_shutdown = self.metrics.requests_refused.labels(reason="shutdown")
        self.draining = False
        self.inflight: set[Exchange] = set()
        self.starts = Starts()
        self.idle = asyncio.Event()
        self.idle.set()
        self.created = int(time.time())  # every model's `created`: when this gateway was built
        stored = StoredResponses(conversations)

        def on(endpoint: Endpoint) -> Handler:
            return functools.partial(endpoint, self)

        self.routes: dict[str, dict[str, Handler]] = {
            "/v1/chat/completions": {"POST": on(endpoints.chat_completions)},
            "/v1/embeddings": {"POST": on(endpoints.embeddings)},
            "/v1/messages": {"POST": on(endpoints.messages)},
            "/v1/messages/count_tokens": {"POST": on(endpoints.count_message_tokens)},
            "/v1/responses": {"POST": on(endpoints.responses)},
            RESPONSE_ROUTE: {"GET": stored.retrieve, "DELETE": stored.delete},
            INPUT_ITEMS_ROUTE: {"GET": stored.input_items},
            "/v1/models": {"GET": self.list_models},
            MODEL_ROUTE: {"GET": self.retrieve_model},
            "/v1/sessions": {"POST": on(endpoints.create_session)},
            SESSION_ROUTE: {
                "GET": on(endpoints.retrieve_session),
                "DELETE": on(endpoints.delete_session),
            },
            "/api/health": {"GET": self.health},
            "/api/ready": {"GET": self.ready},
            "/api/metrics": {"GET": self.prometheus},
        }
        # RFC 9110 section 9.3.2: HEAD is GET without the body, which the HTTP layer drops.
        for methods in self.routes.values():
            if "GET" in methods:
                methods["HEAD"] = methods["GET"]

    async def __call__(self, scope: Scope, receive: ASGIReceive, send: ASGISend) -> None:
        if scope["type"] != "http":
            return
        if not self.starts.begin():  # a burst: this one begins in a later loop round
            await self.starts.turn()
        request_id(scope)  # made first: an answer sent for it below by the HTTP layer has it too
        try:
            if self.keys is not None and scope["path"].startswith("/v1/"):
                # Before the route is looked up: a caller without a key learns nothing.
                scope[CALLER] = self.keys.authenticate(dict(scope["headers"]))
            methods = self.routes.get(route_of(scope["path"]))
            if methods is None:
                raise NotFound(f"no route {scope['path']}")
            handler = methods.get(scope["method"])
            if handler is None:
                allow = ", ".join(methods)
                raise MethodNotAllowed(f"{scope['path']} takes {allow}", allow=allow)
            serving = await handler(scope, receive, send)
            if serving is not None:  # awaited here: the endpoint's frame is gone by now
                await serving
        except ClientGone:
            return
        except Exception as exc:  # errors.py maps it: 4xx for client errors, 500 otherwise
            await reject(scope, send, exc)

    async def admit(self, scope: Scope, receive: ASGIReceive) -> tuple[dict[bytes, bytes], bytes]:
        """A request to a provider, admitted: its headers and body. Refused while paused,
        draining or over the backlog limit, before the body is read (nothing is journaled).

        The headers are taken out of the scope, which a stream keeps for minutes: a client
        SDK's dozen or more cost 1-2 KiB an open stream, and nothing reads them again."""
        if self.paused is not None:
            raise ServiceUnavailable(self.paused)
        if self.draining:
            self._refused_shutdown.inc()
            raise ServiceUnavailable(SHUTTING_DOWN)
        if self.wal_status is not None and (wal := self.wal_status()).over_limit:
            self._refused_backlog.inc()
            raise ServiceUnavailable(backlog_refusal(wal))
        headers = dict(scope["headers"])
        scope["headers"] = ()
        return headers, await read_body(receive, headers, self.max_body_bytes)

    def serve(
        self,
        scope: Scope,
        send: ASGISend,
        headers: dict[bytes, bytes],
        data: dict[str, Any],
        model: str,
        stream: bool,
        attribution: Attribution,
        wire: Callable[[str, int], Wire],
        api: str,
        native: Native | None = None,
        store_content: bool = True,
        params: dict[str, Any] | None = None,
    ) -> Coroutine[Any, Any, None]:
        """Serve an admitted request through its exchange (chat.py), its caller's rate limits
        applied first (a 429 before anything is journaled); to the scope's pinned target, if
        the console's replay set one (`PINNED`), else along its model's route.

        Not a coroutine itself: it returns the exchange's run to await, so no frame of it
        (its arguments, the wire's factory) outlives the request's start; see `Serving` in
        endpoints.py."""
        exchange = Exchange(
            self.journal,
            self.router,
            self.policy,
            data,
            model,
            stream,
            request_id(scope),
            correlation_id(headers),
            send,
            closed_check(scope),
            body_writer(scope),
            reply_writer(scope),
            caller=scope.get(CALLER),
            attribution=attribution,
            wire=wire,
            api=api,
            native=native,
            store_content=store_content,
            params=params,
            pinned=scope.get(PINNED),
        )
        if exchange.caller is not None and self.limiter is not None:
            exchange.headers = self.limiter.admit(exchange.caller)
        if self.tracing is not None:
            exchange.trace = self.tracing.request(
                api,
                model,
                exchange.request_id,
                exchange.correlation_id,
                headers.get(b"traceparent"),
                headers.get(b"tracestate"),
            )
        return self._run(exchange)

    async def _run(self, exchange: Exchange) -> None:
        """Run the exchange as an open request (shutdown waits for it, then interrupts it),
        then count it and charge its caller."""
        exchange.crowded = bool(self.inflight)
        self.inflight.add(exchange)
        self.idle.clear()
        try:
            await exchange.run()
        except Exception as exc:
            if exchange.started:  # too late for a status line: the connection just closes
                log.exception("request failed mid-response", request_id=exchange.request_id)
            else:
                await send_error(exchange.send, exc, exchange.response_headers(), exchange.api)
        finally:
            self.inflight.discard(exchange)
            if not self.inflight:
                self.idle.set()
            self._count(exchange)
            if exchange.caller is not None and self.limiter is not None:
                tokens = (exchange.counts.prompt or 0) + (exchange.counts.completion or 0)
                lsn = self.journal.writer.end.lsn - 1  # at or after the request's end record
                self.limiter.charge(exchange.caller, tokens, exchange.cost, lsn)

    def _count(self, exchange: Exchange) -> None:
        for name, _model, outcome, _code in exchange.attempts:
            counts = self.attempt_counts.setdefault(name, {})
            counts[outcome] = counts.get(outcome, 0) + 1
        first = exchange.first_token_us
        self.metrics.request_done(
            exchange.target.provider.name,
            exchange.model,
            exchange.status,
            exchange.error_code,
            exchange.counts.prompt,
            exchange.seq,
            time.monotonic() - exchange.began,
            (first - exchange.began_us) / 1e6 if first is not None else None,
            exchange.attempts,
            exchange.skipped,
        )

    async def list_models(self, scope: Scope, receive: ASGIReceive, send: ASGISend) -> None:
        """The models served; to a caller whose key is limited to some, only those."""
        caller: Caller | None = scope.get(CALLER)
        allowed = caller.models if caller is not None else None
        models = [
            self._model(name) for name in self.router.models() if allowed is None or name in allowed
        ]
        await send_json(send, 200, {"object": "list", "data": models}, [request_id_header(scope)])

    async def retrieve_model(self, scope: Scope, receive: ASGIReceive, send: ASGISend) -> None:
        """One model as listed; one not served, or not the caller's to use, is not found."""
        name = scope["path"][len(MODEL_PREFIX) :]
        caller: Caller | None = scope.get(CALLER)
        allowed = caller.models if caller is not None else None
        if name not in self.router.models() or (allowed is not None and name not in allowed):
            raise UnknownModel(f"the model {name!r} is not served here; GET /v1/models lists them")
        await send_json(send, 200, self._model(name), [request_id_header(scope)])

    def _model(self, name: str) -> dict[str, Any]:
        return {"id": name, "object": "model", "created": self.created, "owned_by": "llmsvc"}

    async def health(self, scope: Scope, receive: ASGIReceive, send: ASGISend) -> None:
        """Liveness with detail: 200 while the process serves HTTP at all; `status` says how."""
        await send_json(send, 200, self.health_report(), [*NO_STORE, request_id_header(scope)])

    async def ready(self, scope: Scope, receive: ASGIReceive, send: ASGISend) -> None:
        """Readiness, for a load balancer: 200 while chat requests are taken, else 503 and why."""
        reason = self.refusal()
        body = {"ready": reason is None, "reason": reason}
        headers = [*NO_STORE, request_id_header(scope)]
        await send_json(send, 503 if reason else 200, body, headers)

    async def prometheus(self, scope: Scope, receive: ASGIReceive, send: ASGISend) -> None:
        """The metrics port's text, on the API port too (off the loop: collectors read files)."""
        body = await asyncio.to_thread(generate_latest, self.metrics.registry)
        await send(
            {
                "type": "http.response.start",
                "status": 200,
                "headers": [
                    (b"content-type", CONTENT_TYPE_LATEST.encode()),
                    *NO_STORE,
                    request_id_header(scope),
                ],
            }
        )
        await send({"type": "http.response.body", "body": body})

    def state(self) -> tuple[str, str | None]:
        """(status, reason) as `/api/health` says them, in one order of precedence."""
        wal = self.wal_status() if self.wal_status is not None else None
        if self.draining:
            return "stopping", SHUTTING_DOWN
        if self.paused is not None:
            return "paused", self.paused
        if wal is not None and wal.disk_full:
            return "refusing", DISK_FULL
        if wal is not None and wal.over_limit:
            return "refusing", backlog_refusal(wal)
        if wal is not None and wal.catching_up is not None:
            return "degraded", f"catching up with the database: {wal.catching_up}; {JOURNALED}"
        if wal is not None and not wal.database_up:
            return (
                "degraded",
                f"{wal.database_problem or 'the database is unreachable'}; {JOURNALED}",
            )
        return "ok", None

    def refusal(self) -> str | None:
        """Why new chat requests would be refused now, or None. A database outage alone is not
        a reason: the WAL absorbs it."""
        status, reason = self.state()
        return None if status in ("ok", "degraded") else reason

    def health_report(self) -> dict[str, Any]:
        """The body of `/api/health`; its shape is in README.md (Operations)."""
        status, reason = self.state()
        report: dict[str, Any] = {"status": status}
        if reason is not None:
            report["reason"] = reason
        if self.describe is not None:
            report.update(self.describe())
        return report

    async def finish_requests(self, grace: float, ends_within: float) -> int:
        """Refuse new requests, wait up to `grace` for open ones, then interrupt the rest.

        Returns how many were interrupted; each records itself `interrupted`.
        """
        self.draining = True
        return await self.settle(grace, "shutdown", ends_within)

    async def settle(self, grace: float, why: str, ends_within: float) -> int:
        """With new requests refused, let open ones finish within `grace`, interrupt the rest.

        The interrupted requests get `ends_within` seconds to journal their ends.

        The log says how many it waits for, and again every PROGRESS_SECONDS, so a
        quiet grace period reads as waiting, not as a hang. `why` prefixes those lines.
        """
        loop = asyncio.get_running_loop()
        deadline = loop.time() + grace
        if self.inflight and grace > 0:
            log.info(
                "%s: waiting for open requests", why, count=len(self.inflight), grace_seconds=grace
            )
        while self.inflight and (left := deadline - loop.time()) > 0:
            with anyio.move_on_after(min(PROGRESS_SECONDS, left)):
                await self.idle.wait()
            if self.inflight and (left := deadline - loop.time()) > 0:
                log.info(
                    "%s: still waiting for open requests",
                    why,
                    count=len(self.inflight),
                    seconds_left=round(left, 1),
                )
        interrupted = len(self.inflight)
        for exchange in list(self.inflight):
            exchange.interrupt()
        with anyio.move_on_after(ends_within):  # each interrupted request journals its end
            await self.idle.wait()
        return interrupted


PROGRESS_SECONDS = 5.0  # while open requests are awaited, how often the log says how many
NO_STORE = [(b"cache-control", b"no-store")]
SHUTTING_DOWN = "llmsvc is shutting down and takes no new requests"
DISK_FULL = "the WAL's disk is full; requests are refused until space is freed"
JOURNALED = "requests are journaled in the WAL and stored when the database takes them"


def backlog_refusal(wal: WalStatus) -> str:
    """Why a request is refused for backlog, in words an operator can act on."""
    cause = "the database is unreachable" if not wal.database_up else "the database is behind"
    return (
        f"llmsvc takes no new requests: {cause} and the WAL backlog of "
        f"{wal.backlog_bytes} bytes not yet stored is over "
        f"wal_backlog_limit_bytes={wal.backlog_limit_bytes}; "
        "requests are accepted again once it drains below the limit"
    )

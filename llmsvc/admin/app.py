"""The admin API under `/api/admin/`: a bearer token first, then operator actions.

Mounted in front of the gateway: every other path goes straight through. The
token is checked before the path is looked at, so a caller without it learns
nothing (401 for every admin path, existing or not). With no `admin_token`
configured the admin API is off and every admin path is 404.
"""

from __future__ import annotations

import hmac
import re
import uuid
from collections.abc import Awaitable, Callable, MutableMapping
from datetime import UTC, datetime, timedelta
from typing import Any, Protocol
from urllib.parse import parse_qs

from pydantic import BaseModel, ConfigDict, Field
from sqlalchemy.ext.asyncio import AsyncEngine

from llmsvc.admin.console.app import CONSOLE, Console
from llmsvc.admin.openapi import document
from llmsvc.config import Settings
from llmsvc.errors import BackupError, ClientError, MethodNotAllowed, NotFound, Unauthorized
from llmsvc.gateway.app import Gateway
from llmsvc.gateway.errors import reject, send_json
from llmsvc.gateway.request import parse_body, read_body, request_id_header
from llmsvc.gateway.sse import ASGIReceive, ASGISend
from llmsvc.logs import logger
from llmsvc.maintenance import backup, retention
from llmsvc.maintenance.jobs import backup_job, prune_job
from llmsvc.maintenance.runs import Job, JobResult
from llmsvc.store import keys
from llmsvc.store.attribution import SPEND_BY, RequestFilter, parse_since, spend
from llmsvc.store.keys import utc
from llmsvc.store.queries import find_requests, recent_requests, request_detail, token_summary

log = logger(__name__)

PREFIX = "/api/admin/"
MAX_BODY = 64 * 1024
MAX_LIMIT = 1000  # requests listed by one GET /api/admin/requests

Scope = MutableMapping[str, Any]
ASGIApp = Callable[[Scope, ASGIReceive, ASGISend], Awaitable[None]]


class Operations(Protocol):
    """What the admin API asks of the daemon that mounts it."""

    settings: Settings
    engine: AsyncEngine
    maintenance: AsyncEngine  # for maintenance work: no per-command bound, a pool of its own
    gateway: Gateway  # the console sends replays through it

    def health(self) -> dict[str, Any]:
        """`/api/health`'s body: status, reason and every part's state."""
        ...

    def provider_names(self) -> list[str]: ...

    async def set_provider_enabled(self, name: str, enabled: bool) -> None: ...

    async def run_by_hand(self, name: str, job: Job) -> JobResult: ...

    async def restore(self, name: str) -> dict[str, Any]: ...

    async def keys_changed(self) -> None: ...


class PruneBody(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)

    older_than_days: int | None = Field(default=None, ge=0, le=retention.MAX_DAYS)
    before: str | None = Field(default=None, min_length=1, max_length=64)
    dry_run: bool = False


class RestoreBody(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)

    file: str = Field(min_length=1, max_length=255)


Handler = Callable[[Scope, ASGIReceive, re.Match[str]], Awaitable[tuple[int, dict[str, Any]]]]


class AdminApi:
    def __init__(self, app: ASGIApp, token: str | None, ops: Operations) -> None:
        self.app = app
        self._token = token.encode() if token else None
        self.ops = ops
        self.openapi = document(ADMIN_BODIES)
        self.console = Console(token, ops, self.request_body)
        self.routes: list[tuple[re.Pattern[str], dict[str, Handler]]] = [
            (re.compile(r"status"), {"GET": self.status}),
            (re.compile(r"requests"), {"GET": self.requests}),
            (re.compile(r"spend"), {"GET": self.spend}),
            (re.compile(r"requests/(?P<id>[^/]+)"), {"GET": self.request}),
            (re.compile(r"providers"), {"GET": self.providers}),
            (
                re.compile(r"providers/(?P<name>[^/]+)/(?P<action>enable|disable)"),
                {"POST": self.switch_provider},
            ),
            (re.compile(r"prune"), {"POST": self.prune}),
            (re.compile(r"backup"), {"POST": self.backup}),
            (re.compile(r"backups"), {"GET": self.backups}),
            (re.compile(r"restore"), {"POST": self.restore}),
            (re.compile(r"keys"), {"GET": self.list_keys, "POST": self.create_key}),
            (re.compile(r"keys/(?P<key>[^/]+)"), {"GET": self.show_key}),
            (
                re.compile(r"keys/(?P<key>[^/]+)/(?P<action>revoke|rotate)"),
                {"POST": self.change_key},
            ),
            (re.compile(r"teams"), {"GET": self.list_teams, "POST": self.create_team}),
            (
                re.compile(r"teams/(?P<team>[^/]+)"),
                {"GET": self.show_team, "PATCH": self.update_team},
            ),
        ]

    def __call__(self, scope: Scope, receive: ASGIReceive, send: ASGISend) -> Awaitable[None]:
        """The gateway's own call for its routes (uvicorn awaits it: `interface="asgi3"` in
        serving.py), so a stream's minutes hold no frame of this one; else `_serve`'s."""
        path = scope.get("path", "")
        if scope["type"] == "http" and (
            path == "/openapi.json" or (path + "/").startswith((CONSOLE, PREFIX))
        ):
            return self._serve(scope, receive, send)
        return self.app(scope, receive, send)

    async def _serve(self, scope: Scope, receive: ASGIReceive, send: ASGISend) -> None:
        path = scope.get("path", "")
        if path == "/openapi.json":
            if scope["method"] != "GET":
                await reject(scope, send, MethodNotAllowed("/openapi.json takes GET", allow="GET"))
                return
            await send_json(send, 200, self.openapi, [request_id_header(scope)])
            return
        if (path + "/").startswith(CONSOLE):
            await self.console(scope, receive, send)
            return
        try:
            if self._token is None:
                raise NotFound("the admin API is off: set admin_token to turn it on")
            self._authorize(scope)
            handler, match = self._route(path[len(PREFIX) :], scope["method"])
            status, body = await handler(scope, receive, match)
            headers = [(b"cache-control", b"no-store"), request_id_header(scope)]
            await send_json(send, status, body, headers)
        except Exception as exc:
            await reject(scope, send, exc)

    def _authorize(self, scope: Scope) -> None:
        """A constant-time comparison of the bearer token; the token is never logged."""
        assert self._token is not None
        header = dict(scope["headers"]).get(b"authorization", b"")
        scheme, _, given = header.partition(b" ")
        if scheme.lower() != b"bearer" or not hmac.compare_digest(given.strip(), self._token):
            raise Unauthorized("the admin API needs Authorization: Bearer <admin_token>")

    def _route(self, rest: str, method: str) -> tuple[Handler, re.Match[str]]:
        for pattern, methods in self.routes:
            if match := pattern.fullmatch(rest):
                if method not in methods:
                    allow = ", ".join(methods)
                    raise MethodNotAllowed(f"{PREFIX}{rest} takes {allow}", allow=allow)
                return methods[method], match
        raise NotFound(f"no admin route {PREFIX}{rest}")

    # -- handlers: each returns (status, JSON body) ------------------------------------

    async def status(self, scope: Scope, receive: ASGIReceive, match: re.Match[str]) -> Any:
        return 200, self.ops.health()

    async def requests(self, scope: Scope, receive: ASGIReceive, match: re.Match[str]) -> Any:
        """Recent requests, filtered as `llmsvc status` filters them."""
        query = _query(scope)
        pairs = []
        for pair in query.get("metadata", []):
            name, sep, value = pair.partition(":")
            if not sep or not name:
                raise ClientError(f"metadata={pair!r}: give it as key:value", param="metadata")
            pairs.append((name, value))
        limit = _one(query, "limit") or "20"
        if not limit.isdigit() or not 1 <= int(limit) <= MAX_LIMIT:
            raise ClientError(f"limit must be a whole number 1..{MAX_LIMIT}", param="limit")
        only = RequestFilter(
            _one(query, "key"), _one(query, "team"), _one(query, "user"), tuple(pairs),
            _since(query), _one(query, "correlation_id"), text=_one(query, "text") or None,
        )  # fmt: skip
        listing = await recent_requests(self.ops.engine, int(limit), only)
        body = {"requests": _plain(listing.rows)}
        if (searched := listing.searched) is not None:  # how far the replies were read
            body["searched"] = _plain(
                {k: v for k, v in vars(searched).items() if k != "resume"}
                | {"older_unread": searched.resume is not None}
            )
        return 200, body

    async def spend(self, scope: Scope, receive: ASGIReceive, match: re.Match[str]) -> Any:
        """Requests, tokens and cost per key, team, user, model or day, as `llmsvc spend`."""
        query = _query(scope)
        by = _one(query, "by") or "key"
        if by not in SPEND_BY:
            raise ClientError(f"by must be one of {', '.join(SPEND_BY)}", param="by")
        rows = await spend(self.ops.engine, by, _since(query))
        return 200, {"by": by, "spend": _plain(rows)}

    async def request(self, scope: Scope, receive: ASGIReceive, match: re.Match[str]) -> Any:
        return 200, await self.request_body(match["id"])

    async def request_body(self, given: str) -> dict[str, Any]:
        """One request by its id or, as `llmsvc show`, by the correlation id it was sent with."""
        found = await find_requests(self.ops.engine, given)
        if not found:
            raise NotFound(f"no request with the id or correlation id {given!r} in the store")
        if len(found) > 1:
            raise ClientError(
                f"several requests were sent with the correlation id {given!r}: list them with "
                "GET /api/admin/requests?correlation_id=… and ask for one by its request id"
            )
        detail = await request_detail(self.ops.engine, found[0])
        if detail is None:  # pruned meanwhile
            raise NotFound(f"no request with the id or correlation id {given!r} in the store")
        summary = await token_summary(self.ops.engine, [a["id"] for a in detail.attempts])
        request = {k: v for k, v in detail.request.items() if k not in ("messages", "params")}
        attempts = [
            {**attempt, "tokens": summary.get(attempt["id"], {"stored": 0})}
            for attempt in detail.attempts
        ]
        body: dict[str, Any] = _plain({"request": request, "attempts": attempts})
        return body

    async def providers(self, scope: Scope, receive: ASGIReceive, match: re.Match[str]) -> Any:
        return 200, {"providers": self.ops.health()["providers"]}

    async def switch_provider(
        self, scope: Scope, receive: ASGIReceive, match: re.Match[str]
    ) -> Any:
        name, enabled = match["name"], match["action"] == "enable"
        if name not in self.ops.provider_names():
            raise NotFound(f"no provider {name!r}; GET {PREFIX}providers lists them")
        await self.ops.set_provider_enabled(name, enabled)
        return 200, {"provider": name, "enabled": enabled}

    async def prune(self, scope: Scope, receive: ASGIReceive, match: re.Match[str]) -> Any:
        """The prune job as scheduled, with the cut-off given (days back, or a time)."""
        body = await self._body(scope, receive, PruneBody, empty_ok=True)
        cutoff = None
        if body.older_than_days is not None and body.before is not None:
            raise ClientError("give older_than_days or before, not both", param="before")
        if body.older_than_days is not None:
            cutoff = datetime.now(UTC) - timedelta(days=body.older_than_days)
        elif body.before is not None:
            try:
                cutoff = retention.parse_before(body.before)
            except ValueError as exc:
                raise ClientError(f"before: {exc}", param="before") from None
        job = prune_job(self.ops.settings, self.ops.maintenance, cutoff, body.dry_run)
        return _result(await self.ops.run_by_hand("prune", job))

    async def backup(self, scope: Scope, receive: ASGIReceive, match: re.Match[str]) -> Any:
        job = backup_job(self.ops.settings, self.ops.maintenance)
        return _result(await self.ops.run_by_hand("backup", job))

    async def backups(self, scope: Scope, receive: ASGIReceive, match: re.Match[str]) -> Any:
        listed = backup.list_backups(self.ops.settings.backup_dir)
        return 200, {"backups": [vars(b) for b in listed]}

    async def restore(self, scope: Scope, receive: ASGIReceive, match: re.Match[str]) -> Any:
        body = await self._body(scope, receive, RestoreBody)
        try:
            backup.backup_path(self.ops.settings.backup_dir, body.file)  # no way out of backup_dir
        except BackupError as exc:
            raise ClientError(str(exc), param="file") from None
        return 200, await self.ops.restore(body.file)

    async def list_keys(self, scope: Scope, receive: ASGIReceive, match: re.Match[str]) -> Any:
        return 200, _plain({"keys": await keys.list_keys(self.ops.engine)})

    async def create_key(self, scope: Scope, receive: ASGIReceive, match: re.Match[str]) -> Any:
        """The secret is in this answer only; the store keeps its hash."""
        spec = await self._body(scope, receive, keys.KeySpec)
        key, secret = await keys.create_key(self.ops.engine, spec)
        await self.ops.keys_changed()
        log.info("key created by an operator", key=key["name"], id=key["id"])
        return 201, _plain({"key": key, "secret": secret})

    async def show_key(self, scope: Scope, receive: ASGIReceive, match: re.Match[str]) -> Any:
        return 200, _plain({"key": await keys.show_key(self.ops.engine, match["key"])})

    async def change_key(self, scope: Scope, receive: ASGIReceive, match: re.Match[str]) -> Any:
        """Revoke or rotate; in force on this instance at once, on the others within 2 s."""
        engine, answer = self.ops.engine, {}
        if match["action"] == "revoke":
            key = await keys.revoke_key(engine, match["key"])
        else:
            key, answer["secret"] = await keys.rotate_key(engine, match["key"])
        await self.ops.keys_changed()
        log.info("key %sd by an operator", match["action"], key=key["name"], id=key["id"])
        return 200, _plain({"key": key, **answer})

    async def list_teams(self, scope: Scope, receive: ASGIReceive, match: re.Match[str]) -> Any:
        return 200, _plain({"teams": await keys.list_teams(self.ops.engine)})

    async def create_team(self, scope: Scope, receive: ASGIReceive, match: re.Match[str]) -> Any:
        spec = await self._body(scope, receive, keys.TeamSpec)
        team = await keys.create_team(self.ops.engine, spec)
        await self.ops.keys_changed()
        log.info("team created by an operator", team=team["name"], id=team["id"])
        return 201, _plain({"team": team})

    async def show_team(self, scope: Scope, receive: ASGIReceive, match: re.Match[str]) -> Any:
        return 200, _plain({"team": await keys.show_team(self.ops.engine, match["team"])})

    async def update_team(self, scope: Scope, receive: ASGIReceive, match: re.Match[str]) -> Any:
        update = await self._body(scope, receive, keys.TeamUpdate)
        team = await keys.update_team(self.ops.engine, match["team"], update)
        await self.ops.keys_changed()
        log.info("team updated by an operator", team=team["name"], id=team["id"])
        return 200, _plain({"team": team})

    async def _body(
        self, scope: Scope, receive: ASGIReceive, model: type[Any], empty_ok: bool = False
    ) -> Any:
        raw = await read_body(receive, dict(scope["headers"]), MAX_BODY)
        if empty_ok and not raw.strip():
            raw = b"{}"
        return parse_body(raw, model)[1]


ADMIN_BODIES: list[type[BaseModel]] = [
    PruneBody,
    RestoreBody,
    keys.KeySpec,
    keys.TeamSpec,
    keys.TeamUpdate,
]


def _query(scope: Scope) -> dict[str, list[str]]:
    """The query string's parameters; one that is not UTF-8 is the client's error."""
    try:
        return parse_qs(scope.get("query_string", b"").decode(), errors="strict")
    except UnicodeDecodeError:
        raise ClientError("the query string is not UTF-8") from None


def _one(query: dict[str, list[str]], name: str) -> str | None:
    """A parameter given at most once."""
    values = query.get(name)
    if values is None:
        return None
    if len(values) > 1:
        raise ClientError(f"{name} is given {len(values)} times; give it once", param=name)
    return values[0]


def _since(query: dict[str, list[str]]) -> datetime | None:
    text = _one(query, "since")
    try:
        return None if text is None else parse_since(text)
    except ValueError as exc:
        raise ClientError(f"since: {exc}", param="since") from None


def _result(result: JobResult) -> tuple[int, dict[str, Any]]:
    """A maintenance run as an answer: 200 when it ended ok, else 500 with what it said."""
    body = _plain(vars(result))
    return (200 if result.status == "ok" else 500), body


def _plain(value: Any) -> Any:
    """UUIDs and datetimes (in UTC, with the zone) as strings, for JSON."""
    if isinstance(value, dict):
        return {str(k): _plain(v) for k, v in value.items()}  # SQLAlchemy keys subclass str
    if isinstance(value, list):
        return [_plain(v) for v in value]
    if isinstance(value, uuid.UUID):
        return str(value)
    if isinstance(value, datetime):
        return utc(value).isoformat()
    if hasattr(value, "isoformat"):  # a day
        return value.isoformat()
    return value

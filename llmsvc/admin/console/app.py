"""The console's routes under `/console/`: login, the pages, and the few actions.

Pages need a session cookie (`session.Sessions`) that was not logged out (the
store's `console_logouts`, shared by every worker); without one a GET is sent
to the login form and a POST refused. Every POST also needs its session's CSRF
token in the form and an Origin of this server. With no `admin_token`
configured the console is off: every path is 404, saying how to turn it on.
"""

from __future__ import annotations

import re
import uuid
from collections.abc import Awaitable, Callable, MutableMapping
from datetime import UTC, datetime
from importlib.resources import files
from typing import Any, Protocol
from urllib.parse import parse_qs

import orjson
from sqlalchemy.ext.asyncio import AsyncEngine

from llmsvc.admin.console import pages
from llmsvc.admin.console.replay import choices, replay
from llmsvc.admin.console.session import COOKIE, LIFETIME_SECONDS, Sessions, same_origin
from llmsvc.errors import ClientError, Forbidden, MethodNotAllowed, NotFound, Unauthorized
from llmsvc.gateway.app import Gateway
from llmsvc.gateway.errors import describe
from llmsvc.gateway.rejections import log_rejection
from llmsvc.gateway.request import ClientGone, read_body, request_id, request_id_header
from llmsvc.gateway.sse import ASGIReceive, ASGISend
from llmsvc.logs import logger
from llmsvc.store.attribution import BUCKETS, SPEND_BY, RequestFilter, parse_since, spend
from llmsvc.store.console_logouts import console_session_ended, end_console_session
from llmsvc.store.keys import utc
from llmsvc.store.queries import (
    RequestDetail,
    find_requests,
    recent_requests,
    request_detail,
    token_times,
)

log = logger(__name__)

CONSOLE = "/console/"
PAGE_SIZE = 50
MAX_FORM = 16 * 1024
STYLESHEET = files(__package__).joinpath("static", "console.css").read_bytes()
# No script runs on a console page, and nothing is loaded from elsewhere.
SECURITY_HEADERS = [
    (
        b"content-security-policy",
        b"default-src 'none'; style-src 'self'; img-src 'self'; form-action 'self'; "
        b"frame-ancestors 'none'; base-uri 'none'",
    ),
    (b"x-content-type-options", b"nosniff"),
    (b"referrer-policy", b"same-origin"),
    (b"cache-control", b"no-store"),
]

Scope = MutableMapping[str, Any]
Page = tuple[int, bytes, str, list[tuple[bytes, bytes]]]  # status, body, content type, headers


class ConsoleOps(Protocol):
    """What the console asks of the daemon (a part of the admin API's `Operations`)."""

    @property
    def engine(self) -> AsyncEngine: ...

    @property
    def gateway(self) -> Gateway: ...  # replays are sent through it

    def health(self) -> dict[str, Any]: ...

    def provider_names(self) -> list[str]: ...

    async def set_provider_enabled(self, name: str, enabled: bool) -> None: ...


class Console:
    def __init__(
        self,
        token: str | None,
        ops: ConsoleOps,
        request_json: Callable[[str], Awaitable[dict[str, Any]]],
    ) -> None:
        self.sessions = Sessions(token.encode()) if token else None
        self.ops = ops
        self.request_json = request_json  # the admin API's request detail, for "raw JSON"

    async def __call__(self, scope: Scope, receive: ASGIReceive, send: ASGISend) -> None:
        cookie: str | None = None
        try:
            if self.sessions is None:
                raise NotFound("the console is off: set admin_token to turn it on")
            given = _cookie(scope)
            cookie = given if given is not None and await self._live(given) else None
            answer = await self._route(scope, receive, cookie)
        except ClientGone:
            return  # nobody to answer
        except Exception as exc:
            answer = self._error(scope, exc, cookie)
        status, body, kind, headers = answer
        await send(
            {
                "type": "http.response.start",
                "status": status,
                "headers": [
                    (b"content-type", kind.encode()),
                    (b"content-length", str(len(body)).encode()),
                    *SECURITY_HEADERS,
                    request_id_header(scope),
                    *headers,
                ],
            }
        )
        await send({"type": "http.response.body", "body": body})

    async def _route(self, scope: Scope, receive: ASGIReceive, cookie: str | None) -> Page:
        assert self.sessions is not None
        path, method = scope["path"].removeprefix(CONSOLE.rstrip("/")), scope["method"]
        if path == "/static/console.css":
            _only(method, "GET")
            return 200, STYLESHEET, "text/css; charset=utf-8", []
        if path == "/login":
            if method == "POST":
                return await self._login(scope, receive)
            _only(method, "GET")
            return _redirect("requests") if cookie else _html(200, pages.login())
        if cookie is None:
            if method != "GET":
                raise Unauthorized("log in first: the console's actions need a session")
            return _redirect("login")
        csrf = self.sessions.csrf(cookie)
        if method == "POST":
            form = await self._form(scope, receive, cookie)
            if path == "/logout":
                return await self._logout(scope, cookie)
            if found := re.fullmatch(r"/requests/([^/]+)/replay", path):
                return await self._replay(scope, found[1], form)
            if found := re.fullmatch(r"/providers/([^/]+)/(enable|disable)", path):
                await self._switch(found[1], found[2] == "enable")
                return _redirect("health")
            raise NotFound(f"no console action {path}")
        _only(method, "GET")
        if path in ("", "/"):
            return _redirect("requests")
        if path == "/requests":
            return await self._requests(scope, csrf)
        if found := re.fullmatch(r"/requests/([^/]+)\.json", path):
            body = orjson.dumps(await self.request_json(found[1]), option=orjson.OPT_INDENT_2)
            return 200, body, "application/json", []
        if found := re.fullmatch(r"/requests/([^/]+)", path):
            return await self._request(found[1], csrf)
        if path == "/usage":
            return await self._usage(scope, csrf)
        if path == "/health":
            return _html(200, pages.health(self.ops.health(), csrf))
        raise NotFound(f"no console page {path}")

    async def _login(self, scope: Scope, receive: ASGIReceive) -> Page:
        assert self.sessions is not None
        if not same_origin(dict(scope["headers"])):
            raise Forbidden("the login form must be posted from this server's own page")
        form = await _read_form(scope, receive)
        if not self.sessions.token_matches(form.get("token", "")):
            log_rejection("POST", scope["path"], 401, "unauthorized", "wrong admin token",
                          request_id(scope))  # fmt: skip
            return _html(401, pages.login("That is not the admin token."))
        log.info("console: an operator logged in")
        cookie = self.sessions.open()
        return _redirect("requests", [_set_cookie(scope, cookie, LIFETIME_SECONDS)])

    async def _live(self, cookie: str) -> bool:
        """Signed, not expired, and not logged out (in any worker: the store says)."""
        assert self.sessions is not None
        if not self.sessions.valid(cookie):
            return False
        nonce_hash, _ = self.sessions.ended_as(cookie)
        return not await console_session_ended(self.ops.engine, nonce_hash)

    async def _logout(self, scope: Scope, cookie: str) -> Page:
        """The session ends in the store, for every worker, then in the browser."""
        assert self.sessions is not None
        nonce_hash, expires_at = self.sessions.ended_as(cookie)
        await end_console_session(self.ops.engine, nonce_hash, expires_at, datetime.now(UTC))
        log.info("console: an operator logged out")
        return _redirect("login", [_set_cookie(scope, "", 0)])

    async def _form(self, scope: Scope, receive: ASGIReceive, cookie: str) -> dict[str, str]:
        """A POST's form, once it proved to come from this session's own page (Forbidden)."""
        assert self.sessions is not None
        if not same_origin(dict(scope["headers"])):
            raise Forbidden("console forms must be posted from this server's own pages (Origin)")
        form = await _read_form(scope, receive)
        if not self.sessions.csrf_matches(cookie, form.get("csrf", "")):
            raise Forbidden("the form's CSRF token is missing or not this session's: reload it")
        return form

    async def _switch(self, name: str, enabled: bool) -> None:
        if name not in self.ops.provider_names():
            raise NotFound(f"no provider {name!r}")
        await self.ops.set_provider_enabled(name, enabled)
        log.info("console: provider %s", "enabled" if enabled else "disabled", provider=name)

    async def _requests(self, scope: Scope, csrf: str) -> Page:
        query = _query(scope)
        given = {name: query[name] for name in pages.FILTERS if query.get(name)}
        only = RequestFilter(
            key=given.get("key"),
            team=given.get("team"),
            user=given.get("user"),
            metadata=_pair(given.get("metadata")),
            since=_time(given, "since"),
            correlation_id=given.get("correlation_id"),
            until=_time(given, "until"),
            status=given.get("status"),
            model=given.get("model"),
            provider=given.get("provider"),
            text=given.get("text"),
        )
        listing = await recent_requests(self.ops.engine, PAGE_SIZE + 1, only, _cursor(query))
        rows, searched, older = listing.rows, listing.searched, None
        if len(rows) > PAGE_SIZE:  # a full page: the next starts after its last row
            rows, searched = rows[:PAGE_SIZE], None
            older = f"{utc(rows[-1]['created_at']).isoformat()}_{rows[-1]['id']}"
        elif searched is not None and searched.resume is not None:  # after the last one read
            older = f"{searched.resume[0].isoformat()}_{searched.resume[1]}"
        return _html(200, pages.requests(rows, given, older, searched, csrf))

    async def _replay(self, scope: Scope, given: str, form: dict[str, str]) -> Page:
        original = await self._detail(given)
        target = form.get("target", "")
        new = await replay(self.ops.gateway, scope, original, target, form.get("api_key", ""))
        log.info("console: a request replayed", original=original.request["id"], replay=new,
                 target=target.strip())  # fmt: skip
        return _redirect(f"requests/{new}")

    async def _usage(self, scope: Scope, csrf: str) -> Page:
        query = _query(scope)
        by = query.get("by") or "model"
        if by not in SPEND_BY:
            raise ClientError(f"by must be one of {', '.join(SPEND_BY)}", param="by")
        since = query.get("since", "7d")
        per = query.get("per", "day" if "by" not in query else "") or None
        if per not in (None, *BUCKETS):
            raise ClientError(f"per must be empty or one of {', '.join(BUCKETS)}", param="per")
        start = _time({"since": since} if since else {}, "since")  # empty: since the start
        rows = await spend(self.ops.engine, by, start, per)
        return _html(200, pages.usage(rows, by, since, per, csrf))

    async def _request(self, given: str, csrf: str) -> Page:
        detail = await self._detail(given)
        times = await token_times(self.ops.engine, [a["id"] for a in detail.attempts])
        original = None
        if replay_of := (detail.request["metadata"] or {}).get("replay_of"):
            found = await find_requests(self.ops.engine, replay_of)
            original = await request_detail(self.ops.engine, found[0]) if found else None
        routes, targets = choices(self.ops.gateway.router)
        return _html(200, pages.request(detail, times, original, routes, targets, csrf))

    async def _detail(self, given: str) -> RequestDetail:
        """A request by its id or the one correlation id it was sent with (else NotFound)."""
        found = await find_requests(self.ops.engine, given)
        detail = await request_detail(self.ops.engine, found[0]) if len(found) == 1 else None
        if detail is None:
            raise NotFound(f"no request with the id or correlation id {given!r} in the store")
        return detail

    def _error(self, scope: Scope, exc: Exception, cookie: str | None) -> Page:
        status, error = describe(exc)
        if status >= 500:
            log.exception("console: %s %s failed", scope.get("method"), scope.get("path"))
        log_rejection(scope.get("method", ""), scope.get("path", ""), status, error["code"],
                      error["message"], request_id(scope))  # fmt: skip
        csrf = self.sessions.csrf(cookie) if self.sessions and cookie else None
        headers = [(b"allow", exc.allow.encode())] if isinstance(exc, MethodNotAllowed) else []
        body = pages.error(status, error["message"], csrf).encode()
        return status, body, "text/html; charset=utf-8", headers


def _html(status: int, text: str) -> Page:
    return status, text.encode(), "text/html; charset=utf-8", []


def _redirect(page: str, headers: list[tuple[bytes, bytes]] | None = None) -> Page:
    """303: after a POST the browser GETs the page (a reload does not post again)."""
    return 303, b"", "text/plain", [(b"location", (CONSOLE + page).encode()), *(headers or [])]


def _only(method: str, allowed: str) -> None:
    if method != allowed:
        raise MethodNotAllowed(f"this console path takes {allowed}", allow=allowed)


def _cookie(scope: Scope) -> str | None:
    header: str = dict(scope["headers"]).get(b"cookie", b"").decode("latin-1")
    for part in header.split(";"):
        name, _, value = part.strip().partition("=")
        if name == COOKIE:
            return value
    return None


def _set_cookie(scope: Scope, value: str, max_age: int) -> tuple[bytes, bytes]:
    """HttpOnly (no script reads it), SameSite=Strict (no other site sends it), only for the
    console's paths; Secure when the console is reached over TLS."""
    secure = "; Secure" if scope.get("scheme") == "https" else ""
    attributes = f"Max-Age={max_age}; Path={CONSOLE}; HttpOnly; SameSite=Strict{secure}"
    return b"set-cookie", f"{COOKIE}={value}; {attributes}".encode()


async def _read_form(scope: Scope, receive: ASGIReceive) -> dict[str, str]:
    raw = await read_body(receive, dict(scope["headers"]), MAX_FORM)
    try:
        parsed = parse_qs(raw.decode(), errors="strict")
    except UnicodeDecodeError:
        raise ClientError("the form is not UTF-8") from None
    return {name: values[0] for name, values in parsed.items()}


def _query(scope: Scope) -> dict[str, str]:
    try:
        parsed = parse_qs(scope.get("query_string", b"").decode(), errors="strict")
    except UnicodeDecodeError:
        raise ClientError("the query string is not UTF-8") from None
    return {name: values[0].strip() for name, values in parsed.items()}


def _time(given: dict[str, str], name: str) -> datetime | None:
    try:
        return parse_since(given[name]) if name in given else None
    except ValueError as exc:
        raise ClientError(f"{name}: {exc}", param=name) from None


def _pair(text: str | None) -> tuple[tuple[str, str], ...]:
    """`metadata=key:value`: one pair the request's metadata must hold."""
    if text is None:
        return ()
    name, sep, value = text.partition(":")
    if not sep or not name:
        raise ClientError(f"metadata={text!r}: give it as key:value", param="metadata")
    return ((name, value),)


def _cursor(query: dict[str, str]) -> tuple[datetime, uuid.UUID] | None:
    """`before`: the (created_at, id) of the last row of the page before, as the link gives it."""
    if not (text := query.get("before")):
        return None
    at, _, given_id = text.rpartition("_")
    try:
        return utc(datetime.fromisoformat(at)), uuid.UUID(given_id)
    except ValueError:
        raise ClientError(
            "before: not a page's cursor; follow the page's link", param="before"
        ) from None

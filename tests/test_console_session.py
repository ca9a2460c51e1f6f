"""The console's session cookie, CSRF token, Origin check and logout, without a browser.

Logout is driven through the console's ASGI app in-process, on a real SQLite and a
real PostgreSQL store: the store, not a worker's memory, is what ends a session.
"""

from __future__ import annotations

from datetime import timedelta
from typing import Any
from urllib.parse import urlencode

import pytest
from sqlalchemy.ext.asyncio import AsyncEngine

from llmsvc.admin.console.app import Console
from llmsvc.admin.console.session import COOKIE, LIFETIME_SECONDS, Sessions, same_origin
from llmsvc.gateway.app import Gateway
from llmsvc.store.console_logouts import console_session_ended, end_console_session

TOKEN = b"admin-token-0123456789"
NOW = 1_800_000_000.0


def test_a_session_is_valid_until_it_expires_and_never_holds_the_token() -> None:
    sessions = Sessions(TOKEN)
    cookie = sessions.open(NOW)
    assert TOKEN.decode() not in cookie
    assert sessions.valid(cookie, NOW + LIFETIME_SECONDS - 1)
    assert not sessions.valid(cookie, NOW + LIFETIME_SECONDS)
    assert sessions.open(NOW) != cookie  # a random nonce each time


@pytest.mark.parametrize(
    "change",
    ["expiry", "nonce", "signature", "empty", "another-token"],
    ids=["expiry", "nonce", "signature", "empty", "another-token"],
)
def test_a_changed_or_foreign_cookie_is_refused(change: str) -> None:
    sessions = Sessions(TOKEN)
    cookie = sessions.open(NOW)
    expiry, nonce, signature = cookie.split(".")
    changed = {
        "expiry": f"{int(expiry) + 3600}.{nonce}.{signature}",
        "nonce": f"{expiry}.{nonce[:-1]}{'B' if nonce.endswith('A') else 'A'}.{signature}",
        "signature": f"{expiry}.{nonce}.{'0' * len(signature)}",
        "empty": "",
        "another-token": Sessions(TOKEN + b"x").open(NOW),
    }[change]
    assert not sessions.valid(changed, NOW)


def test_the_csrf_token_is_the_sessions_own() -> None:
    sessions = Sessions(TOKEN)
    first, second = sessions.open(NOW), sessions.open(NOW)
    assert sessions.csrf_matches(first, sessions.csrf(first))
    assert not sessions.csrf_matches(first, sessions.csrf(second))
    assert not sessions.csrf_matches(first, "")
    assert sessions.csrf(first) != first


@pytest.mark.parametrize(
    ("headers", "same"),
    [
        ({b"host": b"gw:8080", b"origin": b"http://gw:8080"}, True),
        ({b"host": b"gw:8080", b"origin": b"https://gw:8080"}, True),  # behind a TLS proxy
        ({b"host": b"gw:8080", b"referer": b"http://gw:8080/console/health"}, True),
        ({b"host": b"gw:8080", b"origin": b"http://gw:8081"}, False),
        ({b"host": b"gw:8080", b"origin": b"http://evil.example"}, False),
        ({b"host": b"gw:8080", b"origin": b"null"}, False),
        ({b"host": b"gw:8080"}, False),
        ({b"origin": b"http://gw:8080"}, False),
    ],
    ids=["origin", "tls-origin", "referer", "other-port", "other-host", "null", "none", "no-host"],
)
def test_a_post_must_come_from_the_servers_own_origin(
    headers: dict[bytes, bytes], same: bool
) -> None:
    assert same_origin(headers) is same


class _StoreOnly:
    """The daemon's part the console asks for, with a store and one provider switch."""

    def __init__(self, engine: AsyncEngine) -> None:
        self.engine = engine
        self.switched: list[tuple[str, bool]] = []

    @property
    def gateway(self) -> Gateway:
        raise AssertionError("no replay here")

    def health(self) -> dict[str, Any]:
        raise AssertionError("no health page here")

    def provider_names(self) -> list[str]:
        return ["up"]

    async def set_provider_enabled(self, name: str, enabled: bool) -> None:
        self.switched.append((name, enabled))


async def _ask(
    console: Console, method: str, path: str, cookie: str, form: dict[str, str] | None = None
) -> tuple[int, dict[bytes, bytes]]:
    """The console's status and headers for one request from its own page, with `cookie`."""
    scope = {
        "type": "http",
        "method": method,
        "path": path,
        "query_string": b"",
        "headers": [
            (b"host", b"gw:8080"),
            (b"origin", b"http://gw:8080"),
            (b"cookie", f"{COOKIE}={cookie}".encode()),
        ],
    }
    body = urlencode(form or {}).encode()
    sent: list[Any] = []

    async def receive() -> dict[str, Any]:
        return {"type": "http.request", "body": body, "more_body": False}

    async def send(message: Any) -> None:
        sent.append(message)

    await console(scope, receive, send)
    return sent[0]["status"], dict(sent[0]["headers"])


async def test_a_cookie_copied_before_logout_is_refused_after_it_by_every_worker(
    engine: AsyncEngine,
) -> None:
    # Two workers: consoles alike but for their memory; the store is all they share.
    ops = _StoreOnly(engine)
    one, other = Console(TOKEN.decode(), ops, _no_json), Console(TOKEN.decode(), ops, _no_json)
    assert one.sessions is not None
    copied, fresh = one.sessions.open(), one.sessions.open()
    for cookie in (copied, fresh):
        assert (await _ask(other, "GET", "/console/requests", cookie))[0] == 200

    form = {"csrf": one.sessions.csrf(copied)}
    status, headers = await _ask(one, "POST", "/console/logout", copied, form)
    assert status == 303
    assert headers[b"set-cookie"].startswith(f"{COOKIE}=; Max-Age=0;".encode())

    for console in (one, other):
        status, headers = await _ask(console, "GET", "/console/requests", copied)
        assert (status, headers[b"location"]) == (303, b"/console/login")
        assert (await _ask(console, "GET", "/console/login", copied))[0] == 200  # the form
        status, _ = await _ask(console, "POST", "/console/providers/up/disable", copied, form)
        assert status == 401
        assert (await _ask(console, "POST", "/console/logout", copied, form))[0] == 401
    assert ops.switched == []

    assert (await _ask(other, "GET", "/console/requests", fresh))[0] == 200
    form = {"csrf": one.sessions.csrf(fresh)}
    status, headers = await _ask(other, "POST", "/console/providers/up/disable", fresh, form)
    assert (status, headers[b"location"]) == (303, b"/console/health")
    assert ops.switched == [("up", False)]

    # Its row goes at a logout after the cookie expired (its signature is refused by then).
    nonce_hash, expires_at = Sessions.ended_as(copied)
    assert await console_session_ended(engine, nonce_hash)
    await end_console_session(engine, "0" * 64, expires_at + timedelta(hours=8), expires_at)
    assert not await console_session_ended(engine, nonce_hash)


async def _no_json(request_id: str) -> dict[str, Any]:
    raise AssertionError("no raw JSON here")

"""The console's session cookie, CSRF token and Origin check, without a browser."""

from __future__ import annotations

import pytest

from llmsvc.admin.console.session import LIFETIME_SECONDS, Sessions, same_origin

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
        "nonce": f"{expiry}.{nonce[:-1]}A.{signature}",
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

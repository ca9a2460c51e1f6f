"""The console's login session: a signed cookie, its CSRF token, and the Origin check.

The cookie holds an expiry and a random nonce signed with a key derived from the
admin token, never the token itself: every worker sharing the port checks it
alike, and changing the admin token ends every session. Logging out ends one
session in every worker through a row in the store (`ended_as`). The CSRF token
is a second signature of the same cookie value, so a form carries proof of the
session without the session's value being readable by a page's script.
"""

from __future__ import annotations

import hashlib
import hmac
import secrets
import time
from datetime import UTC, datetime
from urllib.parse import urlsplit

COOKIE = "llmsvc_console"
LIFETIME_SECONDS = 8 * 3600  # a working day; then the operator logs in again


class Sessions:
    def __init__(self, admin_token: bytes) -> None:
        self._key = hashlib.sha256(b"llmsvc console session\0" + admin_token).digest()
        self._token = admin_token

    def token_matches(self, given: str) -> bool:
        """A constant-time comparison with the admin token."""
        return hmac.compare_digest(given.encode(), self._token)

    def open(self, now: float | None = None) -> str:
        """A new session's cookie value: `expiry.nonce.signature`."""
        expiry = int((now or time.time()) + LIFETIME_SECONDS)
        value = f"{expiry}.{secrets.token_urlsafe(18)}"
        return f"{value}.{self._sign('session', value)}"

    def valid(self, cookie: str | None, now: float | None = None) -> bool:
        """Signed by this key and not expired."""
        if not cookie:
            return False
        value, _, signature = cookie.rpartition(".")
        expiry, _, _nonce = value.partition(".")
        if not expiry.isdigit() or not hmac.compare_digest(signature, self._sign("session", value)):
            return False
        return int(expiry) > (now or time.time())

    def csrf(self, cookie: str) -> str:
        """The session's CSRF token, for its forms."""
        return self._sign("csrf", cookie)

    def csrf_matches(self, cookie: str, given: str) -> bool:
        return hmac.compare_digest(given, self.csrf(cookie))

    @staticmethod
    def ended_as(cookie: str) -> tuple[str, datetime]:
        """A valid cookie's row once logged out: the SHA-256 of its nonce (the store never
        holds a cookie) and its expiry, after which the signature check refuses it anyway."""
        expiry, nonce, _signature = cookie.split(".")
        return hashlib.sha256(nonce.encode()).hexdigest(), datetime.fromtimestamp(int(expiry), UTC)

    def _sign(self, purpose: str, value: str) -> str:
        return hmac.new(self._key, f"{purpose}\0{value}".encode(), hashlib.sha256).hexdigest()


def same_origin(headers: dict[bytes, bytes]) -> bool:
    """A POST comes from a page of this server: its Origin (else its Referer) names the host
    it was sent to. A POST with neither is refused: browsers send Origin on every form POST."""
    host = headers.get(b"host", b"").decode("latin-1")
    sent = headers.get(b"origin") or headers.get(b"referer")
    if not host or not sent:
        return False
    return urlsplit(sent.decode("latin-1")).netloc == host

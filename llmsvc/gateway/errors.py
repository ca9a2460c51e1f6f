"""The one place that turns an exception into an HTTP status and error JSON.

Before the first response byte an error is a status and a JSON body; after it,
an SSE error event (the status line is already gone). The body is OpenAI's
`{"error": {...}}`, except under `/v1/messages`, whose clients (the anthropic
SDK, Claude Code) read Anthropic's `{"type": "error", "error": {"type", "message"}}`;
the status is the same in both.
"""

from __future__ import annotations

import http
import uuid
from collections.abc import MutableMapping
from typing import Any

import orjson
import sqlalchemy as sa

from llmsvc.errors import (
    ClientError,
    MethodNotAllowed,
    ProviderError,
    RateLimited,
    ServiceUnavailable,
    WalError,
)
from llmsvc.gateway.rejections import log_rejection
from llmsvc.gateway.request import CALLER, request_id, request_id_header
from llmsvc.gateway.sse import ASGISend
from llmsvc.logs import logger
from llmsvc.store.engine import describe_error

log = logger(__name__)


def describe(exc: BaseException) -> tuple[int, dict[str, Any]]:
    """(HTTP status, OpenAI `error` object) for an exception."""
    if isinstance(exc, RateLimited):
        return exc.status, _error(str(exc), exc.kind, exc.code)
    if isinstance(exc, ClientError):
        return exc.status, _error(str(exc), "invalid_request_error", exc.code, exc.param)
    if isinstance(exc, ProviderError):
        status = exc.status if exc.status in (400, 422, 429) else 502
        return status, _error(str(exc), "upstream_error", exc.code)
    if isinstance(exc, ServiceUnavailable | WalError):
        return 503, _error(str(exc), "service_unavailable", "unavailable")
    if isinstance(exc, sa.exc.DBAPIError | ConnectionError | TimeoutError):  # a query failed
        return 503, _error(
            f"the database cannot answer now ({describe_error(exc)}); the daemon's health says why",
            "service_unavailable",
            "database_unavailable",
        )
    return 500, _error(
        "internal error; the daemon's log has the details", "server_error", "internal"
    )


MESSAGES_PATH = "/v1/messages"  # Anthropic's API: its paths' errors are in Anthropic's shape
# Anthropic's error type for each status llmsvc answers with; any other 4xx is the request's
# fault, any other 5xx the service's.
ANTHROPIC_TYPES = {
    401: "authentication_error",
    403: "permission_error",
    404: "not_found_error",
    413: "request_too_large",
    429: "rate_limit_error",
    503: "overloaded_error",
    529: "overloaded_error",
}
# Every error type Anthropic's API names: an upstream's own, in a stream, is passed on.
ANTHROPIC_ERROR_TYPES = frozenset(
    {"invalid_request_error", "api_error", "timeout_error", *ANTHROPIC_TYPES.values()}
)
# A failure after a stream began has no status: its OpenAI error type says which it was.
ANTHROPIC_STREAM_TYPES = {
    "invalid_request_error": "invalid_request_error",
    "service_unavailable": "overloaded_error",
}


def api_of(path: str) -> str:
    """Which API's error shape a path's answers use: `messages` or `chat` (OpenAI's)."""
    return "messages" if path.startswith(MESSAGES_PATH) else "chat"


def error_body(api: str, status: int, error: dict[str, Any]) -> dict[str, Any]:
    """The JSON body of an error answer, in the shape of the request's API."""
    if api != "messages":
        return {"error": error}
    return anthropic_error(error, status)


def anthropic_error(error: dict[str, Any], status: int | None = None) -> dict[str, Any]:
    """An OpenAI error object in Anthropic's shape, its type the status's. A failure after a
    stream began has no status: its type is an Anthropic upstream's own error event's, else
    what the OpenAI type means. (A whole answer's status is llmsvc's, e.g. 502 for an
    upstream's 401, so an upstream's type is not passed on there.)"""
    if status is not None:
        default = "invalid_request_error" if status < 500 else "api_error"
        kind = ANTHROPIC_TYPES.get(status, default)
    elif error["code"] in ANTHROPIC_ERROR_TYPES:
        kind = error["code"]
    else:
        kind = ANTHROPIC_STREAM_TYPES.get(error["type"], "api_error")
    return {"type": "error", "error": {"type": kind, "message": error["message"]}}


def _error(message: str, kind: str, code: str, param: str | None = None) -> dict[str, Any]:
    return {"message": message, "type": kind, "param": param, "code": code}


async def reject(scope: MutableMapping[str, Any], send: ASGISend, exc: BaseException) -> None:
    """Answer a request refused before anything of it was served, with its X-Request-ID, and
    log it (a served request logs its own line)."""
    status, error = describe(exc)
    log_rejection(
        scope.get("method", ""),
        scope.get("path", ""),
        status,
        error["code"],
        error["message"],
        request_id(scope),
        scope.get(CALLER),
    )
    await send_error(send, exc, [request_id_header(scope)], api_of(scope.get("path", "")))


async def send_error(
    send: ASGISend,
    exc: BaseException,
    headers: list[tuple[bytes, bytes]] | None = None,
    api: str = "chat",
) -> None:
    """The error as a whole response in the shape of `api` (`api_of`); `headers` carry the
    request's X-Request-ID."""
    status, error = describe(exc)
    if status == 503 and isinstance(exc, sa.exc.DBAPIError | ConnectionError | TimeoutError):
        log.warning("database unavailable to a request", error=describe_error(exc))
    elif status >= 500 and not isinstance(exc, ServiceUnavailable | WalError | ProviderError):
        log.error("unhandled error", exc_info=exc)
    if isinstance(exc, MethodNotAllowed):
        headers = [*(headers or []), (b"allow", exc.allow.encode())]
    if isinstance(exc, RateLimited):
        headers = [*(headers or []), *exc.headers]
    await send_json(send, status, error_body(api, status, error), headers)


async def send_json(
    send: ASGISend,
    status: int,
    body: dict[str, Any],
    headers: list[tuple[bytes, bytes]] | None = None,
) -> None:
    """A whole JSON response: errors, and the few small JSON answers besides them."""
    data = orjson.dumps(body)
    await send(
        {
            "type": "http.response.start",
            "status": status,
            "headers": [
                (b"content-type", b"application/json"),
                (b"content-length", str(len(data)).encode()),
                *(headers or []),
            ],
        }
    )
    await send({"type": "http.response.body", "body": data})


def closing_response(exc: BaseException, request: uuid.UUID, api: str = "chat") -> bytes:
    """A whole HTTP/1.1 error response that closes the connection, as raw bytes, in the shape
    of `api` (`api_of`).

    For the HTTP protocol (gateway/http_protocol.py), which refuses a
    connection or a request before any ASGI call exists to send through.
    """
    status, error = describe(exc)
    body = orjson.dumps(error_body(api, status, error))
    head = (
        f"HTTP/1.1 {status} {http.HTTPStatus(status).phrase}\r\n"
        "content-type: application/json\r\n"
        f"content-length: {len(body)}\r\n"
        f"x-request-id: {request}\r\n"
        "connection: close\r\n\r\n"
    )
    return head.encode() + body

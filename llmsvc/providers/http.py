"""What the HTTP adapters share: one pooled session, the POST, and a reply's error handling.

An adapter subclasses `HttpProvider` (its URLs, headers, body translation and
error shape) and `HttpReply` (how a stream's events and a whole body become
token batches); transport failures become `ProviderUnavailable` here, once.

A provider's `timeout_seconds` bounds every silence: the wait for the response
and each gap in a stream. In a stream it is one timer per silence that moves
itself on, not aiohttp's `sock_read`, which re-arms a timer at every read (at
one token a read, ~7 us of a token's CPU).
"""

from __future__ import annotations

import asyncio
import email.utils
from collections.abc import AsyncIterator, Callable, Mapping
from contextvars import ContextVar
from datetime import UTC, datetime
from typing import Any

import aiohttp
import orjson

from llmsvc.config import ProviderConfig
from llmsvc.errors import ProviderError, ProviderUnavailable
from llmsvc.providers.base import Batch
from llmsvc.providers.fields import UPSTREAM_MAX_BYTES, TooLarge

# The W3C `traceparent` of the attempt under way, set by the gateway while tracing is on
# (gateway/tracing.py): sent upstream so the provider's spans join the request's trace.
# A context variable, so each adapter's `open` keeps one signature and the header is added
# here, where every upstream POST is made.
TRACEPARENT: ContextVar[str | None] = ContextVar("llmsvc_upstream_traceparent", default=None)

ErrorOf = Callable[[str, int | None, Any, Mapping[str, str] | None], ProviderError]


class HttpReply:
    """A call under way: `batches` reads the stream (or the whole body) and always releases."""

    def __init__(
        self, name: str, response: aiohttp.ClientResponse, stream: bool, idle_timeout: float
    ) -> None:
        self.name = name
        self.response = response
        self.stream = stream
        self.idle_timeout = idle_timeout
        self._loop = asyncio.get_running_loop()
        self._waiting_since: float | None = None  # loop time the current read began
        self._idle: asyncio.TimerHandle | None = None
        self.http_status: int | None = response.status
        self.finish_reason: str | None = None
        self.prompt_tokens: int | None = None
        self.completion_tokens: int | None = None
        self.tool_calls: list[dict[str, Any]] = []
        self.refusal: str | None = None

    async def batches(self) -> AsyncIterator[Batch]:
        try:
            if self.stream:
                self._idle = self._loop.call_later(self.idle_timeout, self._silent)
                async for batch in self._events():
                    yield batch
            else:
                async with asyncio.timeout(self.idle_timeout):
                    body = await self._body()
                reply = orjson.loads(body)
                if not isinstance(reply, dict):
                    raise ProviderError(
                        f"{self.name}: the upstream's reply is not a JSON object",
                        code="upstream_malformed",
                    )
                content = self._whole(reply)
                if content:
                    yield [content]
        except (aiohttp.ClientError, TimeoutError) as exc:
            raise ProviderUnavailable(
                f"{self.name}: the upstream stream broke: {exc or type(exc).__name__}",
                code="upstream_stream_broken",
            ) from exc
        except orjson.JSONDecodeError as exc:
            raise ProviderError(
                f"{self.name}: the upstream sent malformed JSON", code="upstream_malformed"
            ) from exc
        except TooLarge as exc:
            raise ProviderError(
                f"{self.name}: the upstream's reply is too large: {exc}", code="upstream_too_large"
            ) from None
        finally:
            if self._idle is not None:
                self._idle.cancel()
            self.response.release()

    async def _body(self) -> bytes:
        """A whole reply's body, refused past UPSTREAM_MAX_BYTES (its text is one record)."""
        body = bytearray()
        async for part in self.response.content.iter_any():
            body += part
            if len(body) > UPSTREAM_MAX_BYTES:
                raise TooLarge(f"the body is over {UPSTREAM_MAX_BYTES} bytes")
        return bytes(body)

    async def _read(self) -> bytes:
        """What the stream has next (b"" at its end); only this wait counts as silence, not
        the time a slow client takes to accept what came before."""
        self._waiting_since = self._loop.time()
        chunk = await self.response.content.readany()
        self._waiting_since = None
        return chunk

    def _silent(self) -> None:
        """The silence timer: end a read that has waited `idle_timeout`, else move on to the
        current read's deadline."""
        now = self._loop.time()
        since = now if self._waiting_since is None else self._waiting_since
        if now - since >= self.idle_timeout:
            silence = TimeoutError(f"no data for {self.idle_timeout:g} s (timeout_seconds)")
            self.response.content.set_exception(silence)
        else:
            self._idle = self._loop.call_at(since + self.idle_timeout, self._silent)

    def _events(self) -> AsyncIterator[Batch]:
        raise NotImplementedError

    def _whole(self, body: dict[str, Any]) -> str:
        """Read a whole reply's usage, finish reason and tool calls; return its text."""
        raise NotImplementedError

    async def aclose(self) -> None:
        self.response.close()


class HttpProvider:
    def __init__(self, config: ProviderConfig, error_of: ErrorOf) -> None:
        self.name = config.name
        self.error_of = error_of
        self.idle_timeout = config.timeout_seconds
        self.timeout = aiohttp.ClientTimeout(
            total=None, sock_connect=config.connect_timeout_seconds, sock_read=None
        )
        self._session: aiohttp.ClientSession | None = None

    def _client(self) -> aiohttp.ClientSession:
        """One pooled session, created on the running loop the first time it is needed."""
        if self._session is None:
            connector = aiohttp.TCPConnector(limit=0, keepalive_timeout=30)
            self._session = aiohttp.ClientSession(
                connector=connector, timeout=self.timeout, auto_decompress=True
            )
        return self._session

    async def post(
        self, url: str, payload: dict[str, Any], headers: dict[str, str]
    ) -> aiohttp.ClientResponse:
        """POST the body to `url` (one adapter may serve more than one API); a 200 response
        to read, else the upstream's error as ProviderError."""
        try:
            data = orjson.dumps(payload)
        except orjson.JSONEncodeError as exc:  # e.g. tool-call arguments parsed too deep
            raise ProviderError(
                f"{self.name}: the request cannot be encoded for the upstream: {exc}",
                status=400,
                code="invalid_request",
            ) from None
        traceparent = TRACEPARENT.get()
        if traceparent is not None:
            headers = {**headers, "traceparent": traceparent}
        try:
            async with asyncio.timeout(self.idle_timeout):  # waiting for the response is silence
                response = await self._client().post(url, data=data, headers=headers)
        except (aiohttp.ClientError, TimeoutError, OSError) as exc:
            raise ProviderUnavailable(
                f"{self.name}: cannot reach the upstream: {exc or type(exc).__name__}",
                code="upstream_unreachable",
            ) from exc
        if response.status != 200:
            try:
                async with asyncio.timeout(self.idle_timeout):
                    detail = orjson.loads(await response.read())
            except (TimeoutError, orjson.JSONDecodeError, aiohttp.ClientError):
                detail = {}
            finally:
                response.release()
            raise self.error_of(self.name, response.status, detail, response.headers)
        return response

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()


def retry_after(value: str | None) -> float | None:
    """Retry-After in seconds: a number of seconds or an HTTP date; None if absent or bad."""
    if not value:
        return None
    if value.strip().isdigit():
        return float(value)
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    if when.tzinfo is None:
        when = when.replace(tzinfo=UTC)
    return max(0.0, (when - datetime.now(UTC)).total_seconds())

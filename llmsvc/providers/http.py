"""What the HTTP adapters share: one pooled session, the POST, and a reply's error handling.

An adapter subclasses `HttpProvider` (its URL, headers, body translation and
error shape) and `HttpReply` (how a stream's events and a whole body become
token batches); transport failures become `ProviderUnavailable` here, once.
"""

from __future__ import annotations

import email.utils
from collections.abc import AsyncIterator, Callable, Mapping
from datetime import UTC, datetime
from typing import Any

import aiohttp
import orjson

from llmsvc.config import ProviderConfig
from llmsvc.errors import ProviderError, ProviderUnavailable
from llmsvc.providers.base import Batch

ErrorOf = Callable[[str, int | None, Any, Mapping[str, str] | None], ProviderError]


class HttpReply:
    """A call under way: `batches` reads the stream (or the whole body) and always releases."""

    def __init__(self, name: str, response: aiohttp.ClientResponse, stream: bool) -> None:
        self.name = name
        self.response = response
        self.stream = stream
        self.http_status: int | None = response.status
        self.finish_reason: str | None = None
        self.prompt_tokens: int | None = None
        self.completion_tokens: int | None = None
        self.tool_calls: list[dict[str, Any]] = []

    async def batches(self) -> AsyncIterator[Batch]:
        try:
            if self.stream:
                async for batch in self._events():
                    yield batch
            else:
                content = self._whole(orjson.loads(await self.response.read()))
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
        finally:
            self.response.release()

    def _events(self) -> AsyncIterator[Batch]:
        raise NotImplementedError

    def _whole(self, body: dict[str, Any]) -> str:
        """Read a whole reply's usage, finish reason and tool calls; return its text."""
        raise NotImplementedError

    async def aclose(self) -> None:
        self.response.close()


class HttpProvider:
    def __init__(self, config: ProviderConfig, url: str, error_of: ErrorOf) -> None:
        self.name = config.name
        self.url = url
        self.error_of = error_of
        self.timeout = aiohttp.ClientTimeout(
            total=None,
            sock_connect=config.connect_timeout_seconds,
            sock_read=config.timeout_seconds,
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
        self, payload: dict[str, Any], headers: dict[str, str]
    ) -> aiohttp.ClientResponse:
        """POST the body; a 200 response to read, else the upstream's error as ProviderError."""
        try:
            response = await self._client().post(
                self.url, data=orjson.dumps(payload), headers=headers
            )
        except (aiohttp.ClientError, TimeoutError, OSError) as exc:
            raise ProviderUnavailable(
                f"{self.name}: cannot reach the upstream: {exc or type(exc).__name__}",
                code="upstream_unreachable",
            ) from exc
        if response.status != 200:
            try:
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

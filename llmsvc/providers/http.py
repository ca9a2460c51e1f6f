"""What the HTTP adapters share: one connection pool, the POST, and a reply's error handling.

An adapter subclasses `HttpProvider` (its URLs, headers, body translation and
error shape) and `HttpReply` (how a stream's events and a whole body become
token batches); transport failures become `ProviderUnavailable` here, once.

A provider's `timeout_seconds` bounds every silence: the wait for the response
and each gap in its body (upstream_http.py keeps one timer per response for it).
"""

from __future__ import annotations

import contextlib
import email.utils
from collections.abc import AsyncIterator, Callable, Iterator, Mapping
from contextvars import ContextVar
from datetime import UTC, datetime
from typing import Any

import orjson

from llmsvc.config import ProviderConfig
from llmsvc.errors import ProviderError, ProviderUnavailable
from llmsvc.providers.base import Batch
from llmsvc.providers.fields import UPSTREAM_MAX_BYTES, TooLarge
from llmsvc.providers.sse import SseSplitter
from llmsvc.providers.upstream_http import Response, UpstreamClient, UpstreamError

# The W3C `traceparent` of the attempt under way, set by the gateway while tracing is on
# (gateway/tracing.py): sent upstream so the provider's spans join the request's trace.
# A context variable, so each adapter's `open` keeps one signature and the header is added
# here, where every upstream POST is made.
TRACEPARENT: ContextVar[str | None] = ContextVar("llmsvc_upstream_traceparent", default=None)

# An error response's body is read for its message, up to this; a larger one is not parsed.
ERROR_BODY_MAX = 64 * 1024

ErrorOf = Callable[[str, int | None, Any, Mapping[str, str] | None], ProviderError]


READ_ERRORS = (UpstreamError, orjson.JSONDecodeError, TooLarge)


def read_error(name: str, exc: Exception) -> ProviderError:
    """A failure reading an upstream's reply (one of READ_ERRORS) as the provider error a
    client is told; raised `from` the failure, but for a size, which says it all."""
    if isinstance(exc, UpstreamError):
        return ProviderUnavailable(
            f"{name}: the upstream stream broke: {exc}", code="upstream_stream_broken"
        )
    if isinstance(exc, orjson.JSONDecodeError):
        return ProviderError(f"{name}: the upstream sent malformed JSON", code="upstream_malformed")
    return ProviderError(
        f"{name}: the upstream's reply is too large: {exc}", code="upstream_too_large"
    )


@contextlib.contextmanager
def reading(name: str) -> Iterator[None]:
    """Reading an upstream's reply: its failures as the provider errors a client is told."""
    try:
        yield
    except READ_ERRORS as exc:
        raise read_error(name, exc) from (None if isinstance(exc, TooLarge) else exc)


def nonempty(*batches: Batch | None) -> list[Batch]:
    """A read's batches that hold something, in order: what `HttpReply._parse` returns."""
    return [batch for batch in batches if batch]


class HttpReply:
    """A call under way: `batches` reads the stream (or the whole body) and always releases."""

    def __init__(self, name: str, response: Response, stream: bool) -> None:
        self.name = name
        self.response = response
        self.stream = stream
        self.http_status: int | None = response.status
        self.finish_reason: str | None = None
        self.stop_reason: str | None = None
        self.prompt_tokens: int | None = None
        self.completion_tokens: int | None = None
        self.tool_calls: list[dict[str, Any]] = []
        self.refusal: str | None = None
        self._splitter = SseSplitter()
        self._pending: list[Batch] = []  # parsed, not yet handed over
        self._done = False  # the end event came
        self._broken: Exception | None = None  # raised once the pending batches are out
        self._take: Callable[[Batch], bool] | None = None  # while pumping
        self._stopped: Callable[[], None] | None = None

    async def batches(self) -> AsyncIterator[Batch]:
        """The reply's batches: a stream's a read's worth each, and what a pump left (`pump`);
        a whole reply's text. One generator, `reading`'s translation of failures inlined:
        each frame of one would stay open as long as the stream. Between a stream's reads (a
        token's wait, on a paced stream) nothing of the last read stays referenced: its
        bytes and parsed events (~1.5 KiB) would otherwise stay for the whole wait, on every
        open stream."""
        try:
            if not self.stream:
                reply = orjson.loads(await self.response.body(UPSTREAM_MAX_BYTES))
                if not isinstance(reply, dict):
                    raise ProviderError(
                        f"{self.name}: the upstream's reply is not a JSON object",
                        code="upstream_malformed",
                    )
                content = self._whole(reply)
                if content:
                    yield [content]
                return
            while True:
                while self._pending:  # popped: none stays referenced through the next read
                    yield self._pending.pop(0)
                if self._broken is not None:  # what came before it went out (and is journaled)
                    raise self._broken
                if not (chunk := await self.response.read()):
                    break
                self._read(chunk)
                del chunk
            if not self._done:
                raise ProviderUnavailable(
                    f"{self.name}: the upstream ended the stream without {self.END_EVENT}",
                    code="upstream_stream_broken",
                )
        except READ_ERRORS as exc:
            raise read_error(self.name, exc) from (None if isinstance(exc, TooLarge) else exc)
        finally:
            self.response.release()

    END_EVENT = ""  # what the upstream sends last: a stream that ends without it was cut off

    def _read(self, chunk: bytes) -> None:
        """Parse one read into the pending batches; a failure event, or bytes that do not
        parse, end the stream once those are handed over. What the parse raises is kept and
        raised by `batches`, in the task: a pump parses in the connection's callback."""
        try:
            batches, failure, ended = self._parse(self._splitter.feed(chunk))
        except READ_ERRORS as exc:
            self._broken = read_error(self.name, exc)
            self._broken.__cause__ = exc
            return
        except Exception as exc:  # ProviderError (content that is not text, say), or a bug
            self._broken = exc
            return
        self._pending += batches
        self._done = self._done or ended
        if failure is not None:
            self._broken = self._failure(failure)

    def pump(self, take: Callable[[Batch], bool], stopped: Callable[[], None]) -> bool:
        """Hand each batch to `take` in the connection's callback as its read arrives, with no
        task switch; the first it refuses, a failure or the end stops the pump and calls
        `stopped`, and `batches` goes on from there. False if this reply cannot pump now (a
        whole reply, or something already arrived for `batches`)."""
        if not self.stream or self._pending or self._broken is not None:
            return False
        if not self.response.sink(self._pumped, self._stop):
            return False
        self._take, self._stopped = take, stopped
        return True

    def unpump(self) -> None:
        self._take = self._stopped = None
        self.response.unsink()

    def _pumped(self, chunk: bytes) -> None:
        self._read(chunk)
        pending = self._pending
        while pending and (take := self._take) is not None and take(pending[0]):
            pending.pop(0)
        if pending or self._broken is not None:
            self._stop()

    def _stop(self) -> None:
        stopped = self._stopped
        self.unpump()
        if stopped is not None:
            stopped()

    def _parse(self, events: list[bytes]) -> tuple[list[Batch], dict[str, Any] | None, bool]:
        """One read's events: its non-empty batches, the failure event that ends the stream
        if any (what follows it is not read), and whether the end event came."""
        raise NotImplementedError

    def _failure(self, event: dict[str, Any]) -> ProviderError:
        """A failure event as the upstream's error (no HTTP status: the reply had begun)."""
        raise NotImplementedError

    def _whole(self, body: dict[str, Any]) -> str:
        """Read a whole reply's usage, finish reason and tool calls; return its text."""
        raise NotImplementedError

    async def aclose(self) -> None:
        self.response.release()


class HttpProvider:
    def __init__(self, config: ProviderConfig, error_of: ErrorOf) -> None:
        self.name = config.name
        self.error_of = error_of
        self.client = UpstreamClient(
            config.connect_timeout_seconds,
            config.timeout_seconds,
            tls=config.base_url.startswith("https://"),
        )

    async def post(self, url: str, payload: dict[str, Any], headers: dict[str, str]) -> Response:
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
            response = await self.client.post(url, data, headers)
        except UpstreamError as exc:
            raise ProviderUnavailable(
                f"{self.name}: cannot reach the upstream: {exc}", code="upstream_unreachable"
            ) from exc
        if response.status != 200:
            try:
                detail = orjson.loads(await response.body(ERROR_BODY_MAX))
            except (UpstreamError, TooLarge, orjson.JSONDecodeError):
                detail = {}
            finally:
                response.release()
            raise self.error_of(self.name, response.status, detail, response.headers)
        response.drop_headers()  # only an error's are read (its Retry-After, its id)
        return response

    async def close(self) -> None:
        await self.client.close()


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

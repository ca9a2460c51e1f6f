"""OpenTelemetry spans of requests and their attempts, exported over OTLP/HTTP when
`otel_endpoint` is set (off, nothing here runs).

A request is one SERVER span named as the GenAI semantic conventions ask
(`{gen_ai.operation.name} {gen_ai.request.model}`), the child of the client's W3C
`traceparent` when it sent a valid one; each attempt is a CLIENT span under it,
whose context goes upstream as the provider call's `traceparent`
(`providers.http.TRACEPARENT`). A client's unsampled trace stays unsampled: its
context is passed on, its spans are not exported.

Spans are handed, ended, to the SDK's BatchSpanProcessor, whose own thread
encodes and exports them: its queue is bounded and drops spans when full, so a
dead or silent collector costs that thread time and loses spans, never a
request. The request's path builds each span once, whole, at its end
(`ReadableSpan`), rather than through the SDK's tracer: a live SDK span checks
and locks every attribute as it is set, ~90 us of CPU a span, against ~10 us.
Nothing here runs per token.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
import threading
import time
import uuid

from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import ReadableSpan
from opentelemetry.sdk.trace.export import BatchSpanProcessor
from opentelemetry.sdk.util.instrumentation import InstrumentationScope
from opentelemetry.trace import SpanContext, SpanKind, Status, StatusCode, TraceFlags, TraceState

from llmsvc import __version__
from llmsvc.config import Settings
from llmsvc.gateway.request import trace_id
from llmsvc.logs import logger
from llmsvc.providers.embeddings import EMBEDDINGS
from llmsvc.wal import AttemptEndFields

log = logger(__name__)

Attributes = dict[str, str | int | list[str]]

TRACES_PATH = "/v1/traces"  # OTLP/HTTP's path for traces under the collector's base URL
# The SDK logs a warning for every span a full queue drops: on the request's path, and
# once per span while a collector is away. Its exporter's failures (one per batch, in its
# own thread) still show.
QUIET_LOGGERS = ("opentelemetry.sdk._shared_internal", "opentelemetry.sdk.trace.export")
# gen_ai.provider.name (and the older gen_ai.system) of each provider kind.
PROVIDER_NAMES = {"openai": "openai", "anthropic": "anthropic", "mock": "llmsvc.mock"}
SAMPLED = TraceFlags(TraceFlags.SAMPLED)
UNSET = Status(StatusCode.UNSET)


def operation(api: str) -> str:
    """gen_ai.operation.name of an API: embeddings, else chat (Responses and Messages
    requests are chats too; `llmsvc.api` tells them apart)."""
    return "embeddings" if api == EMBEDDINGS else "chat"


def remote_parent(traceparent: bytes | None, tracestate: bytes | None) -> SpanContext | None:
    """The client's span, from a valid W3C `traceparent` (and its `tracestate`), else None."""
    if traceparent is None or trace_id(traceparent) is None:
        return None
    text = traceparent.decode("ascii")  # version-traceid-parentid-flags, validated
    state = None
    if tracestate is not None and tracestate.isascii():
        state = TraceState.from_header([tracestate.decode("ascii")])
    flags = TraceFlags(int(text[53:55], 16) & TraceFlags.SAMPLED)
    return SpanContext(int(text[3:35], 16), int(text[36:52], 16), True, flags, state)


class Tracing:
    """The daemon's exporter and the spans' resource; `request` starts a request's trace."""

    def __init__(self, settings: Settings, instance: uuid.UUID) -> None:
        s = settings
        assert s.otel_endpoint is not None  # built only when tracing is on
        attributes: dict[str, str] = {
            "service.name": s.otel_service_name,
            "service.version": s.deployment_version,
            "service.instance.id": str(instance),
        }
        if s.deployment_environment:
            attributes["deployment.environment.name"] = s.deployment_environment
        self.resource = Resource.create(attributes)
        self.scope = InstrumentationScope("llmsvc", __version__)
        exporter = OTLPSpanExporter(
            endpoint=s.otel_endpoint.rstrip("/") + TRACES_PATH,
            headers={k: v.get_secret_value() for k, v in s.otel_headers.items()},
            timeout=s.otel_export_timeout_seconds,
        )
        self.processor = BatchSpanProcessor(exporter, max_queue_size=s.otel_queue_spans)
        self.kinds = {p.name: PROVIDER_NAMES[p.kind] for p in s.providers}
        for name in QUIET_LOGGERS:
            logging.getLogger(name).setLevel(logging.ERROR)

    def request(
        self,
        api: str,
        model: str,
        request_id: uuid.UUID,
        correlation_id: str,
        traceparent: bytes | None,
        tracestate: bytes | None,
    ) -> RequestTrace:
        """A request's span, begun now: the child of the client's `traceparent` if valid."""
        parent = remote_parent(traceparent, tracestate)
        name = operation(api)
        attributes: Attributes = {
            "gen_ai.operation.name": name,
            "gen_ai.request.model": model,
            "llmsvc.api": api,
            "llmsvc.request_id": str(request_id),
            "llmsvc.correlation_id": correlation_id,
        }
        return RequestTrace(self, parent, f"{name} {model}", name, attributes)

    def export(
        self,
        name: str,
        kind: SpanKind,
        context: SpanContext,
        parent: SpanContext | None,
        attributes: Attributes,
        start: int,
        status: Status,
    ) -> None:
        """Queue an ended span for the exporter's thread (dropped if the queue is full, and
        if its trace is not sampled)."""
        span = ReadableSpan(
            name=name,
            context=context,
            parent=parent,
            resource=self.resource,
            attributes=attributes,
            kind=kind,
            status=status,
            start_time=start,
            end_time=time.time_ns(),
            instrumentation_scope=self.scope,
        )
        self.processor.on_end(span)

    async def close(self, within: float) -> None:
        """Export the spans queued, waiting at most `within` seconds: the SDK's own shutdown
        waits up to 30 s for a collector, so it runs in a daemon thread of its own, which the
        process's exit does not wait for."""
        loop = asyncio.get_running_loop()
        done: asyncio.Future[None] = loop.create_future()

        def settle() -> None:
            if not done.done():
                done.set_result(None)

        def shut_down() -> None:
            try:
                self.processor.shutdown()  # type: ignore[no-untyped-call]
            finally:
                with contextlib.suppress(RuntimeError):  # the loop has closed meanwhile
                    loop.call_soon_threadsafe(settle)

        threading.Thread(target=shut_down, name="otel-shutdown", daemon=True).start()
        try:
            await asyncio.wait_for(done, within)
        except TimeoutError:
            log.warning("shutdown: spans left unexported: the collector did not take them in time")


class RequestTrace:
    """One request's span and its open attempt's, until each ends."""

    __slots__ = (
        "attempt",
        "attributes",
        "context",
        "finish_reason",
        "name",
        "operation",
        "parent",
        "start",
        "tracing",
    )

    def __init__(
        self,
        tracing: Tracing,
        parent: SpanContext | None,
        name: str,
        operation: str,
        attributes: Attributes,
    ) -> None:
        self.tracing = tracing
        self.parent = parent
        trace = parent.trace_id if parent is not None else random.getrandbits(128)
        flags = parent.trace_flags if parent is not None else SAMPLED
        state = parent.trace_state if parent is not None else None
        self.context = SpanContext(trace, random.getrandbits(64), False, flags, state)
        self.name, self.operation, self.attributes = name, operation, attributes
        self.start = time.time_ns()
        # The open attempt: its context, start, attributes and upstream model.
        self.attempt: tuple[SpanContext, int, Attributes, str] | None = None
        self.finish_reason: str | None = None  # the last attempt's, for the request's span

    def attempt_started(self, number: int, attempt_id: uuid.UUID, provider: str, model: str) -> str:
        """Begin an attempt's span; its W3C `traceparent`, for the upstream."""
        system = self.tracing.kinds.get(provider, provider)
        own = self.context
        context = SpanContext(
            own.trace_id, random.getrandbits(64), False, own.trace_flags, own.trace_state
        )
        attributes: Attributes = {
            "gen_ai.operation.name": self.operation,
            "gen_ai.request.model": model,
            "gen_ai.provider.name": system,
            "gen_ai.system": system,
            "llmsvc.provider": provider,
            "llmsvc.attempt_id": str(attempt_id),
            "llmsvc.attempt_no": number,
        }
        self.attempt = (context, time.time_ns(), attributes, model)
        return f"00-{context.trace_id:032x}-{context.span_id:016x}-{context.trace_flags:02x}"

    def attempt_ended(self, fields: AttemptEndFields, finish_reason: str | None) -> None:
        """End the open attempt's span as journaled (a second end of the same attempt, a
        reply the client turned out not to receive, leaves it as first ended)."""
        attempt, self.attempt = self.attempt, None
        if attempt is None:
            return
        attributes = attempt[2]
        if fields["http_status"] is not None:
            attributes["http.response.status_code"] = fields["http_status"]
        if finish_reason is not None:
            self.finish_reason = finish_reason
            attributes["gen_ai.response.finish_reasons"] = [finish_reason]
        status, code = fields["status"], fields["error_code"]
        self._end_attempt(
            attempt, status, code, fields["prompt_tokens"], fields["completion_tokens"]
        )

    def _end_attempt(
        self,
        attempt: tuple[SpanContext, int, Attributes, str],
        status: str,
        error_code: str | None,
        prompt_tokens: int | None,
        completion_tokens: int | None,
    ) -> None:
        context, start, attributes, model = attempt
        attributes["gen_ai.response.model"] = model
        outcome = _outcome(attributes, status, error_code, prompt_tokens, completion_tokens)
        name = f"{self.operation} {model}"
        self.tracing.export(
            name, SpanKind.CLIENT, context, self.context, attributes, start, outcome
        )

    def ended(
        self,
        status: str,
        error_code: str | None,
        provider: str,
        model: str,
        prompt_tokens: int | None,
        completion_tokens: int | None,
    ) -> None:
        """End the request's span (and an attempt's left open by a fatal WAL error)."""
        if self.attempt is not None:
            self._end_attempt(self.attempt, status, error_code, None, None)
            self.attempt = None
        system = self.tracing.kinds.get(provider, provider)
        attributes = self.attributes
        attributes["gen_ai.provider.name"] = attributes["gen_ai.system"] = system
        attributes["gen_ai.response.model"] = model
        attributes["llmsvc.provider"] = provider
        if self.finish_reason is not None:
            attributes["gen_ai.response.finish_reasons"] = [self.finish_reason]
        outcome = _outcome(attributes, status, error_code, prompt_tokens, completion_tokens)
        self.tracing.export(
            self.name, SpanKind.SERVER, self.context, self.parent, attributes, self.start, outcome
        )


def _outcome(
    attributes: Attributes,
    status: str,
    error_code: str | None,
    prompt_tokens: int | None,
    completion_tokens: int | None,
) -> Status:
    """Add usage, status and `error.type` (one that did not complete) to a span's attributes;
    its span status."""
    attributes["llmsvc.status"] = status
    if prompt_tokens is not None:
        attributes["gen_ai.usage.input_tokens"] = prompt_tokens
    if completion_tokens is not None:
        attributes["gen_ai.usage.output_tokens"] = completion_tokens
    if status == "completed":
        return UNSET
    attributes["error.type"] = error_code or status
    return Status(StatusCode.ERROR, status)

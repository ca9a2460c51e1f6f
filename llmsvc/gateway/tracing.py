"""OpenTelemetry spans of requests and their attempts, exported over OTLP/HTTP when
`otel_endpoint` is set (off, nothing here runs).

A request is one SERVER span named as the GenAI semantic conventions ask
(`{gen_ai.operation.name} {gen_ai.request.model}`), the child of the client's W3C
`traceparent` when it sent a valid one; each attempt is a CLIENT span under it,
whose context goes upstream as the provider call's `traceparent`
(`providers.http.TRACEPARENT`). Spans are handed to a BatchSpanProcessor, whose
own thread exports them: its queue is bounded and drops spans when full, so a
dead or silent collector costs that thread time and loses spans, never a
request. Nothing here runs per token: a span starts and ends per request and
per attempt.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import threading
import uuid

from opentelemetry import trace
from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import BatchSpanProcessor
from opentelemetry.trace import Span, SpanKind, Status, StatusCode
from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

from llmsvc import __version__
from llmsvc.config import Settings
from llmsvc.gateway.request import trace_id
from llmsvc.logs import logger
from llmsvc.providers.embeddings import EMBEDDINGS
from llmsvc.wal import AttemptEndFields

log = logger(__name__)

TRACES_PATH = "/v1/traces"  # OTLP/HTTP's path for traces under the collector's base URL
# The SDK logs a warning for every span a full queue drops: on the request's path, and
# once per span while a collector is away. Its exporter's failures (one per batch, in its
# own thread) still show.
QUIET_LOGGERS = ("opentelemetry.sdk._shared_internal", "opentelemetry.sdk.trace.export")
# gen_ai.provider.name (and the older gen_ai.system) of each provider kind.
PROVIDER_NAMES = {"openai": "openai", "anthropic": "anthropic", "mock": "llmsvc.mock"}
_PROPAGATOR = TraceContextTextMapPropagator()


def operation(api: str) -> str:
    """gen_ai.operation.name of an API: embeddings, else chat (Responses and Messages
    requests are chats too; `llmsvc.api` tells them apart)."""
    return "embeddings" if api == EMBEDDINGS else "chat"


class Tracing:
    """The daemon's tracer provider and exporter; `request` starts a request's trace."""

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
        exporter = OTLPSpanExporter(
            endpoint=s.otel_endpoint.rstrip("/") + TRACES_PATH,
            headers={k: v.get_secret_value() for k, v in s.otel_headers.items()},
            timeout=s.otel_export_timeout_seconds,
        )
        self.processor = BatchSpanProcessor(exporter, max_queue_size=s.otel_queue_spans)
        # No exit hook: shutdown is the daemon's, bounded (`close`).
        provider = TracerProvider(resource=Resource.create(attributes), shutdown_on_exit=False)
        provider.add_span_processor(self.processor)
        self.tracer = provider.get_tracer("llmsvc", __version__)
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
        """A request's span, the child of the client's `traceparent` if it is valid."""
        carrier: dict[str, str] = {}
        if traceparent is not None and trace_id(traceparent) is not None:
            carrier["traceparent"] = traceparent.decode("ascii")
            if tracestate is not None and tracestate.isascii():
                carrier["tracestate"] = tracestate.decode("ascii")
        name = operation(api)
        span = self.tracer.start_span(
            f"{name} {model}",
            context=_PROPAGATOR.extract(carrier) if carrier else None,
            kind=SpanKind.SERVER,
            attributes={
                "gen_ai.operation.name": name,
                "gen_ai.request.model": model,
                "llmsvc.api": api,
                "llmsvc.request_id": str(request_id),
                "llmsvc.correlation_id": correlation_id,
            },
        )
        return RequestTrace(self, span, name)

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
    """One request's span and its open attempt's."""

    __slots__ = ("attempt_model", "attempt_span", "finish_reason", "operation", "span", "tracing")

    def __init__(self, tracing: Tracing, span: Span, operation: str) -> None:
        self.tracing = tracing
        self.span = span
        self.operation = operation
        self.attempt_span: Span | None = None
        self.attempt_model = ""  # the open attempt's upstream model
        self.finish_reason: str | None = None  # the last attempt's, for the request's span

    def attempt_started(self, number: int, attempt_id: uuid.UUID, provider: str, model: str) -> str:
        """Start an attempt's span; its W3C `traceparent`, for the upstream."""
        system = self.tracing.kinds.get(provider, provider)
        span = self.tracing.tracer.start_span(
            f"{self.operation} {model}",
            context=trace.set_span_in_context(self.span),
            kind=SpanKind.CLIENT,
            attributes={
                "gen_ai.operation.name": self.operation,
                "gen_ai.request.model": model,
                "gen_ai.provider.name": system,
                "gen_ai.system": system,
                "llmsvc.provider": provider,
                "llmsvc.attempt_id": str(attempt_id),
                "llmsvc.attempt_no": number,
            },
        )
        self.attempt_span, self.attempt_model = span, model
        context = span.get_span_context()
        return f"00-{context.trace_id:032x}-{context.span_id:016x}-{context.trace_flags:02x}"

    def attempt_ended(self, fields: AttemptEndFields, finish_reason: str | None) -> None:
        """End the open attempt's span as journaled (a second end of the same attempt, a
        reply the client turned out not to receive, leaves it as first ended)."""
        span, self.attempt_span = self.attempt_span, None
        if span is None:
            return
        span.set_attribute("gen_ai.response.model", self.attempt_model)
        if fields["http_status"] is not None:
            span.set_attribute("http.response.status_code", fields["http_status"])
        if finish_reason is not None:
            self.finish_reason = finish_reason
            span.set_attribute("gen_ai.response.finish_reasons", [finish_reason])
        _end(
            span,
            fields["status"],
            fields["error_code"],
            fields["prompt_tokens"],
            fields["completion_tokens"],
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
        if self.attempt_span is not None:
            _end(self.attempt_span, status, error_code, None, None)
            self.attempt_span = None
        system = self.tracing.kinds.get(provider, provider)
        self.span.set_attributes(
            {
                "gen_ai.provider.name": system,
                "gen_ai.system": system,
                "gen_ai.response.model": model,
                "llmsvc.provider": provider,
            }
        )
        if self.finish_reason is not None:
            self.span.set_attribute("gen_ai.response.finish_reasons", [self.finish_reason])
        _end(self.span, status, error_code, prompt_tokens, completion_tokens)


def _end(
    span: Span,
    status: str,
    error_code: str | None,
    prompt_tokens: int | None,
    completion_tokens: int | None,
) -> None:
    """Usage, status and `error.type` (a request that did not complete), then the end."""
    span.set_attribute("llmsvc.status", status)
    if prompt_tokens is not None:
        span.set_attribute("gen_ai.usage.input_tokens", prompt_tokens)
    if completion_tokens is not None:
        span.set_attribute("gen_ai.usage.output_tokens", completion_tokens)
    if status != "completed":
        span.set_attribute("error.type", error_code or status)
        span.set_status(Status(StatusCode.ERROR, status))
    span.end()

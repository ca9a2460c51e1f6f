"""OpenTelemetry spans end to end: the official `openai` SDK with a W3C `traceparent` →
`llmsvc run` with `otel_endpoint` → an OTLP/HTTP receiver on loopback, which decodes what
the daemon's exporter sends (`ExportTraceServiceRequest`, protobuf).

A request is a SERVER span continuing the client's trace, each attempt a CLIENT span under
it whose context reached the upstream as its `traceparent`; a collector that refuses
connections, or takes them and never answers, loses the spans and nothing else.
"""

from __future__ import annotations

import asyncio
import gzip
import json
import socket
import threading
from collections.abc import Iterator
from concurrent.futures import Future
from pathlib import Path
from typing import Any

import openai
import pytest
from aiohttp import web
from daemon_process import DaemonProcess, daemon_env
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import (
    ExportTraceServiceRequest,
    ExportTraceServiceResponse,
)
from opentelemetry.proto.trace.v1.trace_pb2 import Span, Status
from postgres import free_port
from upstreams.openai_upstream import Upstream

pytestmark = pytest.mark.timeout(120)

TRACE_ID = "0af7651916cd43dd8448eb211c80319c"
CLIENT_SPAN_ID = "b7ad6b7169203331"
TRACEPARENT = f"00-{TRACE_ID}-{CLIENT_SPAN_ID}-01"
UNSAMPLED_TRACE_ID = "4bf92f3577b34da6a3ce929d0e0e4736"  # the client records none of it


class Collector:
    """An OTLP/HTTP trace receiver and the fake upstream, served by one loop in a thread."""

    def __init__(self) -> None:
        self.spans: list[Span] = []
        self.resources: list[dict[str, Any]] = []
        self.loop = asyncio.new_event_loop()
        self.upstream = Upstream()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.thread.start()
        self.runner = self.call(self._start())
        self.url = f"http://127.0.0.1:{self.runner.addresses[0][1]}"

    def call(self, coro: Any) -> Any:
        future: Future[Any] = asyncio.run_coroutine_threadsafe(coro, self.loop)
        return future.result(timeout=10)

    async def _start(self) -> web.AppRunner:
        await self.upstream.start()
        app = web.Application()
        app.router.add_post("/v1/traces", self._export)
        runner = web.AppRunner(app, access_log=None)
        await runner.setup()
        await web.TCPSite(runner, "127.0.0.1", 0).start()
        return runner

    async def _export(self, request: web.Request) -> web.Response:
        body = await request.read()
        if request.headers.get("Content-Encoding") == "gzip":
            body = gzip.decompress(body)
        assert request.headers["Content-Type"] == "application/x-protobuf"
        exported = ExportTraceServiceRequest.FromString(body)
        for resource_spans in exported.resource_spans:
            self.resources.append(attributes(resource_spans.resource.attributes))
            for scope_spans in resource_spans.scope_spans:
                self.spans.extend(scope_spans.spans)
        reply = ExportTraceServiceResponse().SerializeToString()
        return web.Response(body=reply, content_type="application/x-protobuf")

    def close(self) -> None:
        self.call(self.runner.cleanup())
        self.call(self.upstream.close())
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(timeout=10)
        self.loop.close()


def attributes(pairs: Any) -> dict[str, Any]:
    """OTLP key-values as a dict: strings, ints and string arrays as themselves."""
    found: dict[str, Any] = {}
    for pair in pairs:
        value = pair.value
        kind = value.WhichOneof("value")
        if kind == "array_value":
            found[pair.key] = [v.string_value for v in value.array_value.values]
        else:
            found[pair.key] = getattr(value, kind)
    return found


@pytest.fixture(scope="module")
def collector() -> Iterator[Collector]:
    served = Collector()
    try:
        yield served
    finally:
        served.close()


def chat(daemon: DaemonProcess, headers: dict[str, str]) -> tuple[str, str]:
    """(request id, reply text) of a streamed chat through the SDK, usage asked."""
    sdk = openai.OpenAI(base_url=f"{daemon.base_url}/v1", api_key="-", max_retries=0)
    with (
        sdk,
        sdk.chat.completions.with_streaming_response.create(
            model="fallback",
            messages=[{"role": "user", "content": "hello"}],
            stream=True,
            stream_options={"include_usage": True},
            max_tokens=3,
            extra_headers=headers,
            timeout=20,
        ) as response,
    ):
        chunks = response.parse()
        text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
        return response.headers["x-request-id"], text


def daemon_with(
    sqlite_url: str, tmp_path: Path, upstream: Upstream, **settings: Any
) -> DaemonProcess:
    """A daemon whose route `fallback` tries a provider nobody listens for, then the upstream."""
    providers = [
        {
            "name": "down",
            "kind": "openai",
            "base_url": f"http://127.0.0.1:{free_port()}/v1",
            "models": ["gpt-down"],
        },
        {"name": "up", "kind": "openai", "base_url": upstream.base_url, "models": ["gpt-test"]},
    ]
    env = daemon_env(
        sqlite_url,
        tmp_path / "wal",
        providers=json.dumps(providers),
        routes=json.dumps({"fallback": ["down:gpt-down", "up:gpt-test"]}),
        retries_per_target=0,
        **settings,
    )
    return DaemonProcess(env)


def test_a_request_and_its_attempts_are_spans_of_the_clients_trace(
    collector: Collector, sqlite_url: str, tmp_path: Path
) -> None:
    secret = "otlp-secret-header-value"
    headers = json.dumps({"Authorization": f"Bearer {secret}"})
    with daemon_with(
        sqlite_url, tmp_path, collector.upstream, otel_endpoint=collector.url, otel_headers=headers
    ) as daemon:
        request_id, text = chat(daemon, {"traceparent": TRACEPARENT, "x-correlation-id": "c-1"})
        untraced_id, _ = chat(daemon, {})
        chat(daemon, {"traceparent": f"00-{UNSAMPLED_TRACE_ID}-{CLIENT_SPAN_ID}-00"})
        sdk = openai.OpenAI(base_url=f"{daemon.base_url}/v1", api_key="-", max_retries=0)
        with sdk:
            embedded = sdk.embeddings.with_raw_response.create(model="fallback", input="hi")
        assert daemon.stop() == 0, daemon.log  # the spans left are exported on the way out
    assert text == "t0 t1 t2 "
    assert secret not in daemon.log
    assert collector.resources[0]["service.name"] == "llmsvc"

    spans = {s.span_id.hex(): s for s in collector.spans}
    [request] = [
        s
        for s in spans.values()
        if s.kind == Span.SPAN_KIND_SERVER
        and attributes(s.attributes)["llmsvc.request_id"] == request_id
    ]
    assert request.name == "chat fallback"
    assert request.trace_id.hex() == TRACE_ID
    assert request.parent_span_id.hex() == CLIENT_SPAN_ID
    said = attributes(request.attributes)
    assert said["gen_ai.operation.name"] == "chat"
    assert said["gen_ai.request.model"] == "fallback"
    assert said["gen_ai.response.model"] == "gpt-test"
    assert said["gen_ai.provider.name"] == said["gen_ai.system"] == "openai"
    assert (said["gen_ai.usage.input_tokens"], said["gen_ai.usage.output_tokens"]) == (1, 3)
    assert said["gen_ai.response.finish_reasons"] == ["length"]
    assert said["llmsvc.correlation_id"] == "c-1"
    assert said["llmsvc.status"] == "completed"
    assert "error.type" not in said

    attempts = sorted(
        (s for s in spans.values() if s.parent_span_id == request.span_id),
        key=lambda s: attributes(s.attributes)["llmsvc.attempt_no"],
    )
    assert [s.kind for s in attempts] == [Span.SPAN_KIND_CLIENT] * 2
    assert [s.name for s in attempts] == ["chat gpt-down", "chat gpt-test"]
    assert all(s.trace_id.hex() == TRACE_ID for s in attempts)
    failed, served = (attributes(s.attributes) for s in attempts)
    assert (failed["llmsvc.provider"], failed["error.type"]) == ("down", "upstream_unreachable")
    assert attempts[0].status.code == Status.STATUS_CODE_ERROR
    assert served["llmsvc.provider"] == "up"
    assert (served["gen_ai.usage.input_tokens"], served["gen_ai.usage.output_tokens"]) == (1, 3)
    assert served["http.response.status_code"] == 200
    assert failed["llmsvc.attempt_id"] != served["llmsvc.attempt_id"]

    # The upstream was called with the served attempt's span as the parent of its own.
    sent = [h["traceparent"] for h in collector.upstream.chat_headers if "traceparent" in h]
    assert f"00-{TRACE_ID}-{attempts[1].span_id.hex()}-01" in sent

    [untraced] = [
        s
        for s in spans.values()
        if s.kind == Span.SPAN_KIND_SERVER
        and attributes(s.attributes)["llmsvc.request_id"] == untraced_id
    ]
    assert untraced.trace_id.hex() != TRACE_ID
    assert untraced.parent_span_id == b""  # a trace of its own

    # An unsampled trace is passed on, unsampled, and none of its spans is exported.
    assert not [s for s in spans.values() if s.trace_id.hex() == UNSAMPLED_TRACE_ID]
    passed_on = [tp for tp in sent if UNSAMPLED_TRACE_ID in tp]
    assert len(passed_on) == 1
    assert passed_on[0].endswith("-00")

    [embedding] = [
        s
        for s in spans.values()
        if s.kind == Span.SPAN_KIND_SERVER
        and attributes(s.attributes)["llmsvc.request_id"] == embedded.headers["x-request-id"]
    ]
    assert embedding.name == "embeddings fallback"
    said = attributes(embedding.attributes)
    assert (said["gen_ai.operation.name"], said["llmsvc.api"]) == ("embeddings", "embeddings")


@pytest.mark.parametrize("collector_is", ["refusing", "silent"])
def test_a_collector_that_refuses_or_never_answers_loses_spans_not_requests(
    collector: Collector, sqlite_url: str, tmp_path: Path, collector_is: str
) -> None:
    with socket.socket() as silent:  # accepts connections (the backlog) and never reads them
        silent.bind(("127.0.0.1", 0))
        silent.listen(16)
        port = silent.getsockname()[1] if collector_is == "silent" else free_port()
        with daemon_with(
            sqlite_url,
            tmp_path,
            collector.upstream,
            otel_endpoint=f"http://127.0.0.1:{port}",
            otel_export_timeout_seconds=600,  # longer than the test: only shutdown's bound ends it
            shutdown_close_seconds=1,
        ) as daemon:
            for _ in range(3):
                _, text = chat(daemon, {"traceparent": TRACEPARENT})
                assert text == "t0 t1 t2 "
            assert daemon.stop() == 0, daemon.log
    assert "spans left unexported: the collector did not take them" in daemon.log

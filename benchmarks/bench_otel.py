"""OpenTelemetry: what exporting spans adds to a call (a mode of benchmarks/bench.py).

--otel-compare    S1 (non-streaming, c=1): the upstream called directly, a daemon with tracing
                  off, one exporting its spans to an OTLP/HTTP receiver in this process (which
                  decodes and counts them, as a collector would), and one whose `otel_endpoint`
                  refuses connections (a dead collector), interleaved round by round (order
                  rotated). Each request makes two spans: the request's and its attempt's.
"""

from __future__ import annotations

import argparse
import asyncio
import shutil
import signal
import tempfile
import time
from pathlib import Path
from typing import Any

import aiohttp
from aiohttp import web
from bench_limits import Raw, timed
from benchkit import (
    MODEL,
    PACKAGES,
    Proc,
    add,
    chat_body,
    chat_url,
    close_report,
    free_port,
    log,
    machine_busy_s,
    machine_info,
    pct,
    per_round,
    processes,
    rotated,
    spawn_upstream,
    start_variants,
    summary,
)
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import (
    ExportTraceServiceRequest,
    ExportTraceServiceResponse,
)

DAEMONS = ("otel_off", "otel_on", "otel_dead")


class Receiver:
    """An OTLP/HTTP trace endpoint that decodes each export and counts its spans."""

    def __init__(self) -> None:
        self.spans = 0
        self.exports = 0
        self.runner: web.AppRunner | None = None
        self.url = ""

    async def start(self) -> Receiver:
        app = web.Application(client_max_size=64 * 1024 * 1024)
        app.router.add_post("/v1/traces", self.export)
        self.runner = web.AppRunner(app, access_log=None)
        await self.runner.setup()
        await web.TCPSite(self.runner, "127.0.0.1", 0).start()
        self.url = f"http://127.0.0.1:{self.runner.addresses[0][1]}"
        return self

    async def export(self, request: web.Request) -> web.Response:
        exported = ExportTraceServiceRequest.FromString(await request.read())
        self.exports += 1
        for resource in exported.resource_spans:
            for scope in resource.scope_spans:
                self.spans += len(scope.spans)
        reply = ExportTraceServiceResponse().SerializeToString()
        return web.Response(body=reply, content_type="application/x-protobuf")

    async def close(self) -> None:
        if self.runner is not None:
            await self.runner.cleanup()


async def stop(procs: list[Proc], within: float = 60) -> None:
    """SIGTERM the daemons and wait for them without blocking the loop: the receiver, on
    this loop, takes the exports they make as they stop."""
    for proc in procs:
        proc.popen.send_signal(signal.SIGTERM)
    for _ in range(round(within / 0.05)):  # polled: a child's exit sets no event
        if all(p.popen.poll() is not None for p in procs):
            return
        await asyncio.sleep(0.05)


async def otel_compare(args: argparse.Namespace, tmp: Path) -> dict[str, Any]:
    """S1 added p50/p99 with tracing off, exporting, and exporting to a dead collector."""
    raw: Raw = {}
    receiver = await Receiver().start()
    endpoints = {"otel_off": None, "otel_on": receiver.url}
    endpoints["otel_dead"] = f"http://127.0.0.1:{free_port()}"  # nothing listens there
    try:
        with processes() as procs:
            procs.append(up := spawn_upstream(tmp, "upstream", 0.0))
            variants = {
                name: {"LLMSVC_OTEL_ENDPOINT": url} if (url := endpoints[name]) else {}
                for name in DAEMONS
            }
            daemons = await start_variants(tmp, args.database_url, up, variants, procs)
            targets = {"direct": chat_url(up)} | {n: chat_url(d) for n, d in daemons.items()}
            body = chat_body(MODEL, 16, stream=False)
            async with aiohttp.ClientSession() as session:
                for url in targets.values():  # warm every path
                    for _ in range(20):
                        await timed(session, url, body, None)
                for r in range(args.rounds):
                    for name in rotated(list(targets), r):
                        url = targets[name]
                        n = args.latency_n
                        lats = [await timed(session, url, body, None) for _ in range(n)]
                        add(raw, f"{name}_p50_ms", pct(lats, 0.5) * 1e3)
                        add(raw, f"{name}_p99_ms", pct(lats, 0.99) * 1e3)
                    for q in ("p50", "p99"):
                        direct = raw[f"direct_{q}_ms"][-1]
                        for name in DAEMONS:
                            add(raw, f"added_{q}_ms_{name}", raw[f"{name}_{q}_ms"][-1] - direct)
                        off = raw[f"added_{q}_ms_otel_off"][-1]
                        for name in ("otel_on", "otel_dead"):
                            added = raw[f"added_{q}_ms_{name}"][-1]
                            add(raw, f"{name}_minus_off_added_{q}_ms", added - off)
                            if q == "p50":  # a p99 minus direct's can be below zero: no ratio
                                add(raw, f"added_p50_{name}_over_off", added / off)
            await stop(procs[1:])  # each daemon exports the spans it has left as it stops
    finally:
        await receiver.close()
    requests = args.rounds * args.latency_n + 20
    return {
        "requests_per_round": args.latency_n,
        "rounds": args.rounds,
        "database": "postgresql" if args.database_url.startswith("postgres") else "sqlite",
        "spans_expected_otel_on": 2 * requests,
        "spans_received": receiver.spans,
        "exports_received": receiver.exports,
        **summary(raw),
        "per_round": per_round(raw),
    }


async def run(args: argparse.Namespace) -> dict[str, Any]:
    """The comparison, with the machine it ran on."""
    started = time.perf_counter()
    tmp = Path(tempfile.mkdtemp(prefix="llmsvc-bench-otel-", dir=args.tmp_dir))
    packages = (*PACKAGES, "opentelemetry-sdk", "opentelemetry-exporter-otlp-proto-http")
    report: dict[str, Any] = {"machine": machine_info(tmp, packages)}
    busy0 = machine_busy_s()
    try:
        log("S1 with OpenTelemetry off, exporting, and exporting to a dead collector")
        report["otel_compare_nonstream_c1"] = await otel_compare(args, tmp)
    finally:
        if not args.keep_tmp:
            shutil.rmtree(tmp, ignore_errors=True)
    return close_report(report, started, busy0)

"""Every Prometheus metric llmsvc exports, on a registry of its own.

State that already lives in an object (the flusher's checkpoint, the WAL's
end) is read when Prometheus scrapes, by a collector, so the hot path updates
nothing. Events that leave no state behind (a refused request) are counters,
incremented where they happen, which is never the hot path.

Scrapes run on the metrics server's own thread: a collector may only read
values that the event loop replaces whole (ints, frozen dataclasses), and must
tolerate a snapshot taken between two updates.

To add a metric: a counter or histogram goes on `Metrics` (created with
`registry=self.registry`); a value read from live state goes into a collector
registered with `Metrics.watch`. Names are `llmsvc_*` (beside prometheus_client's
own `process_*` and `python_info`); labels never carry secrets, prompts or URLs
with credentials.
"""

from __future__ import annotations

import asyncio
import platform
import socket
import threading
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import TypeVar, cast
from wsgiref.simple_server import WSGIRequestHandler, make_server

from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    PlatformCollector,
    ProcessCollector,
    disable_created_metrics,
    make_wsgi_app,
)
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.exposition import ThreadingWSGIServer
from prometheus_client.metrics import MetricWrapperBase
from prometheus_client.registry import Collector

from llmsvc import __version__
from llmsvc.logs import logger
from llmsvc.wal import Damage

log = logger(__name__)
M = TypeVar("M", bound=MetricWrapperBase)

# `*_created` series double every counter and histogram for a value nobody alerts on.
disable_created_metrics()  # type: ignore[no-untyped-call]

REFUSAL_REASONS = ("backlog", "shutdown")
HTTP_REFUSAL_REASONS = (
    "connections",
    "header_too_large",
    "uri_too_long",
    "header_timeout",
    "body_timeout",
)
LOOP_PROBE_SECONDS = 0.1


@dataclass(frozen=True, slots=True)
class WalStatus:
    """The WAL and the database as operators see them: one consistent snapshot.

    `backlog_*` is what is journaled (the client may have it) but not yet
    committed to the database; `checkpoint` is the last committed LSN and
    `last_lsn` the last journaled one.
    """

    database_up: bool
    backlog_records: int
    backlog_bytes: int
    backlog_limit_bytes: int
    checkpoint: int
    last_lsn: int
    disk_full: bool = False  # the WAL's disk is full: requests are refused until space returns
    database_problem: str | None = None  # why the database is not up, in words
    catching_up: str | None = None  # what boot's catch-up with the database does, until done

    @property
    def over_limit(self) -> bool:
        return self.backlog_bytes > self.backlog_limit_bytes


CIRCUIT_STATES = {"closed": 0, "open": 1, "half_open": 2}


@dataclass(frozen=True, slots=True)
class DaemonState:
    """Counts the daemon's parts keep themselves, read at each scrape (never on the hot path)."""

    wal_segments: int
    wal_appended_records: int
    wal_appended_bytes: int
    flush_errors: int
    refused_records: dict[str, int]  # outcome -> records the database refused as journaled
    inflight_requests: int
    providers: dict[str, tuple[bool, str]]  # name -> (enabled, circuit state)


class _DaemonCollector(Collector):
    def __init__(self, state: Callable[[], DaemonState]) -> None:
        self.state = state

    def collect(self) -> Iterator[Metric]:
        s = self.state()
        yield _gauge("llmsvc_wal_segments", "WAL segment files on disk", s.wal_segments)
        yield CounterMetricFamily(
            "llmsvc_wal_appended_records",
            "records appended to the WAL since the daemon started",
            value=s.wal_appended_records,
        )
        yield CounterMetricFamily(
            "llmsvc_wal_appended_bytes",
            "bytes appended to the WAL since the daemon started",
            value=s.wal_appended_bytes,
        )
        errors = CounterMetricFamily(
            "llmsvc_database_errors",
            "database operations that failed, by operation",
            labels=["operation"],
        )
        errors.add_metric(["flush"], s.flush_errors)
        yield errors
        refused = CounterMetricFamily(
            "llmsvc_records_refused",
            "journaled records the database refused as written: stored sanitised or set aside",
            labels=["outcome"],
        )
        for outcome, count in s.refused_records.items():
            refused.add_metric([outcome], count)
        yield refused
        yield _gauge(
            "llmsvc_inflight_requests",
            "chat requests being served now (streams open)",
            s.inflight_requests,
        )
        enabled = GaugeMetricFamily(
            "llmsvc_provider_enabled", "1 unless an operator disabled it", labels=["provider"]
        )
        circuit = GaugeMetricFamily(
            "llmsvc_provider_circuit_state",
            "the provider's circuit breaker: 0 closed, 1 open, 2 half-open",
            labels=["provider"],
        )
        for name, (on, state) in s.providers.items():
            enabled.add_metric([name], float(on))
            circuit.add_metric([name], CIRCUIT_STATES.get(state, 0))
        yield enabled
        yield circuit


class _WalCollector(Collector):
    """Reads one `WalStatus` per scrape, so the gauges agree with each other."""

    def __init__(self, status: Callable[[], WalStatus]) -> None:
        self.status = status

    def collect(self) -> Iterator[Metric]:
        s = self.status()
        yield _gauge(
            "llmsvc_database_up",
            "0 while the database fails or does not answer the daemon's calls, else 1",
            s.database_up,
        )
        yield _gauge(
            "llmsvc_wal_backlog_records",
            "WAL records journaled but not yet committed to the database",
            s.backlog_records,
        )
        yield _gauge(
            "llmsvc_wal_backlog_bytes",
            "WAL bytes journaled but not yet committed to the database",
            s.backlog_bytes,
        )
        yield _gauge(
            "llmsvc_wal_backlog_limit_bytes",
            "wal_backlog_limit_bytes: past it new requests are refused",
            s.backlog_limit_bytes,
        )
        yield _gauge(
            "llmsvc_wal_checkpoint_lsn", "the last LSN committed to the database", s.checkpoint
        )
        yield _gauge("llmsvc_wal_last_lsn", "the last LSN journaled in the WAL", s.last_lsn)
        yield _gauge(
            "llmsvc_wal_disk_full",
            "1 while the WAL's disk is full and requests are refused",
            s.disk_full,
        )


def _gauge(name: str, doc: str, value: float) -> GaugeMetricFamily:
    return GaugeMetricFamily(name, doc, value=float(value))


class Metrics:
    """llmsvc's metrics on one registry; each daemon (or test) has its own."""

    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry if registry is not None else CollectorRegistry()
        # This process's CPU, memory and descriptors, and its Python: a worker's are its own,
        # on its own metrics port (docs/DECISIONS.md, Workers).
        ProcessCollector(registry=self.registry)
        PlatformCollector(registry=self.registry)
        self.build_info = Gauge(
            "llmsvc_build_info",
            "always 1; the labels say which llmsvc, Python and database this process runs",
            ["version", "python", "database"],
            registry=self.registry,
        )
        self.requests_refused = Counter(
            "llmsvc_requests_refused",
            "chat completion requests refused with 503, by reason",
            ["reason"],
            registry=self.registry,
        )
        for reason in REFUSAL_REASONS:  # exported at 0 before the first refusal
            self.requests_refused.labels(reason=reason)
        self.http_refused = Counter(
            "llmsvc_http_refused",
            "connections and requests refused or closed by an HTTP limit, by reason",
            ["reason"],
            registry=self.registry,
        )
        for reason in HTTP_REFUSAL_REASONS:
            self.http_refused.labels(reason=reason)
        self.wal_damage = Counter(
            "llmsvc_wal_damage",
            "damage found in the WAL at boot and repaired (cut or quarantined), by kind",
            ["kind"],
            registry=self.registry,
        )
        for kind in Damage:
            self.wal_damage.labels(kind=kind)
        self.wal_lost_records = Counter(
            "llmsvc_wal_lost_records",
            "journaled records found missing at boot that the database does not hold",
            registry=self.registry,
        )

        # `job_name`, not `job`: Prometheus gives every scraped series its target's `job`.
        self.job_runs = Counter(
            "llmsvc_job_runs",
            "maintenance job runs on this instance, by job and status (ok, problems, failed, "
            "skipped)",
            ["job_name", "status"],
            registry=self.registry,
        )
        self.job_duration = Histogram(
            "llmsvc_job_duration_seconds",
            "how long maintenance job runs took",
            ["job_name"],
            buckets=(0.01, 0.1, 1, 10, 60, 300, 1800, 7200),
            registry=self.registry,
        )
        self.job_last_success = Gauge(
            "llmsvc_job_last_success_timestamp_seconds",
            "when a run of the job last ended ok on this instance (Unix time)",
            ["job_name"],
            registry=self.registry,
        )

        labels = ["provider", "model"]
        self.requests = Counter(
            "llmsvc_requests",
            "chat requests served, by provider, model and outcome",
            [*labels, "status"],
            registry=self.registry,
        )
        self.attempts = Counter(
            "llmsvc_attempts",
            "provider attempts, by provider, model and outcome",
            [*labels, "status"],
            registry=self.registry,
        )
        self.provider_errors = Counter(
            "llmsvc_provider_errors",
            "failed provider attempts, and providers skipped (provider_disabled, circuit_open), "
            "by provider and error code",
            ["provider", "code"],
            registry=self.registry,
        )
        self.prompt_tokens = Counter(
            "llmsvc_prompt_tokens",
            "tokens sent to providers (as they report)",
            labels,
            registry=self.registry,
        )
        self.completion_tokens = Counter(
            "llmsvc_completion_tokens",
            "tokens streamed back to clients",
            labels,
            registry=self.registry,
        )
        self.request_duration = Histogram(
            "llmsvc_request_duration_seconds",
            "from the request's arrival to its last byte",
            labels,
            buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300),
            registry=self.registry,
        )
        self.time_to_first_token = Histogram(
            "llmsvc_time_to_first_token_seconds",
            "from the request's arrival to its first token sent",
            labels,
            buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10),
            registry=self.registry,
        )
        self.wal_fsync = Histogram(
            "llmsvc_wal_fsync_duration_seconds",
            "how long each fdatasync of the WAL took",
            buckets=(0.0001, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.5, 1),
            registry=self.registry,
        )
        self.flush_batch = Histogram(
            "llmsvc_flush_batch_records",
            "records per flush transaction",
            buckets=(1, 10, 100, 1000, 5000, 10_000, 25_000, 50_000, 100_000),
            registry=self.registry,
        )
        self.flush_duration = Histogram(
            "llmsvc_flush_duration_seconds",
            "how long each flush took: building its batch and committing it",
            buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10),
            registry=self.registry,
        )
        self.loop_lag = Histogram(
            "llmsvc_event_loop_lag_seconds",
            "how late the event loop ran a timer: its backlog of ready work",
            buckets=(0.001, 0.0025, 0.005, 0.01, 0.02, 0.05, 0.1, 0.25, 0.5, 1, 2.5),
            registry=self.registry,
        )
        self.flushed_records = Counter(
            "llmsvc_flush_records",
            "WAL records committed to the database",
            registry=self.registry,
        )
        self._children: dict[tuple[object, ...], MetricWrapperBase] = {}  # see _series

    async def watch_loop(self, interval: float = LOOP_PROBE_SECONDS) -> None:
        """Measure the event loop's lag for as long as it runs: how late a timer fires.

        A loop busy with one long callback (a blocking call, a big batch) shows
        here before it shows anywhere else; the probe costs one timer a tick.
        """
        loop = asyncio.get_running_loop()
        while True:
            due = loop.time() + interval
            await asyncio.sleep(interval)
            self.loop_lag.observe(max(0.0, loop.time() - due))

    def request_done(
        self,
        provider: str,
        model: str,
        status: str,
        error_code: str | None,
        prompt_tokens: int | None,
        completion_tokens: int,
        seconds: float,
        first_token_seconds: float | None,
        attempts: Sequence[tuple[str, str, str, str | None]] = (),
        skipped: Sequence[tuple[str, str]] = (),
    ) -> None:
        """One request ended: called once per request, never per token.

        `attempts` is each provider attempt's (provider, upstream model, status,
        error code); `skipped` each provider skipped without a call (provider,
        `provider_disabled` or `circuit_open`), counted as that provider's errors
        too. Labels stay bounded: every name comes from configuration.
        """
        series = self._series
        series(self.requests, provider, model, status).inc()
        for name, upstream, outcome, code in attempts:
            series(self.attempts, name, upstream, outcome).inc()
            if code:
                series(self.provider_errors, name, code).inc()
        for name, code in skipped:
            series(self.provider_errors, name, code).inc()
        if prompt_tokens:
            series(self.prompt_tokens, provider, model).inc(prompt_tokens)
        series(self.completion_tokens, provider, model).inc(completion_tokens)
        series(self.request_duration, provider, model).observe(seconds)
        if first_token_seconds is not None:
            series(self.time_to_first_token, provider, model).observe(first_token_seconds)

    def _series(self, metric: M, *values: str) -> M:
        """`metric.labels(*values)`, looked up once: `labels` costs ~1.5 µs, and a request
        would call it six times. Bounded: every label value comes from configuration."""
        key = (metric, *values)
        child = self._children.get(key)
        if child is None:
            child = self._children[key] = metric.labels(*values)
        return cast(M, child)

    def describe_build(self, database: str) -> None:
        """Export `llmsvc_build_info` once the store is known: `database` is its dialect."""
        self.build_info.labels(__version__, platform.python_version(), database).set(1)

    def http_refusal(self, reason: str) -> None:
        """A connection or request an HTTP limit refused (gateway/http_protocol.py)."""
        self.http_refused.labels(reason=reason).inc()

    def batch_flushed(self, records: int, seconds: float) -> None:
        self.flush_batch.observe(records)
        self.flush_duration.observe(seconds)
        self.flushed_records.inc(records)

    def watch_daemon(self, state: Callable[[], DaemonState]) -> None:
        self.registry.register(_DaemonCollector(state))

    def job_finished(self, job: str, status: str, seconds: float) -> None:
        self.job_runs.labels(job_name=job, status=status).inc()
        self.job_duration.labels(job_name=job).observe(seconds)
        if status == "ok":
            self.job_last_success.labels(job_name=job).set_to_current_time()

    def watch(self, status: Callable[[], WalStatus]) -> None:
        """Export the WAL's state, read from `status` at each scrape."""
        self.registry.register(_WalCollector(status))


class MetricsServer:
    """`/metrics` served by prometheus_client's WSGI app on a thread of its own.

    Started here rather than by `start_http_server`, whose thread polls for a stop
    every 0.5 s: that poll was the longest step of an idle daemon's shutdown.
    """

    POLL_SECONDS = 0.05  # how soon `stop` is seen; a wake-up of an idle thread as often

    def __init__(self, server: ThreadingWSGIServer, thread: threading.Thread) -> None:
        self._server = server
        self._thread = thread
        self.port: int = server.server_address[1]

    @classmethod
    def start(cls, registry: CollectorRegistry, host: str, port: int) -> MetricsServer:
        """Listen on host:port (0 picks a free port); OSError if it cannot."""
        # Resolved as start_http_server does: a name to its address, IPv6 to an IPv6 socket.
        found = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
        family, address = found[0][0], str(found[0][4][0])

        class Server(ThreadingWSGIServer):
            address_family = family

        server = make_server(address, port, make_wsgi_app(registry), Server, _QuietHandler)
        thread = threading.Thread(
            target=server.serve_forever, args=(cls.POLL_SECONDS,), name="metrics", daemon=True
        )
        thread.start()
        return cls(server, thread)

    def stop(self) -> None:
        """Stop serving and close the socket; blocks up to one poll."""
        self._server.shutdown()
        self._server.server_close()
        self._thread.join(timeout=5)


class _QuietHandler(WSGIRequestHandler):
    """No line on stderr per scrape."""

    def log_message(self, format: str, *args: object) -> None:
        pass

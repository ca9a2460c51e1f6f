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
registered with `Metrics.watch`. Names are `llmsvc_*`; labels never carry
secrets, prompts or URLs with credentials.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from wsgiref.simple_server import WSGIServer

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, start_http_server
from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

log = logging.getLogger(__name__)

REFUSAL_REASONS = ("backlog", "shutdown")
WAL_DAMAGE_KINDS = ("torn_tail", "corrupt", "bad_header", "unreadable", "overlap")


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

    @property
    def over_limit(self) -> bool:
        return self.backlog_bytes > self.backlog_limit_bytes


class _WalCollector(Collector):
    """Reads one `WalStatus` per scrape, so the gauges agree with each other."""

    def __init__(self, status: Callable[[], WalStatus]) -> None:
        self.status = status

    def collect(self) -> Iterator[Metric]:
        s = self.status()
        yield _gauge(
            "llmsvc_database_up", "0 while flushes to the database fail, else 1", s.database_up
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
        self.requests_refused = Counter(
            "llmsvc_requests_refused",
            "chat completion requests refused with 503, by reason",
            ["reason"],
            registry=self.registry,
        )
        for reason in REFUSAL_REASONS:  # exported at 0 before the first refusal
            self.requests_refused.labels(reason=reason)
        self.wal_damage = Counter(
            "llmsvc_wal_damage",
            "damage found in the WAL at boot and repaired (cut or quarantined), by kind",
            ["kind"],
            registry=self.registry,
        )
        for kind in WAL_DAMAGE_KINDS:
            self.wal_damage.labels(kind=kind)
        self.wal_lost_records = Counter(
            "llmsvc_wal_lost_records",
            "journaled records found missing at boot that the database does not hold",
            registry=self.registry,
        )

        self.job_runs = Counter(
            "llmsvc_job_runs",
            "maintenance job runs on this instance, by job and status (ok, problems, failed, "
            "skipped)",
            ["job", "status"],
            registry=self.registry,
        )
        self.job_duration = Histogram(
            "llmsvc_job_duration_seconds",
            "how long maintenance job runs took",
            ["job"],
            buckets=(0.01, 0.1, 1, 10, 60, 300, 1800, 7200),
            registry=self.registry,
        )
        self.job_last_success = Gauge(
            "llmsvc_job_last_success_timestamp_seconds",
            "when a run of the job last ended ok on this instance (Unix time)",
            ["job"],
            registry=self.registry,
        )

    def job_finished(self, job: str, status: str, seconds: float) -> None:
        self.job_runs.labels(job=job, status=status).inc()
        self.job_duration.labels(job=job).observe(seconds)
        if status == "ok":
            self.job_last_success.labels(job=job).set_to_current_time()

    def watch(self, status: Callable[[], WalStatus]) -> None:
        """Export the WAL's state, read from `status` at each scrape."""
        self.registry.register(_WalCollector(status))


class MetricsServer:
    """prometheus_client's own HTTP server for `/metrics`, on its own thread."""

    def __init__(self, server: WSGIServer, thread: threading.Thread) -> None:
        self._server = server
        self._thread = thread
        self.port: int = server.server_address[1]

    @classmethod
    def start(cls, registry: CollectorRegistry, host: str, port: int) -> MetricsServer:
        """Listen on host:port (0 picks a free port); OSError if it cannot."""
        server, thread = start_http_server(port, host, registry)
        return cls(server, thread)

    def stop(self) -> None:
        """Stop serving and close the socket; blocks up to the server's 0.5 s poll."""
        self._server.shutdown()
        self._server.server_close()
        self._thread.join(timeout=5)

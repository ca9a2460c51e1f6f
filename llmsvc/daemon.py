"""The daemon: boot, serve, shut down — ordered steps, one log line each.

Boot: WAL lock → migrations → WAL repaired and opened → flusher catches up
from the checkpoint → requests a previous run left open are journaled
`interrupted` → consistency check → scheduler → metrics port → HTTP server.
Shutdown: refuse new requests (503) → let open ones finish within
`shutdown_grace_seconds`, interrupt the rest → stop the HTTP server → sync the
WAL → drain it into the database → stop the scheduler → close the metrics
port → close pools.
Signal handlers only set an event; a second signal exits at once (the WAL
still holds every acknowledged record).
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import logging
import os
import signal
import socket
import time
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import anyio
import sqlalchemy as sa
import uvicorn

from llmsvc import status
from llmsvc.admin.app import AdminApi
from llmsvc.config import Settings, systemd_environment
from llmsvc.errors import Conflict, LlmsvcError, WalFatal
from llmsvc.gateway.app import Gateway
from llmsvc.gateway.breaker import Breakers, Circuit
from llmsvc.gateway.http_protocol import (
    HttpLimits,
    connection_bound,
    descriptor_limit,
    protocol_class,
)
from llmsvc.gateway.journal import Journal
from llmsvc.gateway.router import RetryPolicy, Router
from llmsvc.maintenance.backup import replay, restore_database
from llmsvc.maintenance.consistency import as_result, check_and_repair, format_ranges
from llmsvc.maintenance.jobs import INSTANCE_JOBS, job_table
from llmsvc.maintenance.retention import ensure_partitions
from llmsvc.maintenance.runs import Job, JobResult, record_run, run_job
from llmsvc.maintenance.scheduler import Scheduler
from llmsvc.metrics import Metrics, MetricsServer, WalStatus
from llmsvc.providers import build_provider
from llmsvc.providers.base import Provider
from llmsvc.status import iso
from llmsvc.store.engine import DAEMON_APPLICATION, create_engine, describe_error, migrate
from llmsvc.store.flusher import Flusher, load_checkpoint
from llmsvc.store.queries import (
    open_work,
    provider_states,
    set_provider_circuit,
    set_provider_enabled,
)
from llmsvc.supervisor import shared_port_socket
from llmsvc.systemd import Notifier
from llmsvc.wal.segment import WalLock, instance_id
from llmsvc.wal.writer import WalWriter

log = logging.getLogger(__name__)

EXIT_OK, EXIT_FATAL = 0, 1
FLUSHER_STALL_SECONDS = 10.0  # a flusher quiet this long (a hung database call) is stalled
JOB_SHUTDOWN_GRACE = 5.0  # seconds a running maintenance job gets to end before it is cancelled
PROVIDER_REFRESH_SECONDS = 2.0  # how soon a provider switch made elsewhere is followed here


class _EmbeddedServer(uvicorn.Server):
    """uvicorn without its own signal handlers: the daemon owns the signals.

    `capture_signals` is not a promised API; uvicorn is pinned and
    tests/test_daemon.py keeps a test on it.
    """

    @contextlib.contextmanager
    def capture_signals(self) -> Iterator[None]:
        yield


class Daemon:
    """One llmsvc instance; `worker` is its index when a supervisor runs several (workers > 1)."""

    def __init__(self, settings: Settings, worker: int | None = None) -> None:
        self.settings = settings
        self.worker = worker
        self._switches = 0  # operator switches made here, so a refresh never undoes a newer one
        self.started = time.monotonic()
        self.job_runs: dict[str, dict[str, Any]] = {}  # this instance's last run of each job
        self._background: set[asyncio.Task[None]] = set()
        self.notifier = Notifier(*systemd_environment())
        self.stopping = asyncio.Event()
        self.fatal: WalFatal | None = None
        self.lock = WalLock(settings.wal_dir)
        self.providers: dict[str, Provider] = {}

    async def run(self) -> int:
        """Boot, serve until a signal or a fatal WAL error, shut down; return the exit code."""
        self.booting = anyio.CancelScope()
        try:
            async with anyio.create_task_group() as signals:
                signals.start_soon(self._watch_signals)
                try:
                    with self.booting:  # a signal during a long replay stops the boot
                        await self.boot()
                    if not self.booting.cancelled_caught:
                        self._log_ready()
                        _tune_gc()
                        self.notifier.ready(f"serving on {self.settings.host}:{self.port}")
                        signals.start_soon(self.metrics.watch_loop)
                        self.follower = asyncio.create_task(
                            self._follow_provider_switches(), name="provider-switches"
                        )
                        if self.notifier.watchdog_interval is not None:
                            signals.start_soon(self._watchdog, self.notifier.watchdog_interval)
                        await self.stopping.wait()
                finally:
                    self.notifier.stopping("stopping: finishing open requests")
                    await self.shutdown()
                    signals.cancel_scope.cancel()
                    self.notifier.close()
        except BaseExceptionGroup as group:  # a boot failure, wrapped by the task group
            if len(group.exceptions) == 1:
                raise group.exceptions[0] from None
            raise
        return EXIT_FATAL if self.fatal else EXIT_OK

    async def boot(self) -> None:
        s = self.settings
        self.lock.acquire()
        self.instance = instance_id(s.wal_dir)
        log.info("boot: wal locked dir=%s instance=%s", s.wal_dir, self.instance)

        self.notifier.status("booting: migrating the database")
        self.engine = create_engine(s.database_url, DAEMON_APPLICATION)
        await migrate(self.engine, s.redacted_database_url())
        log.info("boot: schema at head database=%s", s.redacted_database_url())
        await ensure_partitions(self.engine, s.token_partition_ahead_days)

        self.metrics = Metrics()
        self.writer = WalWriter(
            s.wal_dir,
            self.instance,
            sync=s.wal_sync,
            fsync_interval=s.wal_fsync_interval_ms / 1000,
            commit_delay=s.wal_commit_delay_us / 1e6,
            segment_max_bytes=s.wal_segment_max_bytes,
            on_fsync=self.metrics.wal_fsync.observe,
        )
        checkpoint = await load_checkpoint(self.engine, self.instance)
        self.repairs = self.writer.open(asyncio.get_running_loop(), self._on_fatal, checkpoint)
        self.journal = Journal(self.writer)

        self.flusher = self._new_flusher()
        await self.flusher.start()

        # HTTP from here on, so health and readiness say "booting" during a long replay;
        # chat requests get 503 until the gateway is told the store is ready.
        self.providers = {p.name: build_provider(p) for p in s.providers}
        self.metrics.watch(self.wal_status)
        self.metrics.watch_daemon(lambda: status.daemon_state(self))
        for finding in self.repairs.findings:
            self.metrics.wal_damage.labels(kind=finding.kind).inc()
        self.metrics.wal_lost_records.inc(self.repairs.counts()["lost_records"])
        breakers = Breakers(
            s.circuit_failure_threshold,
            s.circuit_cooldown_seconds,
            s.circuit_window,
            on_change=self._circuit_changed,
        )
        self.router = Router(s.providers, self.providers, s.routes, breakers, s.prices)
        states = await provider_states(self.engine)
        self.router.disabled = {name for name, row in states.items() if not row["enabled"]}
        for name, row in states.items():
            if name in self.providers and row["circuit_state"] != "closed":
                since = row["updated_at"].timestamp()
                breakers.restore(name, row["circuit_state"], row["failure_count"], since)
                log.info("boot: circuit %s provider=%s", row["circuit_state"], name)
        if self.router.disabled:
            log.info("boot: providers disabled by an operator: %s", ",".join(self.router.disabled))
        self.gateway = Gateway(
            self.journal,
            self.router,
            s.max_body_bytes,
            wal_status=self.wal_status,
            metrics=self.metrics,
            describe=self.describe,
            policy=RetryPolicy(
                retries=s.retries_per_target,
                backoff=s.retry_backoff_ms / 1000,
                backoff_max=s.retry_backoff_max_ms / 1000,
                retry_after_max=s.retry_after_max_seconds,
                first_token_timeout=s.first_token_timeout_seconds,
                attempt_timeout=s.attempt_timeout_seconds,
                request_timeout=s.request_timeout_seconds,
            ),
            booting=True,
        )
        await self._start_http()

        behind = self.writer.end.lsn - 1 - self.flusher.checkpoint
        self.notifier.status(f"booting: replaying {behind} WAL records into the database")
        await self.flusher.drain(within=float("inf"))
        log.info("boot: wal replayed records=%d checkpoint=%d", behind, self.flusher.checkpoint)

        interrupted = await self._interrupt_open_work()
        log.info(
            "boot: requests left open by the last run marked interrupted count=%d", interrupted
        )
        await self._check()

        self.flusher_task = asyncio.create_task(self.flusher.run(), name="flusher")
        self.jobs = job_table(s, self.engine, self.instance, self.writer)
        self.scheduler = Scheduler(s.schedules(), self._run_job, s.job_misfire_grace_seconds)
        self.scheduler.start()
        self._start_metrics()
        self.gateway.booting = False

    def _log_ready(self) -> None:
        host, port = self.settings.host, self.port
        if self.worker is None:
            log.info("ready host=%s port=%d", host, port)
        else:  # the supervisor says `ready host=` once all its workers are
            log.info("ready worker=%d host=%s port=%d", self.worker, host, port)

    def wal_status(self) -> WalStatus:
        """The database and WAL backlog, for /api/health, admission and metrics (any thread)."""
        committed, end = self.flusher.committed, self.writer.end
        return WalStatus(
            database_up=self.flusher.database_ok,
            backlog_records=max(0, end.lsn - committed.lsn),
            backlog_bytes=self.flusher.backlog_bytes(),
            backlog_limit_bytes=self.settings.wal_backlog_limit_bytes,
            checkpoint=committed.lsn - 1,
            last_lsn=end.lsn - 1,
            disk_full=self.writer.full is not None,
        )

    def _new_flusher(self) -> Flusher:
        s = self.settings
        return Flusher(
            self.engine,
            s.wal_dir,
            self.instance,
            lambda: self.writer.end,
            interval=s.flush_interval_ms / 1000,
            batch_records=s.flush_batch_records,
            on_batch=self.metrics.batch_flushed,
        )

    # -- what the admin API asks of the daemon (admin.app.Operations) ------------------

    @property
    def backup_dir(self) -> Path:
        return self.settings.backup_dir

    @property
    def retention_days(self) -> int:
        return self.settings.retention_days

    @property
    def prune_batch_requests(self) -> int:
        return self.settings.prune_batch_requests

    def describe(self) -> dict[str, Any]:
        return status.describe(self)

    def provider_names(self) -> list[str]:
        return list(self.providers)

    async def set_provider_enabled(self, name: str, enabled: bool) -> None:
        """Stored first, so the switch outlives a restart; effective for the next request.

        Other instances on the database (other workers, other hosts) follow it
        within PROVIDER_REFRESH_SECONDS (`_follow_provider_switches`).
        """
        self._switches += 1
        await set_provider_enabled(self.engine, name, enabled)
        if enabled:
            self.router.disabled.discard(name)
        else:
            self.router.disabled.add(name)
        log.info(
            "provider %s by an operator provider=%s", "enabled" if enabled else "disabled", name
        )

    async def _follow_provider_switches(self) -> None:
        """Adopt the stored enabled flags, so a switch made through any instance reaches this one.

        A read that fails (database down) keeps the flags as they are; the next one retries.
        It ends when the daemon stops, and shutdown waits for it before closing the database.
        """
        while True:
            with anyio.move_on_after(PROVIDER_REFRESH_SECONDS):
                await self.stopping.wait()
            if self.stopping.is_set():
                return
            switches = self._switches
            try:
                states = await provider_states(self.engine)
            except (sa.exc.SQLAlchemyError, OSError) as exc:
                log.debug("provider switches not read error=%s", exc)
                continue
            if switches != self._switches:
                continue  # a switch here landed meanwhile; the next read includes it
            off = {name for name, row in states.items() if not row["enabled"]}
            disabled = off & set(self.providers)
            for name in disabled ^ self.router.disabled:
                now = "disabled" if name in disabled else "enabled"
                log.info("provider %s by an operator (stored) provider=%s", now, name)
            self.router.disabled.intersection_update(disabled)
            self.router.disabled.update(disabled)

    async def run_by_hand(self, name: str, job: Job) -> JobResult:
        result = await run_job(self.engine, name, job, self.instance, None, self._job_finished)
        assert result is not None  # only a scheduled run has a slot to lose
        return result

    async def restore(self, name: str) -> dict[str, Any]:
        """Restore a backup under the running daemon, then replay the WAL journaled since.

        Chat requests get 503 meanwhile; open ones may finish within the
        shutdown grace, the rest are interrupted. The flusher stops, the store
        is replaced, and a new flusher replays this instance's WAL from the
        restored checkpoint, as a boot would.
        """
        if self.worker is not None:
            raise Conflict(
                "a restore replaces the store under every worker, and this worker can pause "
                "only itself: stop llmsvc, then run `llmsvc restore`"
            )
        if self.gateway.paused is not None:
            raise Conflict(f"not now: {self.gateway.paused}")
        self.gateway.paused = f"llmsvc is restoring the backup {name}; requests resume after it"
        try:
            interrupted = await self.gateway.settle(self.settings.shutdown_grace_seconds)
            self.flusher.stop()
            await self.flusher_task
            await self.flusher.close()
            result = await self.run_by_hand("restore", lambda: self._restore(name))
        finally:
            self.flusher_task = asyncio.create_task(self.flusher.run(), name="flusher")
            self.gateway.paused = None
        if result.status != "ok":
            raise Conflict(f"the restore failed: {result.error}")
        return {**result.found, "interrupted_requests": interrupted}

    async def _restore(self, name: str) -> JobResult:
        described = await restore_database(self.engine, self.settings.backup_dir, name)
        self.flusher = self._new_flusher()  # starts at the restored checkpoint
        replayed = await replay(self.flusher, self.settings.wal_dir)
        found = {"restored": name, "created": described.created, **replayed}
        return JobResult(rows=replayed["replayed"], found=found)

    def _circuit_changed(self, name: str, circuit: Circuit) -> None:
        """Store a breaker's new state (off the request's path), so a restart resumes it."""
        log.warning(
            "circuit %s provider=%s failures=%d last_error=%s",
            circuit.state,
            name,
            circuit.failures,
            circuit.last_error,
        )
        task = asyncio.create_task(
            set_provider_circuit(
                self.engine, name, circuit.state, circuit.failures, circuit.last_error
            )
        )
        self._background.add(task)
        task.add_done_callback(self._stored)

    def _stored(self, task: asyncio.Task[None]) -> None:
        self._background.discard(task)
        if not task.cancelled() and task.exception() is not None:
            log.warning("circuit state not stored error=%s", task.exception())

    def _start_metrics(self) -> None:
        """`/metrics` on its own port, so scraping never shares the API's listener.

        A port that cannot be bound is logged, not fatal: the gateway's traffic
        matters more than its metrics, and Prometheus alerts on a target it
        cannot scrape (docs/DECISIONS.md). Worker k of a supervisor serves on
        metrics_port + k; 0 stays any free port.
        """
        host, port = self.settings.metrics_host, self.settings.metrics_port
        if port and self.worker is not None:
            port += self.worker
        try:
            self.metrics_server = MetricsServer.start(self.metrics.registry, host, port)
        except OSError as exc:
            log.error(
                "boot: metrics port not served, cannot listen on %s:%d (%s); "
                "set metrics_port to a free port, or 0 for any",
                host,
                port,
                exc.strerror or exc,
            )
            return
        log.info("boot: metrics port=%d host=%s", self.metrics_server.port, host)

    async def _interrupt_open_work(self) -> int:
        """Journal an `interrupted` end for every request this instance left `streaming`."""
        found = await open_work(self.engine, self.instance)
        for work in found:
            for attempt_id, tokens in work.attempts.items():
                self.journal.attempt_end(
                    attempt_id,
                    status="interrupted",
                    token_count=tokens,
                    error_code="restart",
                    error_message="llmsvc stopped before the reply ended",
                )
            self.journal.request_end(
                work.request_id,
                status="interrupted",
                error="llmsvc stopped before the reply ended",
            )
        if found:
            await self.flusher.drain(within=float("inf"))
        return len(found)

    async def _run_job(self, name: str, slot: datetime) -> None:
        """One scheduled run; with several daemons on the database, one of them runs a slot.

        Housekeeping of this instance's own WAL is the exception: each instance runs every slot.
        A database that cannot be reached misses the slot with one log line; the next runs.
        """
        try:
            await run_job(
                self.engine,
                name,
                self.jobs[name],
                self.instance,
                slot,
                self._job_finished,
                own_instance=name in INSTANCE_JOBS,
            )
        except (sa.exc.SQLAlchemyError, OSError) as exc:
            log.error("job %s missed slot=%s: %s", name, slot.isoformat(), describe_error(exc))
            self._job_finished(name, "failed", 0.0)

    def _job_finished(self, name: str, outcome: str, seconds: float) -> None:
        self.metrics.job_finished(name, outcome, seconds)
        self.job_runs[name] = {"last_run": iso(time.time() - seconds), "last_status": outcome}

    async def _check(self) -> None:
        """The consistency check, token holes refilled from the WAL first, stored as a run.

        Problems left after the refill are logged, never hidden.
        """
        self.notifier.status("booting: consistency check")
        started = datetime.now(UTC)
        report, repaired = await check_and_repair(self.engine, self.settings.wal_dir, self.repairs)
        await record_run(self.engine, "check", self.instance, started, as_result(report, repaired))
        for refill in repaired.get("refilled", []):
            log.info(
                "boot: token gap refilled from the WAL attempt=%s seqs=%s rows=%d",
                refill["attempt_id"],
                format_ranges(refill["seqs"], sep=","),
                refill["rows"],
            )
        for problem in report.problems:
            log.warning("boot: consistency problem: %s", problem)
        log.info(
            "boot: consistency check %s gaps=%d count_mismatches=%d",
            "ok" if report.ok else "found problems",
            len(report.gaps),
            len(report.mismatches),
        )

    async def _start_http(self) -> None:
        s = self.settings
        token = s.admin_token
        app = AdminApi(self.gateway, token.get_secret_value() if token else None, self)
        descriptors = descriptor_limit()
        limits = HttpLimits(
            max_header_bytes=s.max_header_bytes,
            header_timeout=s.request_header_timeout_seconds,
            body_timeout=s.request_body_timeout_seconds,
            max_connections=connection_bound(s.max_connections, descriptors),
            refused=self.metrics.http_refusal,
        )
        if limits.max_connections < s.max_connections:
            asked = "max_connections" in s.model_fields_set  # a default lowered is no news
            log.log(
                logging.WARNING if asked else logging.INFO,
                "boot: max_connections lowered to %d to fit the descriptor limit of %d "
                "(RLIMIT_NOFILE; raise it, e.g. LimitNOFILE= in the systemd unit)",
                limits.max_connections,
                descriptors,
            )
        log.info(
            "boot: http limits max_connections=%d max_header_bytes=%d header_timeout=%g "
            "body_timeout=%g keepalive_timeout=%d descriptors=%d",
            limits.max_connections,
            limits.max_header_bytes,
            limits.header_timeout,
            limits.body_timeout,
            s.keepalive_timeout_seconds,
            descriptors,
        )
        config = uvicorn.Config(
            app,
            host=s.host,
            port=s.port,
            loop="none",
            http=protocol_class(limits),
            ws="none",
            lifespan="off",
            log_config=None,
            access_log=False,
            server_header=False,
            timeout_keep_alive=s.keepalive_timeout_seconds,
            timeout_graceful_shutdown=5,
        )
        self.server = _EmbeddedServer(config)
        sockets = []
        if self.worker is not None:  # the port is shared with the other workers
            try:
                sockets.append(shared_port_socket(self.settings.host, self.settings.port, True))
            except OSError as exc:
                address = f"{self.settings.host}:{self.settings.port}"
                raise LlmsvcError(f"cannot listen on {address}: {exc.strerror or exc}") from None
        self.http_task = asyncio.create_task(self._serve(sockets), name="http")
        while not self.server.started:
            if self.http_task.done():
                address = f"{self.settings.host}:{self.settings.port}"
                raise LlmsvcError(f"cannot listen on {address} (in use, or not an address here)")
            await asyncio.sleep(0.01)
        self.port = self.server.servers[0].sockets[0].getsockname()[1]  # the real one for port 0

    async def _serve(self, sockets: list[socket.socket]) -> None:
        with contextlib.suppress(SystemExit):  # uvicorn exits when it cannot bind
            await self.server.serve(sockets or None)

    async def shutdown(self) -> None:
        """Each step in its own try, so one failure does not skip the rest."""
        grace = 0.0 if self.fatal else self.settings.shutdown_grace_seconds
        if hasattr(self, "gateway"):
            with _step("requests finished"):
                n = await self.gateway.finish_requests(grace)
                log.info("shutdown: open requests interrupted count=%d", n)
        if hasattr(self, "server"):
            with _step("http server stopped"):
                self.server.should_exit = True
                await asyncio.wait_for(self.http_task, timeout=10)
        for provider in self.providers.values():
            with _step(f"provider {provider.name} closed"):
                await provider.close()
        if hasattr(self, "writer"):
            with _step("wal synced"):
                await self.writer.close()
        if hasattr(self, "flusher_task"):
            with _step("wal drained"):
                self.notifier.status("stopping: draining the WAL into the database")
                self.flusher.stop()
                await self.flusher_task
                if not self.fatal and not await self.flusher.drain(within=30):
                    left = self.writer.end.lsn - 1 - self.flusher.checkpoint
                    log.warning(
                        "shutdown: records left in the WAL for the next boot count=%d", left
                    )
                await self.flusher.close()
        if hasattr(self, "scheduler"):
            with _step("scheduler stopped"):
                await self.scheduler.shutdown(grace=JOB_SHUTDOWN_GRACE)
        if hasattr(self, "metrics_server"):  # after the drain, so it can be watched
            with _step("metrics port closed"):
                await asyncio.to_thread(self.metrics_server.stop)
        if hasattr(self, "follower"):
            with _step("provider switches no longer followed"):
                await asyncio.wait_for(self.follower, timeout=10)
        if hasattr(self, "engine"):
            with _step("database closed"):
                await self.engine.dispose()
        self.lock.release()
        log.info("shutdown: done exit_code=%d", EXIT_FATAL if self.fatal else EXIT_OK)

    async def _watchdog(self, interval: float) -> None:
        """Ping systemd every `interval` while the loop runs this and the flusher is alive.

        A stalled event loop never gets here; a stalled flusher makes it stop,
        and systemd restarts the daemon, whose boot replays the WAL.
        """
        was_stalled = False
        while True:
            stalled = self._stalled(interval)
            if stalled is None:
                self.notifier.watchdog()
                if was_stalled:
                    log.info("watchdog: healthy again, pinging systemd")
            elif not was_stalled:
                log.error("watchdog: not telling systemd all is well: %s", stalled)
            was_stalled = stalled is not None
            await asyncio.sleep(interval)

    def _stalled(self, interval: float) -> str | None:
        """Why the daemon is not healthy, or None."""
        if self.flusher_task.done():
            return "the flusher has stopped"
        idle = time.monotonic() - self.flusher.last_cycle
        if idle > max(FLUSHER_STALL_SECONDS, 2 * interval):
            return f"the flusher has not cycled for {idle:.0f} s"
        return None

    def _on_fatal(self, exc: WalFatal) -> None:
        self.fatal = exc
        self.stopping.set()

    async def _watch_signals(self) -> None:
        with anyio.open_signal_receiver(signal.SIGTERM, signal.SIGINT) as signals:
            async for signum in signals:
                name = signal.Signals(signum).name
                if self.stopping.is_set():
                    log.warning("second %s: exiting now; the WAL keeps what was journaled", name)
                    os._exit(EXIT_FATAL)
                log.info("%s received: shutting down", name)
                self.stopping.set()
                self.booting.cancel()  # no effect once booted


def _tune_gc() -> None:
    """Keep the cyclic collector off the hot path once the daemon is up.

    Boot's objects (modules, pools, settings) live as long as the process:
    frozen, no collection scans them again; left in, each full collection
    walked them all (up to 140 ms with 300 open streams). Collecting the young
    generation every 10,000 allocations instead of 700 cuts the collector's
    CPU per streamed token about fivefold; each pass stays a few milliseconds.
    """
    gc.collect()
    gc.freeze()
    gc.set_threshold(10_000, 50, 50)


@contextlib.contextmanager
def _step(name: str) -> Iterator[None]:
    try:
        yield
        log.info("shutdown: %s", name)
    except Exception:
        log.exception("shutdown: step failed step=%r", name)

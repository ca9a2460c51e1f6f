"""The daemon: boot, serve, shut down — ordered steps, one log line each.

Boot needs no database: WAL lock → WAL repaired and opened (the checkpoint
hint kept beside it, `llmsvc.local`) → provider switches (and with `auth =
"keys"` the callers' keys) from the local copy → HTTP server and metrics
port: ready, chat requests are journaled from here on. Then, in the
background, the catch-up (`llmsvc.catchup`), each step retried while the
database is away: migrations → stored provider switches and circuits → the
keys (followed from here on) → the database's checkpoint → the WAL replayed
up to where the previous run ended → requests that run left open journaled `interrupted` →
the flusher follows the writer → consistency check → scheduler.
Shutdown: refuse new requests (503) → let open ones finish within
`shutdown_grace_seconds`, interrupt the rest → stop the HTTP server → let the
catch-up finish → sync the WAL → drain it into the database (the catch-up and
the drain together within `shutdown_drain_seconds`) → stop the scheduler →
close the metrics port → close pools. Every step is bounded: whatever the database does, the daemon
ends within shutdown_grace_seconds + shutdown_drain_seconds + 40 s (interrupted
requests journal their ends within 10 s, the HTTP server stops within 10 s,
jobs get 5 s, tasks and pools 2 s each), leaving what is not drained in the
WAL for the next boot.
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
import uuid
from collections.abc import Awaitable, Iterator
from datetime import UTC, datetime
from typing import Any

import anyio
import sqlalchemy as sa
import uvicorn

from llmsvc import status
from llmsvc.admin.app import AdminApi
from llmsvc.catchup import CatchUp
from llmsvc.config import Settings, systemd_environment
from llmsvc.errors import Conflict, LlmsvcError, WalFatal
from llmsvc.gateway.app import Gateway
from llmsvc.gateway.attribution import deployment_fields
from llmsvc.gateway.breaker import CLOSED, Breakers, Circuit
from llmsvc.gateway.http_protocol import (
    HttpLimits,
    connection_bound,
    descriptor_limit,
    protocol_class,
)
from llmsvc.gateway.journal import Journal
from llmsvc.gateway.router import RetryPolicy, Router
from llmsvc.keytable import KeyTable
from llmsvc.limits import Limiter
from llmsvc.local import read_checkpoint
from llmsvc.logs import logger
from llmsvc.maintenance.backup import restore_database
from llmsvc.maintenance.consistency import as_result, check_and_repair, format_ranges
from llmsvc.maintenance.jobs import INSTANCE_JOBS, job_table, schedules
from llmsvc.maintenance.retention import ensure_partitions
from llmsvc.maintenance.runs import Job, JobResult, record_run, run_job
from llmsvc.maintenance.scheduler import Scheduler
from llmsvc.metrics import Metrics, MetricsServer, WalStatus
from llmsvc.providers import build_provider
from llmsvc.providers.base import Provider
from llmsvc.status import iso
from llmsvc.store.engine import DAEMON_APPLICATION, create_engine, describe_error, migrate
from llmsvc.store.flusher import Flusher, load_checkpoint
from llmsvc.store.queries import open_work, set_provider_circuit, stored_reply
from llmsvc.store.replay import replay
from llmsvc.supervisor import shared_port_socket
from llmsvc.switches import Switches
from llmsvc.systemd import Notifier
from llmsvc.tokens import count_completion, count_prompt
from llmsvc.wal.reader import Position
from llmsvc.wal.segment import WalLock, instance_id
from llmsvc.wal.writer import WalWriter

log = logger(__name__)

EXIT_OK, EXIT_FATAL = 0, 1
SLOW_SECONDS = 5.0  # a database call unanswered this long is a stall: health says degraded
WAL_STUCK_SECONDS = 10.0  # a WAL write lasting this long is a frozen disk: the watchdog stops
WATCH_SECONDS = 1.0  # how often the daemon looks at its own health
JOB_SHUTDOWN_GRACE = 5.0  # seconds a running maintenance job gets to end before it is cancelled
CLOSE_SECONDS = 2.0  # shutdown's bound on ending a task or closing a pool


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
        self.supervisor = os.getppid() if worker is not None else None
        self.orphaned = False  # a worker whose supervisor died: it stops without the grace
        self.started = time.monotonic()
        self.job_runs: dict[str, dict[str, Any]] = {}  # this instance's last run of each job
        self._background: set[asyncio.Task[None]] = set()
        self.notifier = Notifier(*systemd_environment())
        self.stopping = asyncio.Event()
        self.fatal: WalFatal | None = None
        self.failure: str | None = None  # why the boot failed
        self.stop_reason = "stopped"  # the signal that stopped it, once one has
        self.lock = WalLock(settings.wal_dir)
        self.providers: dict[str, Provider] = {}
        self.catch_up = CatchUp(self.notifier.status)
        self.checkpoint_loaded = False  # the flusher starts from the database's checkpoint
        self._flush_to: Position | None = None  # where the flusher stops until the catch-up ends

    async def run(self) -> int:
        """Boot, serve until a signal or a fatal WAL error, shut down; return the exit code.

        The last log line says the exit code and why, whatever ended the daemon.
        """
        self.booting = anyio.CancelScope()
        try:
            async with anyio.create_task_group() as signals:
                signals.start_soon(self._watch_signals)
                try:
                    with self.booting:  # a signal during a long WAL repair stops the boot
                        await self.boot()
                    if not self.booting.cancelled_caught:
                        self._log_ready()
                        _tune_gc()
                        self.notifier.ready(f"serving on {self.settings.host}:{self.port}")
                        signals.start_soon(self.metrics.watch_loop)
                        signals.start_soon(self._watch)
                        await self.stopping.wait()
                except Exception as exc:  # the port in use, the WAL locked, a bug: undo the boot
                    self.failure = f"boot failed: {_describe(exc)}"
                    known = isinstance(exc, LlmsvcError | OSError)  # else a bug: keep the trace
                    log.error("%s", self.failure, exc_info=None if known else exc)
                finally:
                    self.notifier.stopping("stopping: finishing open requests")
                    await self.shutdown()
                    signals.cancel_scope.cancel()
                    self.notifier.close()
        except BaseExceptionGroup as group:  # a bug in a watching task, wrapped by the group
            if len(group.exceptions) == 1:
                raise group.exceptions[0] from None
            raise
        code, reason = self._outcome()
        log.log(
            logging.ERROR if code else logging.INFO, "shutdown: done", exit_code=code, reason=reason
        )
        return code

    def _outcome(self) -> tuple[int, str]:
        """The exit code and its reason: a failed boot, a fatal WAL error, or the signal."""
        if self.failure is not None:
            return EXIT_FATAL, self.failure
        if self.fatal is not None:
            return EXIT_FATAL, f"fatal WAL error: {self.fatal}"
        return EXIT_OK, self.stop_reason

    async def boot(self) -> None:
        """Up to serving, from local state only; the database is the catch-up's (`_catch_up`)."""
        s = self.settings
        self.lock.acquire()
        self.instance = instance_id(s.wal_dir)
        log.info("boot: wal locked", dir=s.wal_dir, instance=self.instance)

        self.notifier.status("booting: opening the WAL")
        # The daemon's own calls are bounded per command; maintenance (jobs, migrations,
        # the check) may run for minutes, so only its connecting is.
        timeout = s.database_timeout_seconds
        self.engine = create_engine(s.database_url, DAEMON_APPLICATION, timeout, per_command=True)
        self.maintenance = create_engine(s.database_url, DAEMON_APPLICATION, timeout)
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
        hint = read_checkpoint(s.wal_dir)
        self.repairs = self.writer.open(asyncio.get_running_loop(), self._on_fatal, hint)
        self.journal = Journal(
            self.writer, deployment_fields(s.deployment_environment, s.deployment_version)
        )
        self._flush_to = self.boot_end = self.writer.end  # the previous runs' records end here
        self.flusher = self._new_flusher()
        await self.flusher.start(hint)  # for the backlog's figures: nothing is flushed yet

        self.providers = {p.name: build_provider(p) for p in s.providers}
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
        self.switches = Switches(self.engine, self.router, set(self.providers), s.wal_dir)
        self.switches.load_local()
        self.keys: KeyTable | None = None
        if s.auth == "keys":
            self.keys = KeyTable(self.engine, s.wal_dir)
            self.keys.load_local()
        self.metrics.watch(self.wal_status)
        self.metrics.watch_daemon(lambda: status.daemon_state(self))
        self.limiter = Limiter(
            self.engine,
            self.instance,
            lambda: self.flusher.checkpoint,
            lambda: self.keys is not None and self.keys.limited,
        )
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
            keys=self.keys,
            limiter=self.limiter,
        )
        await self._start_http()
        self._start_metrics()
        self.catching_up = asyncio.create_task(self._catch_up(), name="catch-up")

    async def _catch_up(self) -> None:
        """What boot owes the store, in order, each step retried while the database is away."""
        s, step = self.settings, self.catch_up.run
        await step("migrating the database", self._migrate)
        log.info("boot: schema at head", database=s.redacted_database_url())
        await step("reading the provider switches", self._adopt_provider_states)
        if self.keys is not None:
            await step("reading the keys", self.keys.read)
            self.keys_follower = asyncio.create_task(self.keys.follow(self.stopping), name="keys")
        await step("reading the checkpoint", self._load_checkpoint)
        behind = self.boot_end.lsn - 1 - self.flusher.checkpoint
        await step(
            f"replaying {behind} WAL records",
            lambda: replay(self.flusher, "boot", self.flusher.checkpoint),
        )
        interrupted = await step(
            "marking requests the last run left open interrupted", self._interrupt_open_work
        )
        log.info("boot: requests left open by the last run marked interrupted", count=interrupted)
        self._flush_to = None  # what this run journaled follows
        self.flusher_task = asyncio.create_task(self.flusher.run(), name="flusher")
        self.follower = asyncio.create_task(
            self.switches.follow(self.stopping), name="provider-switches"
        )
        self.limits_task = asyncio.create_task(self.limiter.follow(self.stopping), name="limits")
        await step("checking the store", self._check)
        self.jobs = job_table(s, self.maintenance, self.instance, self.writer)
        if not self.stopping.is_set():  # no jobs to start in a shutdown
            self.scheduler = Scheduler(schedules(s), self._run_job, s.job_misfire_grace_seconds)
            self.scheduler.start()
        self.catch_up.done()
        log.info("boot: caught up with the database")
        self.notifier.status(f"serving on {s.host}:{self.port}")

    async def _migrate(self) -> None:
        await migrate(self.maintenance, self.settings.redacted_database_url())
        await ensure_partitions(self.maintenance, self.settings.token_partition_ahead_days)

    async def _adopt_provider_states(self) -> None:
        """The stored switches, and stored circuits for providers not called since boot."""
        states = await self.switches.read()
        breakers = self.router.breakers
        for name, row in states.items():
            circuit = breakers.circuit(name) if name in self.providers else None
            untouched = circuit is not None and circuit.state == CLOSED and not circuit.outcomes
            if untouched and row["circuit_state"] != CLOSED:
                since = row["updated_at"].timestamp()
                breakers.restore(name, row["circuit_state"], row["failure_count"], since)
                log.info("boot: circuit %s", row["circuit_state"], provider=name)

    async def _load_checkpoint(self) -> None:
        """Resume the flusher at the database's checkpoint, never past where the log ended.

        A checkpoint past it means a power loss took the log's unsynced tail after
        the flusher had stored it: the LSNs after the log's end are this run's.
        """
        stored = await load_checkpoint(self.engine, self.instance)
        last = self.boot_end.lsn - 1
        if stored > last:
            log.warning(
                "boot: the database holds records of this instance up to lsn=%d but the WAL "
                "ends at lsn=%d (its unsynced tail was lost); records after it are this run's",
                stored,
                last,
            )
            stored = last
        if stored != self.flusher.checkpoint:
            await self.flusher.start(stored)
        self.checkpoint_loaded = True

    def _log_ready(self) -> None:
        host, port = self.settings.host, self.port
        if self.worker is None:
            log.info("ready", host=host, port=port, auth=self.settings.auth)
        else:  # the supervisor says `ready host=` once all its workers are
            log.info("ready", worker=self.worker, host=host, port=port)

    def wal_status(self) -> WalStatus:
        """The database and WAL backlog, for /api/health, admission and metrics (any thread)."""
        committed, end = self.flusher.committed, self.writer.end
        problem = self._database_problem()
        return WalStatus(
            database_up=problem is None,
            backlog_records=max(0, end.lsn - committed.lsn),
            backlog_bytes=self.flusher.backlog_bytes(),
            backlog_limit_bytes=self.settings.wal_backlog_limit_bytes,
            checkpoint=committed.lsn - 1,
            last_lsn=end.lsn - 1,
            disk_full=self.writer.full is not None,
            database_problem=problem,
            catching_up=self.catch_up.describe(problem),
        )

    def _stalled(self) -> float | None:
        """For how long the database has not answered a call of the daemon's, if it is a stall.

        A stall: unanswered for SLOW_SECONDS, or given up (a timeout) and not answered since.
        """
        now, waits = time.monotonic(), []
        for since, timed_out in (
            (self.flusher.waiting_since, not self.flusher.database_ok),
            (self.switches.waiting_since, self.switches.error is not None),
        ):
            if since is not None and (timed_out or now - since >= SLOW_SECONDS):
                waits.append(now - since)
        return max(waits, default=None)

    def _database_problem(self) -> str | None:
        """Why the database is not taking the daemon's calls, in words; None while it is."""
        if (waited := self._stalled()) is not None:
            return f"the database has not answered for {waited:.0f} s"
        error = (
            (not self.flusher.database_ok and self.flusher.last_error)
            or self.switches.error
            or self.catch_up.error
        )
        return f"the database is unreachable: {error}" if error else None

    def _new_flusher(self) -> Flusher:
        s = self.settings
        return Flusher(
            self.engine,
            s.wal_dir,
            self.instance,
            lambda: self._flush_to or self.writer.end,
            interval=s.flush_interval_ms / 1000,
            batch_records=s.flush_batch_records,
            on_batch=self.metrics.batch_flushed,
            timeout=s.database_timeout_seconds,
        )

    # -- what the admin API asks of the daemon (admin.app.Operations) ------------------

    def describe(self) -> dict[str, Any]:
        return status.describe(self)

    def provider_names(self) -> list[str]:
        return list(self.providers)

    async def set_provider_enabled(self, name: str, enabled: bool) -> None:
        """Stored first; other instances on the database follow it within 2 s (`Switches`)."""
        await self.switches.switch(name, enabled)

    async def keys_changed(self) -> None:
        """A key or team changed through this instance: in force here at once, elsewhere
        within 2 s; a failed read leaves it to the next refresh."""
        if self.keys is not None:
            try:
                await self.keys.read()
            except Exception as exc:
                log.warning("keys not read after a change", error=describe_error(exc))

    async def run_by_hand(self, name: str, job: Job) -> JobResult:
        result = await run_job(self.maintenance, name, job, self.instance, None, self._job_finished)
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
        if self.catch_up.step is not None:
            raise Conflict(
                f"not now: llmsvc is catching up with the database ({self.catch_up.step})"
            )
        if self.gateway.paused is not None:
            raise Conflict(f"not now: {self.gateway.paused}")
        self.gateway.paused = f"llmsvc is restoring the backup {name}; requests resume after it"
        try:
            interrupted = await self.gateway.settle(self.settings.shutdown_grace_seconds, "restore")
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
        await self.engine.dispose()  # SQLite: no connection of ours may hold the file meanwhile
        described, kept = await restore_database(self.maintenance, self.settings.backup_dir, name)
        self.flusher = self._new_flusher()  # starts at the restored checkpoint
        replayed = await replay(self.flusher, "restore")
        found = {"restored": name, "created": described.created, **replayed, **kept}
        return JobResult(rows=replayed["replayed"], found=found)

    def _circuit_changed(self, name: str, circuit: Circuit) -> None:
        """Store a breaker's new state (off the request's path), so a restart resumes it."""
        log.warning(
            "circuit %s",
            circuit.state,
            provider=name,
            failures=circuit.failures,
            last_error=circuit.last_error,
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
            log.warning("circuit state not stored", error=task.exception())

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
        log.info("boot: metrics", port=self.metrics_server.port, host=host)

    async def _interrupt_open_work(self) -> int:
        """Journal an `interrupted` end for every request a previous run left `streaming`.

        The flusher has stored the previous runs' records and none of this
        run's, so what is still open is theirs.
        """
        found = await open_work(self.maintenance, self.instance)
        journaled: list[Awaitable[int]] = []
        for work in found:
            for attempt_id, tokens in work.attempts.items():
                self.journal.attempt_end(
                    attempt_id,
                    status="interrupted",
                    token_count=tokens,
                    error_code="restart",
                    error_message="llmsvc stopped before the reply ended",
                )
            journaled.append(
                self.journal.request_end(
                    work.request_id,
                    status="interrupted",
                    error="llmsvc stopped before the reply ended",
                    **await self._counted_usage(work.request_id),
                )
            )
        if journaled:
            await asyncio.shield(journaled[-1])
        return len(found)

    async def _counted_usage(self, request_id: uuid.UUID) -> dict[str, Any]:
        """An unended request's tokens, counted from what the store holds, and their cost."""
        reply = await stored_reply(self.maintenance, request_id)
        if reply is None or not reply.deltas:
            return {}  # nothing received: nothing known billed
        completion, completion_source = count_completion(reply.model, [reply.texts], reply.deltas)
        prompt, prompt_source = count_prompt(reply.model, reply.messages)
        return {
            "prompt_tokens": prompt,
            "completion_tokens": completion,
            "prompt_tokens_source": prompt_source,
            "completion_tokens_source": completion_source,
            "provider": reply.provider,
            "cost": self.router.cost(reply.provider, reply.model, prompt, completion),
        }

    async def _run_job(self, name: str, slot: datetime) -> None:
        """One scheduled run; with several daemons on the database, one of them runs a slot.

        Housekeeping of this instance's own WAL is the exception: each instance runs every slot.
        A database that cannot be reached misses the slot with one log line; the next runs.
        """
        try:
            await run_job(
                self.maintenance,
                name,
                self.jobs[name],
                self.instance,
                slot,
                self._job_finished,
                own_instance=name in INSTANCE_JOBS,
            )
        except (sa.exc.SQLAlchemyError, OSError) as exc:
            log.error("job %s missed", name, slot=slot.isoformat(), error=describe_error(exc))
            self._job_finished(name, "failed", 0.0)

    def _job_finished(self, name: str, outcome: str, seconds: float) -> None:
        self.metrics.job_finished(name, outcome, seconds)
        self.job_runs[name] = {"last_run": iso(time.time() - seconds), "last_status": outcome}

    async def _check(self) -> None:
        """The consistency check, token holes refilled from the WAL first, stored as a run.

        Problems left after the refill are logged, never hidden.
        """
        started = datetime.now(UTC)
        engine, wal_dir = self.maintenance, self.settings.wal_dir
        report, repaired = await check_and_repair(engine, wal_dir, self.repairs)
        await record_run(engine, "check", self.instance, started, as_result(report, repaired))
        for refill in repaired.get("refilled", []):
            log.info(
                "boot: token gap refilled from the WAL",
                attempt=refill["attempt_id"],
                seqs=format_ranges(refill["seqs"], sep=","),
                rows=refill["rows"],
            )
        for problem in report.problems:
            log.warning("boot: consistency problem: %s", problem)
        log.info(
            "boot: consistency check %s",
            "ok" if report.ok else "found problems",
            gaps=len(report.gaps),
            count_mismatches=len(report.mismatches),
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
            "boot: http limits",
            max_connections=limits.max_connections,
            max_header_bytes=limits.max_header_bytes,
            header_timeout=limits.header_timeout,
            body_timeout=limits.body_timeout,
            keepalive_timeout=s.keepalive_timeout_seconds,
            descriptors=descriptors,
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
        """Each step in its own try and bounded, so no failure and no database stops the next."""
        s = self.settings
        grace = 0.0 if self.fatal or self.orphaned else s.shutdown_grace_seconds
        if hasattr(self, "gateway"):
            with _step("requests finished"):
                n = await self.gateway.finish_requests(grace)
                log.info("shutdown: open requests interrupted", count=n)
        if hasattr(self, "server"):
            with _step("http server stopped"):
                self.server.should_exit = True
                await asyncio.wait_for(self.http_task, timeout=10)
        for provider in self.providers.values():
            with _step(f"provider {provider.name} closed"):
                await provider.close()
        deadline = time.monotonic() + s.shutdown_drain_seconds
        if hasattr(self, "catching_up"):  # it may journal: before the WAL closes
            with _step("catch-up ended"):
                await self._end_catch_up(deadline)
        if hasattr(self, "writer"):
            with _step("wal synced"):
                await self.writer.close()
        if hasattr(self, "catching_up"):
            with _step("wal drained"):
                await self._drain(deadline)
        if hasattr(self, "scheduler"):
            with _step("scheduler stopped"):
                await self.scheduler.shutdown(grace=JOB_SHUTDOWN_GRACE)
        if hasattr(self, "metrics_server"):  # after the drain, so it can be watched
            with _step("metrics port closed"):
                await asyncio.to_thread(self.metrics_server.stop)
        if hasattr(self, "follower"):
            with _step("provider switches no longer followed"):
                await _end(self.follower, CLOSE_SECONDS)  # it ends when it sees `stopping`
        if hasattr(self, "keys_follower"):
            with _step("keys no longer followed"):
                await _end(self.keys_follower, CLOSE_SECONDS)
        if hasattr(self, "limits_task"):
            with _step("rate limits no longer shared"):
                await _end(self.limits_task, CLOSE_SECONDS)
        for task in list(self._background):  # circuit states being stored
            task.cancel()
        if hasattr(self, "engine"):
            with _step("database closed"):
                await self._close_pools()
        self.lock.release()

    async def _end_catch_up(self, deadline: float) -> None:
        """Let the catch-up go on until `deadline` while the database answers; else stop it."""
        catching_up = self.catching_up
        while not (catching_up.done() or self.fatal or self._database_problem()):
            if time.monotonic() >= deadline:
                break
            await asyncio.wait({catching_up}, timeout=0.1)
        await _end(catching_up, 0.0)

    async def _drain(self, deadline: float) -> None:
        """Flush what is journaled before `deadline`; what is left stays for the next boot."""
        self.flusher.stop()
        if hasattr(self, "flusher_task"):
            await _end(self.flusher_task, CLOSE_SECONDS)
        if self.checkpoint_loaded and not self.fatal:
            # Every request of this run has ended (journaled): nothing is marked by mistake.
            self._flush_to = None
            self.notifier.status("stopping: draining the WAL into the database")
            await self.flusher.drain(max(0.0, deadline - time.monotonic()))
        left = self.writer.end.lsn - 1 - self.flusher.checkpoint
        if left > 0:
            log.warning("shutdown: records left in the WAL for the next boot", count=left)
        await self.flusher.close()

    async def _close_pools(self) -> None:
        """Close the pools' connections; drop them (the process ends) if the database is away."""
        close = not hasattr(self, "switches") or self._database_problem() is None
        for engine in (self.engine, self.maintenance):
            try:
                await asyncio.wait_for(engine.dispose(close=close), CLOSE_SECONDS)
            except TimeoutError:
                log.warning("shutdown: database connections dropped: no answer to closing them")

    async def _watch(self) -> None:
        """Log a database stall, and ping systemd's watchdog while the daemon is alive.

        Alive is the event loop running this, the WAL taking appends, and no task
        dead of a bug: a stalled or lost database is what the WAL absorbs, so it
        is logged and shown in health, never a reason to be killed.
        """
        interval = self.notifier.watchdog_interval
        tick = min(WATCH_SECONDS, interval or WATCH_SECONDS)  # a ping at least every interval
        was_unwell, stalled = False, False
        while not self.stopping.is_set():
            stall = self._stalled() is not None
            if stall and not stalled:
                log.warning(
                    "database stalled: %s; requests are journaled in the WAL",
                    self._database_problem(),
                )
            elif stalled and not stall:
                log.info("database stall over")
            stalled = stall
            if interval is not None:
                unwell = self._unwell(interval)
                if unwell is None:
                    self.notifier.watchdog()
                if unwell is None and was_unwell:
                    log.info("watchdog: healthy again, pinging systemd")
                elif unwell is not None and not was_unwell:
                    log.error("watchdog: not telling systemd all is well: %s", unwell)
                was_unwell = unwell is not None
            await asyncio.sleep(tick)

    def _unwell(self, interval: float) -> str | None:
        """Why the daemon cannot serve or will never store again, or None."""
        if self.catching_up.done() and self.catch_up.step is not None:
            return "the catch-up with the database has stopped"
        if hasattr(self, "flusher_task") and self.flusher_task.done():
            return "the flusher has stopped"
        return self.writer.stuck(max(WAL_STUCK_SECONDS, 2 * interval))

    def _on_fatal(self, exc: WalFatal) -> None:
        self.fatal = exc
        self.stopping.set()

    async def _watch_signals(self) -> None:
        with anyio.open_signal_receiver(signal.SIGTERM, signal.SIGINT) as signals:
            async for signum in signals:
                name = signal.Signals(signum).name
                if self.stopping.is_set():
                    reason = f"second {name}: exiting now; the WAL keeps what was journaled"
                    log.error("shutdown: done", exit_code=EXIT_FATAL, reason=reason)
                    os._exit(EXIT_FATAL)
                self.stop_reason = f"{name} received"
                if self.supervisor is not None and os.getppid() != self.supervisor:
                    self.orphaned = True
                    self.stop_reason = f"{name} received, the supervisor is gone"
                    log.warning("%s received, the supervisor is gone: stopping without grace", name)
                else:
                    log.info("%s received: shutting down", name)
                self.stopping.set()
                self.booting.cancel()  # no effect once booted


def _describe(exc: Exception) -> str:
    """An error as an operator reads it: llmsvc's own by its message, others with their type."""
    if isinstance(exc, LlmsvcError):
        return str(exc)
    return f"{type(exc).__name__}: {exc}"


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


async def _end(task: asyncio.Task[Any], within: float) -> None:
    """Give `task` up to `within` seconds to end, then cancel it (and wait CLOSE_SECONDS more)."""
    if not (await asyncio.wait({task}, timeout=max(0.0, within)))[0]:
        task.cancel()
        await asyncio.wait({task}, timeout=CLOSE_SECONDS)
    if task.done() and not task.cancelled() and task.exception() is not None:
        log.error("shutdown: task %s had failed", task.get_name(), exc_info=task.exception())


@contextlib.contextmanager
def _step(name: str) -> Iterator[None]:
    try:
        yield
        log.info("shutdown: %s", name)
    except Exception:
        log.exception("shutdown: step failed", step=repr(name))

"""A running daemon's parts as operators reach them: what they do to it, and what they read of it.

The actions are the admin API's (`llmsvc.admin.app.Operations`): provider
switches, keys changed, jobs run by hand or on schedule, a restore under the
running daemon. The state is what `llmsvc.status` shows in /api/health, the
admin status and metrics: the database's and the WAL's, the providers', the
jobs' last runs. The daemon (`llmsvc.daemon`) builds one at boot and runs it;
a restore swaps its flusher.
"""

from __future__ import annotations

import asyncio
import os
import time
import uuid
from collections.abc import Callable
from datetime import datetime
from typing import Any

import sqlalchemy as sa

from llmsvc import status
from llmsvc.config import Settings, worker_group
from llmsvc.errors import Conflict, WalFatal
from llmsvc.gateway.app import Gateway
from llmsvc.gateway.attribution import deployment_fields
from llmsvc.gateway.breaker import Breakers, Circuit
from llmsvc.gateway.conversations import Conversations
from llmsvc.gateway.journal import Journal
from llmsvc.gateway.router import Router
from llmsvc.gateway.sessions import Sessions
from llmsvc.gateway.tracing import Tracing
from llmsvc.keytable import KeyTable
from llmsvc.limits import Limiter
from llmsvc.logs import logger
from llmsvc.maintenance.backup import restore_database
from llmsvc.maintenance.jobs import INSTANCE_JOBS
from llmsvc.maintenance.runs import Job, JobResult, run_job
from llmsvc.maintenance.scheduler import Scheduler
from llmsvc.metrics import Metrics, WalStatus
from llmsvc.providers import build_provider
from llmsvc.providers.base import Provider
from llmsvc.siblings import Siblings, address
from llmsvc.status import CatchUp, iso
from llmsvc.store.engine import DAEMON_APPLICATION, create_engine, describe_error
from llmsvc.store.flush_process import ChildConfig
from llmsvc.store.flusher import Flusher
from llmsvc.store.queries import set_provider_circuit
from llmsvc.store.replay import replay
from llmsvc.switches import Switches
from llmsvc.wal import Position, Repairs, WalWriter

log = logger(__name__)

SLOW_SECONDS = 5.0  # a database call unanswered this long is a stall: health says degraded


class Operations:
    """One daemon's providers, switches, keys, flusher and jobs; `worker` as in `Daemon`."""

    def __init__(
        self,
        settings: Settings,
        worker: int | None,
        instance: uuid.UUID,
        writer: WalWriter,
        repairs: Repairs,
        metrics: Metrics,
        catch_up: CatchUp,
        fatal: Callable[[], WalFatal | None],
    ) -> None:
        s = settings
        self.settings, self.worker, self.instance = settings, worker, instance
        # The daemon's own calls are bounded per command; maintenance (jobs, migrations,
        # the check) may run for minutes, so only its connecting is.
        timeout = s.database_timeout_seconds
        self.engine = engine = create_engine(
            s.database_url, DAEMON_APPLICATION, timeout, per_command=True
        )
        self.maintenance = create_engine(s.database_url, DAEMON_APPLICATION, timeout)
        metrics.describe_build(engine.dialect.name)
        self.writer, self.metrics, self.catch_up = writer, metrics, catch_up
        self.repairs = repairs  # what the WAL's open found and repaired
        self.fatal = fatal  # the WAL error stopping the daemon, if one is
        self.started = time.monotonic()
        self.flush_to: Position | None = writer.end  # the flusher's end until the catch-up's
        self.flusher = self.new_flusher()
        self.flusher_task: asyncio.Task[None] | None = None  # started by the catch-up
        self.scheduler: Scheduler | None = None  # started by the catch-up
        self.jobs: dict[str, Job] = {}
        self.job_runs: dict[str, dict[str, Any]] = {}  # this instance's last run of each job
        self.circuits_storing: set[asyncio.Task[None]] = set()
        self.providers: dict[str, Provider] = {p.name: build_provider(p) for p in s.providers}
        breakers = Breakers(s.circuit_policy(), on_change=self._circuit_changed)
        self.router = Router(s.providers, self.providers, breakers, s.routes, s.prices)
        self.switches = Switches(engine, self.router, set(self.providers), s.wal_dir)
        self.switches.load_local()
        self.keys: KeyTable | None = None
        if s.auth == "keys":
            self.keys = KeyTable(engine, s.wal_dir)
            self.keys.load_local()
        self.limiter = Limiter(
            engine,
            instance,
            lambda: self.flusher.checkpoint,
            lambda: self.keys is not None and self.keys.limited,
        )
        self.journal = Journal(
            writer, deployment_fields(s.deployment_environment, s.deployment_version)
        )
        # Spans of requests and attempts, exported to an OTLP collector: only when one is set.
        self.tracing = Tracing(s, instance) if s.otel_endpoint is not None else None
        # With other workers, each asks the others to store their WALs before it reads a
        # conversation, and answers theirs (`llmsvc.siblings`).
        self.siblings: Siblings | None = None
        if worker is not None:
            group = worker_group()
            self.siblings = Siblings(
                address(group, worker),
                [address(group, k) for k in range(s.workers) if k != worker],
                lambda: conversations.caught_up(),
                timeout,
            )
        conversations = Conversations(
            engine,
            lambda: self.flusher.checkpoint,
            lambda: self.writer.end.lsn - 1,
            lambda: self.flusher.hurry(),
            timeout,
            others=None if self.siblings is None else self.siblings.others_caught_up,
        )
        self.gateway = Gateway(
            self.journal,
            self.router,
            s.max_body_bytes,
            wal_status=self.wal_status,
            metrics=metrics,
            describe=self.describe,
            policy=s.retry_policy(),
            keys=self.keys,
            limiter=self.limiter,
            store_embeddings=s.store_embeddings,
            conversations=conversations,
            sessions=Sessions(conversations, s.session_ttl()),
            tracing=self.tracing,
        )
        for finding in repairs.findings:
            metrics.wal_damage.labels(kind=finding.kind).inc()
        metrics.wal_lost_records.inc(repairs.counts()["lost_records"])
        metrics.watch(self.wal_status)
        metrics.watch_daemon(lambda: status.daemon_state(self))

    def new_flusher(self) -> Flusher:
        s = self.settings
        return Flusher(
            self.engine,
            s.wal_dir,
            self.instance,
            lambda: self.flush_to or self.writer.end,
            s.flush_policy(),
            on_batch=self.metrics.batch_flushed,
            process=self._flush_process_config() if s.flush_process else None,
        )

    def _flush_process_config(self) -> ChildConfig:
        s = self.settings
        name = "flusher" if self.worker is None else f"worker-{self.worker} flusher"
        return ChildConfig(
            daemon_pid=os.getpid(),
            database_url=s.database_url,
            timeout=s.database_timeout_seconds,
            wal_dir=str(s.wal_dir),
            instance=str(self.instance),
            log_level=s.log_level,
            log_json=s.log_format == "json",
            secrets=s.secrets(),
            process=name,
        )

    # -- what operators read ------------------------------------------------------------

    def describe(self) -> dict[str, Any]:
        return status.describe(self)

    def health(self) -> dict[str, Any]:
        return self.gateway.health_report()

    def provider_names(self) -> list[str]:
        return list(self.providers)

    def wal_status(self) -> WalStatus:
        """The database and WAL backlog, for /api/health, admission and metrics (any thread)."""
        committed, end = self.flusher.committed, self.writer.end
        problem = self.database_problem()
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

    def stalled(self) -> float | None:
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

    def database_problem(self) -> str | None:
        """Why the database is not taking the daemon's calls, in words; None while it is."""
        if (waited := self.stalled()) is not None:
            return f"the database has not answered for {waited:.0f} s"
        error = (
            (not self.flusher.database_ok and self.flusher.last_error)
            or self.switches.error
            or self.catch_up.error
        )
        return f"the database is unreachable: {error}" if error else None

    async def close_pools(self, within: float) -> None:
        """Close the pools' connections; drop them (the process ends) if the database is away,
        or if a call of ours is still unanswered: a stall too young to be reported would make
        closing wait out `within`, and the pool log a traceback for the close cut off."""
        waits = (self.flusher.waiting_since, self.switches.waiting_since)
        close = all(since is None for since in waits) and self.database_problem() is None
        for engine in (self.engine, self.maintenance):
            try:
                await asyncio.wait_for(engine.dispose(close=close), within)
            except TimeoutError:
                log.warning("shutdown: database connections dropped: no answer to closing them")

    # -- what operators do (admin.app.Operations), and the scheduled jobs -----------------

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

    async def run_job(self, name: str, slot: datetime) -> None:
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
        assert self.flusher_task is not None  # started by the catch-up, which has ended
        self.gateway.paused = f"llmsvc is restoring the backup {name}; requests resume after it"
        try:
            s = self.settings
            interrupted = await self.gateway.settle(
                s.shutdown_grace_seconds, "restore", s.shutdown_interrupt_seconds
            )
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
        self.flusher = self.new_flusher()  # starts at the restored checkpoint
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
        self.circuits_storing.add(task)
        task.add_done_callback(self._stored)

    def _stored(self, task: asyncio.Task[None]) -> None:
        self.circuits_storing.discard(task)
        if not task.cancelled() and task.exception() is not None:
            log.warning("circuit state not stored", error=task.exception())

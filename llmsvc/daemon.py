"""The daemon's lifecycle: boot, serve, watch, shut down — ordered steps, one log line each.

Boot needs no database. WAL dir locked → WAL repaired and opened (from the
checkpoint hint kept beside it, `llmsvc.local`) → the running parts
(`llmsvc.operations`): provider switches, and with `auth = "keys"` the
callers' keys, from their local copies → the HTTP server (`llmsvc.serving`):
chat requests are journaled from here on → the metrics port → ready. Then, in
the background, the catch-up with the database (`llmsvc.catchup`), each step
retried while the database is away: migrations → stored provider switches
and circuits → the keys (followed from here on) → the database's checkpoint →
the WAL replayed up to where the previous run ended → requests that run left
open journaled `interrupted` → the flusher follows the writer, switches and
rate limits are followed → consistency check → scheduler.

Serving: a watchdog task pings systemd while the event loop runs, the WAL
takes writes and no task died of a bug; a database stall is logged, never a
reason to stop. A fatal WAL error stops the daemon (exit 1).

Shutdown: refuse new requests (503) → let open ones finish within
`shutdown_grace_seconds`, interrupt the rest → stop the HTTP server → export
the spans left (with `otel_endpoint`, within `shutdown_close_seconds`) → let the
catch-up finish → sync the WAL → drain it into the database (the catch-up and
the drain together within `shutdown_drain_seconds`) → stop the scheduler →
close the metrics port → stop following the database → close pools. Every
step is bounded (`Settings.shutdown_seconds`), so the daemon ends whatever the
database does, leaving what is not drained in the WAL for the next boot.
Signal handlers only set an event; a second signal exits at once (the WAL
still holds every acknowledged record).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
import time
from collections.abc import Iterator

import anyio

from llmsvc.admin.app import AdminApi
from llmsvc.catchup import CatchUpSteps, end_task
from llmsvc.config import Settings, systemd_environment
from llmsvc.errors import LlmsvcError, WalFatal
from llmsvc.local import read_checkpoint
from llmsvc.logs import logger
from llmsvc.metrics import Metrics, MetricsServer
from llmsvc.operations import Operations
from llmsvc.serving import HttpServer, start_metrics, tune_gc
from llmsvc.status import CatchUp
from llmsvc.systemd import Notifier
from llmsvc.wal import WalLock, WalWriter, instance_id

log = logger(__name__)

EXIT_OK, EXIT_FATAL = 0, 1
WAL_STUCK_SECONDS = 10.0  # a WAL write lasting this long is a frozen disk: the watchdog stops
WATCH_SECONDS = 1.0  # how often the daemon looks at its own health


class Daemon:
    """One llmsvc instance; `worker` is its index when a supervisor runs several (workers > 1)."""

    def __init__(self, settings: Settings, worker: int | None = None) -> None:
        self.settings = settings
        self.worker = worker
        self.supervisor = os.getppid() if worker is not None else None
        self.orphaned = False  # a worker whose supervisor died: it stops without the grace
        self.notifier = Notifier(*systemd_environment())
        self.stopping = asyncio.Event()
        self.fatal: WalFatal | None = None
        self.failure: str | None = None  # why the boot failed
        self.stop_reason = "stopped"  # the signal that stopped it, once one has
        self.lock = WalLock(settings.wal_dir)
        self.catch_up = CatchUp(self.notifier.status)
        # What the boot got to: shutdown undoes each part there is, and only those.
        self.writer: WalWriter | None = None
        self.ops: Operations | None = None
        self.http: HttpServer | None = None
        self.metrics_server: MetricsServer | None = None
        self.steps: CatchUpSteps | None = None

    async def run(self) -> int:
        """Boot, serve until a signal or a fatal WAL error, shut down; return the exit code.

        The last log line says the exit code and why, whatever ended the daemon.
        """
        self.booting = anyio.CancelScope()  # a signal during a long WAL repair stops the boot
        try:
            async with anyio.create_task_group() as signals:
                signals.start_soon(self._watch_signals)
                try:
                    with self.booting:
                        await self.boot()
                    if not self.booting.cancelled_caught:
                        assert self.ops is not None  # booted
                        assert self.http is not None
                        s, port = self.settings, self.http.port
                        if self.worker is None:
                            log.info("ready", host=s.host, port=port, auth=s.auth)
                        else:  # the supervisor says `ready host=` once all its workers are
                            log.info("ready", worker=self.worker, host=s.host, port=port)
                        tune_gc()
                        self.notifier.ready(f"serving on {s.host}:{port}")
                        signals.start_soon(self.ops.metrics.watch_loop)
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
        """Up to serving, from local state only; the database is the catch-up's."""
        s = self.settings
        self.lock.acquire()
        instance = instance_id(s.wal_dir)
        log.info("boot: wal locked", dir=s.wal_dir, instance=instance)

        self.notifier.status("booting: opening the WAL")
        metrics = Metrics()
        self.writer = writer = WalWriter(
            s.wal_dir, instance, s.wal_policy(), on_fsync=metrics.wal_fsync.observe
        )
        hint = read_checkpoint(s.wal_dir)
        repairs = writer.open(asyncio.get_running_loop(), self._on_fatal, hint)
        args = (s, self.worker, instance, writer, repairs, metrics, self.catch_up)
        self.ops = ops = Operations(*args, fatal=lambda: self.fatal)
        if ops.tracing is not None:
            log.info("boot: spans exported", endpoint=s.otel_endpoint, service=s.otel_service_name)
        self.steps = CatchUpSteps(ops, self.stopping)
        await ops.flusher.start(hint)  # for the backlog's figures: nothing is flushed yet

        token = s.admin_token.get_secret_value() if s.admin_token else None
        app = AdminApi(ops.gateway, token, ops)
        self.http = await HttpServer.start(s, app, metrics, shared=self.worker is not None)
        self.metrics_server = start_metrics(s, metrics, self.worker)
        self.steps.start(f"serving on {s.host}:{self.http.port}")

    async def shutdown(self) -> None:
        """Each step in its own try and bounded, so no failure and no database stops the next."""
        s, ops, steps = self.settings, self.ops, self.steps
        close = s.shutdown_close_seconds  # the bound on ending a task or closing a pool
        grace = 0.0 if self.fatal or self.orphaned else s.shutdown_grace_seconds
        if ops is not None:
            with _step("requests finished"):
                n = await ops.gateway.finish_requests(grace, s.shutdown_interrupt_seconds)
                log.info("shutdown: open requests interrupted", count=n)
        if self.http is not None:
            with _step("http server stopped"):
                await self.http.stop(s.shutdown_http_seconds)
        for provider in ops.providers.values() if ops is not None else ():
            with _step(f"provider {provider.name} closed"):
                await provider.close()
        if ops is not None and ops.tracing is not None:  # every request's spans have ended
            with _step("tracing stopped"):
                await ops.tracing.close(close)
        deadline = time.monotonic() + s.shutdown_drain_seconds
        if steps is not None and steps.task is not None:  # it may journal: before the WAL closes
            with _step("catch-up ended"):
                await steps.end(deadline, lambda: self.fatal is not None, close)
        if self.writer is not None:
            with _step("wal synced"):
                await self.writer.close()
        if steps is not None and steps.task is not None:
            with _step("wal drained"):
                drain = steps.checkpoint_loaded and not self.fatal
                if drain:  # every request of this run has ended (journaled)
                    self.notifier.status("stopping: draining the WAL into the database")
                await steps.drain(deadline if drain else None, close)
        if ops is not None and ops.scheduler is not None:
            with _step("scheduler stopped"):
                await ops.scheduler.shutdown(grace=s.shutdown_job_seconds)
        if self.metrics_server is not None:  # after the drain, so it can be watched
            with _step("metrics port closed"):
                await asyncio.to_thread(self.metrics_server.stop)
        for ended, task in steps.followers.items() if steps is not None else ():
            with _step(ended):
                await end_task(task, close, close)  # it ends when it sees `stopping`
        for task in list(ops.circuits_storing) if ops is not None else ():
            task.cancel()
        if ops is not None and ops.siblings is not None:  # answered the others until drained
            ops.siblings.close()
        if ops is not None:
            with _step("database closed"):
                await ops.close_pools(close)
        self.lock.release()

    async def _watch(self) -> None:
        """Log a database stall, and ping systemd's watchdog while the daemon is alive.

        Alive is the event loop running this, the WAL taking appends, and no task
        dead of a bug: a stalled or lost database is what the WAL absorbs, so it
        is logged and shown in health, never a reason to be killed.
        """
        ops = self.ops
        assert ops is not None  # booted
        interval = self.notifier.watchdog_interval
        tick = min(WATCH_SECONDS, interval or WATCH_SECONDS)  # a ping at least every interval
        was_unwell, stalled = False, False
        while not self.stopping.is_set():
            stall = ops.stalled() is not None
            if stall and not stalled:
                log.warning(
                    "database stalled: %s; requests are journaled in the WAL",
                    ops.database_problem(),
                )
            elif stalled and not stall:
                log.info("database stall over")
            stalled = stall
            if interval is not None:
                unwell = self._unwell(ops, interval)
                if unwell is None:
                    self.notifier.watchdog()
                if unwell is None and was_unwell:
                    log.info("watchdog: healthy again, pinging systemd")
                elif unwell is not None and not was_unwell:
                    log.error("watchdog: not telling systemd all is well: %s", unwell)
                was_unwell = unwell is not None
            await asyncio.sleep(tick)

    def _unwell(self, ops: Operations, interval: float) -> str | None:
        """Why the daemon cannot serve or will never store again, or None."""
        if self.steps is not None and self.steps.died():
            return "the catch-up with the database has stopped"
        if ops.flusher_task is not None and ops.flusher_task.done():
            return "the flusher has stopped"
        return ops.writer.stuck(max(WAL_STUCK_SECONDS, 2 * interval))

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


@contextlib.contextmanager
def _step(name: str) -> Iterator[None]:
    try:
        yield
        log.info("shutdown: %s", name)
    except Exception:
        log.exception("shutdown: step failed", step=repr(name))

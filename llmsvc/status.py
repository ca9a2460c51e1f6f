"""The running daemon's state as operators see it: /api/health, the admin status, metrics.

Read on the event loop (health) or on the metrics server's thread (scrapes):
only values the loop replaces whole, and a few small files. The catch-up's
progress (`CatchUp`) is kept here: health says which step runs and what it
waits for.
"""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Protocol, TypeVar

from llmsvc import __version__
from llmsvc.config import Settings
from llmsvc.errors import LlmsvcError, WalFatal
from llmsvc.gateway.app import Gateway
from llmsvc.gateway.router import Router
from llmsvc.logs import logger
from llmsvc.maintenance.backup import newest_verified
from llmsvc.maintenance.jobs import schedules
from llmsvc.maintenance.scheduler import Scheduler
from llmsvc.metrics import DaemonState, WalStatus
from llmsvc.store.engine import describe_error
from llmsvc.store.flusher import Flusher
from llmsvc.wal import WalWriter, list_segments

log = logger(__name__)

T = TypeVar("T")
BACKOFF = (0.5, 10.0)  # first and longest pause between two tries of a step


class CatchUp:
    """The step under way and why its last try failed, for health and the systemd status."""

    def __init__(self, status: Callable[[str], object]) -> None:
        self.status = status  # told each step, as systemd's STATUS= line
        self.step: str | None = "starting"  # None once caught up
        self.since = time.monotonic()
        self.error: str | None = None  # why the step's last try failed; None while it works

    async def run(self, step: str, attempt: Callable[[], Awaitable[T]]) -> T:
        """`attempt` until it succeeds: the first failure is logged, every one retried."""
        self.step, self.since, self.error = step, time.monotonic(), None
        self.status(f"catching up: {step}")
        pause = BACKOFF[0]
        while True:
            try:
                result = await attempt()
            except Exception as exc:
                if self.error is None:
                    log.warning("boot: waiting for the database", step=repr(step), error=why(exc))
                self.error = why(exc)
                await asyncio.sleep(pause)
                pause = min(pause * 2, BACKOFF[1])
                continue
            self.error = None
            return result

    def done(self) -> None:
        self.step, self.error = None, None

    def describe(self, database_problem: str | None) -> str | None:
        """What the catch-up does and waits for, in words; None once it is done."""
        if self.step is None:
            return None
        said = f"{self.step} (for {time.monotonic() - self.since:.0f} s)"
        problem = database_problem or (self.error and f"the database is unreachable: {self.error}")
        return f"{said}, waiting: {problem}" if problem else said


def why(exc: BaseException) -> str:
    """An error in one line: llmsvc's own as it says it, a driver's as `describe_error` does."""
    return str(exc) if isinstance(exc, LlmsvcError) else describe_error(exc)


class Running(Protocol):
    """What is read here of a running daemon: `llmsvc.operations.Operations` is one."""

    settings: Settings
    instance: uuid.UUID
    started: float  # time.monotonic() at boot
    writer: WalWriter
    flusher: Flusher
    gateway: Gateway
    router: Router
    scheduler: Scheduler | None
    job_runs: dict[str, dict[str, Any]]
    catch_up: CatchUp
    fatal: Callable[[], WalFatal | None]

    def provider_names(self) -> list[str]: ...

    def wal_status(self) -> WalStatus: ...


def daemon_state(daemon: Running) -> DaemonState:
    """What the metrics port reads at each scrape, on its own thread."""
    return DaemonState(
        wal_segments=len(list_segments(daemon.settings.wal_dir)),
        wal_appended_records=daemon.writer.appended_records,
        wal_appended_bytes=daemon.writer.written_bytes,
        flush_errors=daemon.flusher.errors,
        refused_records=dict(daemon.flusher.refused),
        inflight_requests=len(daemon.gateway.inflight),
        providers={
            name: (name not in daemon.router.disabled, daemon.router.breakers.circuit(name).state)
            for name in daemon.provider_names()
        },
    )


def describe(daemon: Running) -> dict[str, Any]:
    """Every part's state, for `/api/health` and the admin status; cheap, on the loop."""
    wal, now = daemon.wal_status(), time.time()
    flusher, caught_up = daemon.flusher, daemon.flusher.caught_up_at
    behind = round(now - caught_up, 1) if wal.backlog_records and caught_up else 0.0
    segments = list_segments(daemon.settings.wal_dir)
    scheduler = daemon.scheduler
    backup = newest_verified(daemon.settings.backup_dir)  # a few small files: cheap
    return {
        "version": __version__,
        "instance": str(daemon.instance),
        "uptime_seconds": round(time.monotonic() - daemon.started, 1),
        "providers": [
            {
                "name": name,
                "enabled": name not in daemon.router.disabled,
                "circuit": daemon.router.breakers.circuit(name).state,
                "attempts": dict(daemon.gateway.attempt_counts.get(name, {})),
            }
            for name in daemon.provider_names()
        ],
        "database": {
            "connected": wal.database_up,
            "last_check": iso(flusher.last_check),
            "last_flush": iso(flusher.last_flush),
            "last_error": flusher.last_error or daemon.catch_up.error,  # boot's, until caught up
            "refused_records": dict(flusher.refused),
            "last_refusal": flusher.last_refusal,
            "flush_process": flusher.writing_process(),
        },
        "wal": {
            "segments": len(segments),
            "bytes": sum(_size(seg.path) for seg in segments),
            "backlog_records": wal.backlog_records,
            "backlog_bytes": wal.backlog_bytes,
            "backlog_seconds": behind,
            "backlog_limit_bytes": wal.backlog_limit_bytes,
            "checkpoint": wal.checkpoint,
            "last_lsn": wal.last_lsn,
            "disk_full": wal.disk_full,
        },
        "scheduler": {
            name: {
                "schedule": schedule,
                "next_run": iso(scheduler.next_runs().get(name)) if scheduler is not None else None,
                **daemon.job_runs.get(name, {"last_run": None, "last_status": None}),
            }
            for name, schedule in schedules(daemon.settings).items()
        },
        "last_backup": backup
        and {
            "file": backup.name,
            "created": backup.created,
            "size": backup.size,
        },
        "shutdown": {"draining": daemon.gateway.draining, "fatal": str(daemon.fatal() or "")},
    }


def iso(when: float | datetime | None) -> str | None:
    if when is None:
        return None
    if isinstance(when, datetime):
        return when.isoformat()
    return datetime.fromtimestamp(when, UTC).isoformat()


def _size(path: Path) -> int:
    try:
        return path.stat().st_size
    except FileNotFoundError:  # removed by housekeeping meanwhile
        return 0

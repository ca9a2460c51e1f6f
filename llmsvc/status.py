"""The running daemon's state as operators see it: /api/health, the admin status, metrics.

Read on the event loop (health) or on the metrics server's thread (scrapes):
only values the loop replaces whole, and a few small files.
"""

from __future__ import annotations

import time
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

from llmsvc import __version__
from llmsvc.maintenance.backup import newest_verified
from llmsvc.maintenance.jobs import schedules
from llmsvc.metrics import DaemonState
from llmsvc.wal.segment import list_segments

if TYPE_CHECKING:  # for the annotations only: nothing imports the daemon at run time
    from llmsvc.daemon import Daemon


def daemon_state(daemon: Daemon) -> DaemonState:
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
            for name in daemon.providers
        },
    )


def describe(daemon: Daemon) -> dict[str, Any]:
    """Every part's state, for `/api/health` and the admin status; cheap, on the loop."""
    wal, now = daemon.wal_status(), time.time()
    flusher, caught_up = daemon.flusher, daemon.flusher.caught_up_at
    behind = round(now - caught_up, 1) if wal.backlog_records and caught_up else 0.0
    segments = list_segments(daemon.settings.wal_dir)
    scheduler = getattr(daemon, "scheduler", None)
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
            for name in daemon.providers
        ],
        "database": {
            "connected": wal.database_up,
            "last_check": iso(flusher.last_check),
            "last_flush": iso(flusher.last_flush),
            "last_error": flusher.last_error,
            "refused_records": dict(flusher.refused),
            "last_refusal": flusher.last_refusal,
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
                "next_run": iso(scheduler.next_runs().get(name)) if scheduler else None,
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
        "shutdown": {"draining": daemon.gateway.draining, "fatal": str(daemon.fatal or "")},
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

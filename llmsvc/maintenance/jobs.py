"""The maintenance jobs by name: the one place a job is built, whoever starts it.

The scheduler fires them, `llmsvc jobs run` and the other commands run them
by hand, the admin API runs them in the daemon; each takes the job from here,
with the options a run by hand may give (prune's cut-off, a dry run), so a job
does the same whoever starts it. `JOBS` is the one list of their names.
"""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta

from sqlalchemy.ext.asyncio import AsyncEngine

from llmsvc.config import Settings
from llmsvc.maintenance import backup, consistency, retention
from llmsvc.maintenance.runs import Job, JobResult
from llmsvc.maintenance.wal_housekeeping import housekeep
from llmsvc.store import sessions
from llmsvc.wal import WalWriter

Build = Callable[[Settings, AsyncEngine, uuid.UUID | None, WalWriter | None], Job]


@dataclass(frozen=True)
class Kind:
    """A job: the setting that schedules it, and how it is built."""

    schedule: Callable[[Settings], str]  # its cron line; empty: run by hand only
    build: Build  # bound to settings, store, this host's instance id and the daemon's writer
    own_instance: bool = False  # on one instance's own WAL: every instance runs it


def prune_job(
    settings: Settings, engine: AsyncEngine, cutoff: datetime | None = None, dry_run: bool = False
) -> Job:
    """The prune job, however it is started (scheduler, CLI, admin API, cron, timer).

    PostgreSQL's daily token partitions are created `token_partition_ahead_days`
    ahead first, so a deployment whose prune runs from cron still has them;
    then the requests before `cutoff` (default: `retention_days` ago) go.
    A dry run only counts, and creates nothing.
    """
    s = settings

    async def prune() -> JobResult:
        retained = datetime.now(UTC) - timedelta(days=s.retention_days)
        before, batch = cutoff or retained, s.prune_batch_requests
        if dry_run:
            return await retention.prune(engine, before, retained, batch, dry_run=True)
        created = await retention.ensure_partitions(engine, s.token_partition_ahead_days)
        result = await retention.prune(engine, before, retained, batch)
        result.repaired["partitions_created"] = created
        return result

    return prune


def backup_job(settings: Settings, engine: AsyncEngine) -> Job:
    """One backup of the store into `backup_dir`, verified."""
    return lambda: backup.backup(engine, settings.backup_dir)


def restore_job(settings: Settings, engine: AsyncEngine, name: str, replay: bool) -> Job:
    """`llmsvc restore`: the backup `name` into the store, then (`replay`) this host's WAL.

    Run it inside `backup.exclusive`, which says whether the WAL may be
    replayed here; the daemon's restore (admin API) is the daemon's own.
    """
    s = settings
    wal, flush = s.wal_policy(), s.flush_policy()
    return lambda: backup.restore(engine, s.backup_dir, s.wal_dir, name, replay, wal, flush)


def _backup_cleanup(settings: Settings) -> Job:
    """Backups older than `backup_retention_days` removed (file work, in a thread)."""
    s = settings
    return lambda: asyncio.to_thread(backup.cleanup, s.backup_dir, s.backup_retention_days)


def _gap_scan(settings: Settings, engine: AsyncEngine) -> Job:
    """The consistency check on schedule: token holes refilled from the WAL, the rest told."""
    return lambda: consistency.gap_scan(engine, settings.wal_dir)


def _wal_housekeeping(
    settings: Settings,
    engine: AsyncEngine,
    instance_id: uuid.UUID | None,
    writer: WalWriter | None,
) -> Job:
    """WAL housekeeping needs this host's instance id. With the daemon's `writer` it also
    seals a live segment older than `wal_segment_max_age_seconds`; run by hand it only
    removes segments."""
    s = settings

    async def wal_housekeeping() -> JobResult:
        if instance_id is None:
            return JobResult(found={"wal": f"no WAL in {s.wal_dir}"})
        max_age = s.wal_segment_max_age_seconds if writer is not None else None
        return await housekeep(engine, s.wal_dir, instance_id, s.backup_dir, writer, max_age)

    return wal_housekeeping


def _prune_sessions(engine: AsyncEngine) -> Job:
    """Sessions past their `expires_at` deleted; their requests stay until retention's prune."""

    async def prune_sessions() -> JobResult:
        return JobResult(rows=await sessions.prune_sessions(engine, datetime.now(UTC)))

    return prune_sessions


JOBS: dict[str, Kind] = {
    "prune": Kind(lambda s: s.prune_schedule, lambda s, engine, *_: prune_job(s, engine)),
    "backup": Kind(lambda s: s.backup_schedule, lambda s, engine, *_: backup_job(s, engine)),
    "backup-cleanup": Kind(lambda s: s.backup_cleanup_schedule, lambda s, *_: _backup_cleanup(s)),
    "wal-housekeeping": Kind(
        lambda s: s.wal_housekeeping_schedule, _wal_housekeeping, own_instance=True
    ),
    "gap-scan": Kind(lambda s: s.gap_scan_schedule, lambda s, engine, *_: _gap_scan(s, engine)),
    "prune-sessions": Kind(
        lambda s: s.prune_sessions_schedule, lambda s, engine, *_: _prune_sessions(engine)
    ),
}
JOB_NAMES = tuple(JOBS)
INSTANCE_JOBS = frozenset(name for name, kind in JOBS.items() if kind.own_instance)


def schedules(settings: Settings) -> dict[str, str]:
    """Each job's cron line by job name; empty when it runs only by hand."""
    return {name: kind.schedule(settings) for name, kind in JOBS.items()}


def job_table(
    settings: Settings,
    engine: AsyncEngine,
    instance_id: uuid.UUID | None,
    writer: WalWriter | None = None,
) -> dict[str, Job]:
    """Each job bound to this store, this host's instance id and (in the daemon) its writer."""
    return {name: kind.build(settings, engine, instance_id, writer) for name, kind in JOBS.items()}

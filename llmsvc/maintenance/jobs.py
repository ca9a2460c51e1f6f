"""The maintenance jobs by name: what the scheduler fires and `llmsvc jobs run` runs."""

from __future__ import annotations

import asyncio
import uuid
from datetime import UTC, datetime, timedelta

from sqlalchemy.ext.asyncio import AsyncEngine

from llmsvc.config import Settings
from llmsvc.maintenance import backup, consistency, retention
from llmsvc.maintenance.runs import Job, JobResult
from llmsvc.maintenance.wal_housekeeping import housekeep
from llmsvc.wal import WalWriter

JOB_NAMES = ("prune", "backup", "backup-cleanup", "wal-housekeeping", "gap-scan")
INSTANCE_JOBS = frozenset({"wal-housekeeping"})  # work on one instance's own WAL: each runs them


def job_table(
    settings: Settings,
    engine: AsyncEngine,
    instance_id: uuid.UUID | None,
    writer: WalWriter | None = None,
) -> dict[str, Job]:
    """Each job bound to this store; WAL housekeeping needs this host's instance id.

    With the daemon's `writer`, housekeeping also seals a live segment older
    than `wal_segment_max_age_seconds`; run by hand it only removes segments.
    """
    s = settings

    async def wal_housekeeping() -> JobResult:
        if instance_id is None:
            return JobResult(found={"wal": f"no WAL in {s.wal_dir}"})
        max_age = s.wal_segment_max_age_seconds if writer is not None else None
        return await housekeep(engine, s.wal_dir, instance_id, s.backup_dir, writer, max_age)

    return {
        "prune": prune_job(s, engine),
        "backup": lambda: backup.backup(engine, s.backup_dir),
        "backup-cleanup": lambda: asyncio.to_thread(
            backup.cleanup, s.backup_dir, s.backup_retention_days
        ),
        "wal-housekeeping": wal_housekeeping,
        "gap-scan": lambda: consistency.gap_scan(engine, s.wal_dir),
    }


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

"""Running a maintenance job once: claim its slot, hold its lock, store what happened.

Every run, scheduled or started by hand, is a row in `maintenance_runs`. A
scheduled run first claims its slot (job, scheduled time) in
`maintenance_slots`: with several daemons on one database, the one whose
insert lands runs it and the others do nothing, even one that fires after the
first has finished. While it runs, the job's lock is held — a PostgreSQL
advisory lock, or a lock file in `<sqlite file>.locks/` — so a run by hand
never overlaps a scheduled one.
"""

from __future__ import annotations

import contextlib
import fcntl
import logging
import os
import time
import uuid
import zlib
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

import sqlalchemy as sa
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.ext.asyncio import AsyncEngine

from llmsvc.logs import logger
from llmsvc.store.engine import open_lock_file
from llmsvc.store.schema import maintenance_runs, maintenance_slots

log = logger(__name__)


@dataclass
class JobResult:
    """What a job did: `status` is ok, problems or failed; the figures go to the run's row."""

    status: str = "ok"
    rows: int | None = None
    bytes: int | None = None
    found: dict[str, Any] = field(default_factory=dict)
    repaired: dict[str, Any] = field(default_factory=dict)
    error: str | None = None
    idle: bool = False  # it found nothing to do: its run is logged at DEBUG, not INFO


Job = Callable[[], Awaitable[JobResult]]
Finished = Callable[[str, str, float], None]  # job, status, seconds: for metrics


async def run_job(
    engine: AsyncEngine,
    name: str,
    job: Job,
    instance_id: uuid.UUID | None,
    slot: datetime | None = None,
    finished: Finished | None = None,
    own_instance: bool = False,
) -> JobResult | None:
    """Run `job` once and store the run; None when another instance has this slot.

    A job on an instance's `own_instance` data (its WAL) claims no slot, since
    every instance must run it, and its lock is that instance's alone.
    A job that raises is a failed run: logged, stored with its error, and
    reported to `finished`; it never propagates, so the scheduler goes on.
    """
    shared = not own_instance
    if slot is not None and shared and not await claim_slot(engine, name, slot, instance_id):
        log.info("job slot taken by another instance", job=name, slot=slot.isoformat())
        return None
    started, clock = datetime.now(UTC), time.monotonic()
    lock = name if shared else f"{name}-{instance_id}"
    async with job_lock(engine, lock) as held:
        if not held:
            result = JobResult("skipped", error="another run of this job holds its lock")
        else:
            try:
                result = await job()
            except Exception as exc:
                result = JobResult("failed", error=f"{type(exc).__name__}: {exc}")
    seconds = time.monotonic() - clock
    await record_run(engine, name, instance_id, started, result, slot)
    level = logging.ERROR if result.status == "failed" else logging.INFO
    if result.idle and result.status == "ok":
        level = logging.DEBUG  # a job every minute that finds nothing is 1,440 lines a day
    log.log(
        level,
        "job %s",
        name,
        status=result.status,
        rows=result.rows,
        bytes=result.bytes,
        seconds=round(seconds, 3),
        error=result.error,
    )
    if finished is not None:
        finished(name, result.status, seconds)
    return result


async def claim_slot(
    engine: AsyncEngine, job: str, slot: datetime, instance_id: uuid.UUID | None
) -> bool:
    """Insert the slot's row; True for the one instance whose insert landed."""
    dialect = postgresql if engine.dialect.name == "postgresql" else sqlite
    stmt = (
        dialect.insert(maintenance_slots)
        .values(
            job=job,
            slot_at=slot,
            instance_id=instance_id or uuid.UUID(int=0),
            claimed_at=datetime.now(UTC),
        )
        .on_conflict_do_nothing()
    )
    async with engine.begin() as conn:
        return (await conn.execute(stmt)).rowcount == 1


@contextlib.asynccontextmanager
async def job_lock(engine: AsyncEngine, job: str) -> AsyncIterator[bool]:
    """Hold the job's lock for the block; yields False, without waiting, if it is held."""
    if engine.dialect.name == "postgresql":
        key = zlib.crc32(f"llmsvc job {job}".encode()) - 2**31  # a signed 32-bit key
        async with engine.connect() as conn:
            got = bool(await conn.scalar(sa.select(sa.func.pg_try_advisory_lock(key))))
            await conn.commit()
            try:
                yield got
            finally:
                if got:
                    await conn.scalar(sa.select(sa.func.pg_advisory_unlock(key)))
                    await conn.commit()
        return
    fd = open_lock_file(engine.url.database or "llmsvc.db", job)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            yield False
            return
        yield True
    finally:
        os.close(fd)  # closing drops the flock


async def record_run(
    engine: AsyncEngine,
    job: str,
    instance_id: uuid.UUID | None,
    started: datetime,
    result: JobResult,
    slot: datetime | None = None,
) -> None:
    async with engine.begin() as conn:
        await conn.execute(
            sa.insert(maintenance_runs).values(
                job=job,
                instance_id=instance_id,
                started_at=started,
                finished_at=datetime.now(UTC),
                status=result.status,
                found=result.found,
                repaired=result.repaired,
                error=result.error,
                slot_at=slot,
                rows_affected=result.rows,
                bytes_affected=result.bytes,
            )
        )


async def last_runs(engine: AsyncEngine) -> dict[str, dict[str, Any]]:
    """Each job's newest run, and its newest successful one, by job name."""
    runs: dict[str, dict[str, Any]] = {}
    for status_filter, key in ((None, "last"), ("ok", "last_ok")):
        newest = sa.select(sa.func.max(maintenance_runs.c.id)).group_by(maintenance_runs.c.job)
        if status_filter:
            newest = newest.where(maintenance_runs.c.status == status_filter)
        query = sa.select(maintenance_runs).where(maintenance_runs.c.id.in_(newest))
        async with engine.connect() as conn:
            for row in await conn.execute(query):
                runs.setdefault(row.job, {})[key] = dict(row._mapping)
    return runs


async def history(
    engine: AsyncEngine, jobs: tuple[str, ...] | None, limit: int
) -> list[dict[str, Any]]:
    """The newest runs, of the given jobs or of all."""
    query = sa.select(maintenance_runs).order_by(maintenance_runs.c.id.desc()).limit(limit)
    if jobs is not None:
        query = query.where(maintenance_runs.c.job.in_(jobs))
    async with engine.connect() as conn:
        return [dict(row._mapping) for row in await conn.execute(query)]

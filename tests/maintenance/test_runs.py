"""Running a job: every run stored, one runner per slot, one run at a time, failures kept."""

from __future__ import annotations

import asyncio
import logging
import os
import stat
import uuid
from datetime import UTC, datetime
from pathlib import Path

import pytest
import sqlalchemy as sa
from sqlalchemy.ext.asyncio import AsyncEngine

from llmsvc.maintenance.runs import JobResult, claim_slot, history, job_lock, last_runs, run_job
from llmsvc.store.schema import maintenance_slots

SLOT = datetime(2026, 11, 29, 3, 0, tzinfo=UTC)


async def test_a_run_is_stored_with_its_figures_and_reported(engine: AsyncEngine) -> None:
    finished: list[tuple[str, str]] = []
    instance = uuid.uuid4()

    async def job() -> JobResult:
        return JobResult(rows=12, bytes=3456, found={"seen": 1}, repaired={"fixed": 2})

    result = await run_job(
        engine, "prune", job, instance, SLOT, lambda j, s, _secs: finished.append((j, s))
    )

    assert result is not None
    assert result.status == "ok"
    (run,) = await history(engine, ("prune",), 10)
    assert (run["job"], run["status"], run["instance_id"]) == ("prune", "ok", instance)
    assert (run["rows_affected"], run["bytes_affected"]) == (12, 3456)
    assert (run["found"], run["repaired"], run["error"]) == ({"seen": 1}, {"fixed": 2}, None)
    assert run["slot_at"].astimezone(UTC) == SLOT
    assert run["finished_at"] >= run["started_at"]
    assert finished == [("prune", "ok")]


async def test_a_run_that_found_nothing_to_do_is_logged_at_debug_the_others_at_info(
    engine: AsyncEngine, caplog: pytest.LogCaptureFixture
) -> None:
    """A job every minute that finds nothing would be 1,440 INFO lines a day."""

    async def idle() -> JobResult:
        return JobResult(rows=0, idle=True)

    async def busy() -> JobResult:
        return JobResult(rows=2)

    async def broken() -> JobResult:
        raise OSError("disk gone")

    caplog.set_level(logging.DEBUG, logger="llmsvc.maintenance.runs")
    for job in (idle, busy, broken):
        await run_job(engine, "wal-housekeeping", job, None)

    lines = [(r.levelno, r.getMessage()) for r in caplog.records]
    assert [(level, text.split(" seconds=")[0]) for level, text in lines] == [
        (logging.DEBUG, "job wal-housekeeping status=ok rows=0"),
        (logging.INFO, "job wal-housekeeping status=ok rows=2"),
        (logging.ERROR, "job wal-housekeeping status=failed"),
    ]
    assert lines[2][1].endswith(" error=OSError: disk gone")


async def test_a_failing_job_is_a_failed_run_with_its_error_not_an_exception(
    engine: AsyncEngine,
) -> None:
    async def job() -> JobResult:
        raise OSError(28, "No space left on device")

    result = await run_job(engine, "backup", job, None)

    assert result is not None
    assert result.status == "failed"
    runs = await last_runs(engine)
    assert runs["backup"]["last"]["status"] == "failed"
    assert "No space left on device" in runs["backup"]["last"]["error"]
    assert "last_ok" not in runs["backup"]


async def test_a_slot_is_claimed_once_so_a_second_instance_does_not_run_it(
    engine: AsyncEngine,
) -> None:
    ran: list[str] = []

    def job_of(who: str):  # type: ignore[no-untyped-def]
        async def job() -> JobResult:
            ran.append(who)
            return JobResult()

        return job

    first = await run_job(engine, "gap-scan", job_of("a"), uuid.uuid4(), SLOT)
    # The second instance fires for the same slot after the first has finished.
    second = await run_job(engine, "gap-scan", job_of("b"), uuid.uuid4(), SLOT)
    later = await run_job(engine, "gap-scan", job_of("b"), uuid.uuid4(), SLOT.replace(hour=4))

    assert first is not None
    assert second is None
    assert later is not None
    assert ran == ["a", "b"]
    assert len(await history(engine, ("gap-scan",), 10)) == 2
    async with engine.connect() as conn:
        assert await conn.scalar(sa.select(sa.func.count()).select_from(maintenance_slots)) == 2
    assert not await claim_slot(engine, "gap-scan", SLOT, uuid.uuid4())


async def test_a_run_while_another_holds_the_jobs_lock_is_skipped_and_stored(
    engine: AsyncEngine,
) -> None:
    started, release = asyncio.Event(), asyncio.Event()

    async def slow() -> JobResult:
        started.set()
        await release.wait()
        return JobResult()

    async def fast() -> JobResult:
        raise AssertionError("ran while the lock was held")

    running = asyncio.create_task(run_job(engine, "backup", slow, None))
    await started.wait()
    skipped = await run_job(engine, "backup", fast, None)
    release.set()
    done = await running

    assert skipped is not None
    assert skipped.status == "skipped"
    assert done is not None
    assert done.status == "ok"
    async with job_lock(engine, "backup") as held:
        assert held  # released after the run


@pytest.mark.parametrize("job", ["prune", "backup"])
async def test_different_jobs_do_not_share_a_lock(engine: AsyncEngine, job: str) -> None:
    async with job_lock(engine, "gap-scan") as first, job_lock(engine, job) as second:
        assert (first, second) == (True, True)


@pytest.mark.parametrize("database_url", ["sqlite"], indirect=True)
async def test_sqlite_job_locks_sit_in_one_private_folder_not_beside_the_database(
    engine: AsyncEngine, tmp_path: Path
) -> None:
    async def job() -> JobResult:
        return JobResult()

    for name in ("prune", "backup", "gap-scan"):
        await run_job(engine, name, job, None)
    instance = uuid.uuid4()
    await run_job(engine, "wal-housekeeping", job, instance, own_instance=True)

    beside = os.listdir(tmp_path)
    assert [name for name in beside if "lock" in name] == ["llmsvc.db.locks"]
    locks = tmp_path / "llmsvc.db.locks"
    assert stat.S_IMODE(os.stat(locks).st_mode) == 0o700
    assert sorted(os.listdir(locks)) == [
        "backup.lock",
        "gap-scan.lock",
        "migrate.lock",  # the fixture's migration's
        "prune.lock",
        f"wal-housekeeping-{instance}.lock",
    ]

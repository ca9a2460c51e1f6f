"""The scheduler: late runs survive a stall, and two daemons on one database run each slot once."""

from __future__ import annotations

import asyncio
import time
import uuid
from datetime import datetime, timedelta
from pathlib import Path

import pytest
import sqlalchemy as sa
from daemon_process import DaemonProcess, daemon_env, run_async

from llmsvc.maintenance.scheduler import Scheduler, next_run
from llmsvc.store.engine import create_engine
from llmsvc.store.schema import maintenance_runs, maintenance_slots

NO_JOBS = {
    "prune_schedule": "",
    "backup_schedule": "",
    "backup_cleanup_schedule": "",
    "wal_housekeeping_schedule": "",
}


async def runs_after_a_stall(misfire_grace: int) -> tuple[datetime, list[tuple[str, datetime]]]:
    """A job due once, 1.5 s from now, while the event loop is blocked from now until 2 s after."""
    ran: list[tuple[str, datetime]] = []

    async def run(job: str, slot: datetime) -> None:
        ran.append((job, slot))

    due = (datetime.now().astimezone() + timedelta(seconds=2.5)).replace(microsecond=0)
    schedule = f"{due.second} {due.minute} {due.hour} * * *"  # once a day, at `due`
    scheduler = Scheduler({"backup": schedule}, run, misfire_grace)
    scheduler.start()
    assert scheduler.next_runs() == {"backup": due}
    stall = (due - datetime.now().astimezone()).total_seconds() + 2
    time.sleep(stall)  # noqa: ASYNC251 - blocking the event loop is the point: a stall
    await asyncio.sleep(0.3)
    await scheduler.shutdown(grace=1)
    return due, ran


@pytest.mark.timeout(30)
async def test_a_run_made_late_by_a_stall_still_happens_with_the_configured_grace() -> None:
    due, ran = await runs_after_a_stall(misfire_grace=3600)
    assert ran == [("backup", due)]


@pytest.mark.timeout(30)
async def test_the_library_default_grace_of_one_second_would_drop_it() -> None:
    """Why `job_misfire_grace_seconds` exists: the same stall with APScheduler's default."""
    _due, ran = await runs_after_a_stall(misfire_grace=1)
    assert ran == []


def test_next_run_follows_the_cron_line_and_is_none_for_a_job_left_to_the_cli() -> None:
    now = datetime(2026, 11, 30, 12, 0).astimezone()  # a Monday
    assert next_run("0 3 * * sun", now) == datetime(2026, 12, 6, 3, 0).astimezone()
    assert next_run("0 2 * * *", now) == datetime(2026, 12, 1, 2, 0).astimezone()
    assert next_run("", now) is None


@pytest.mark.timeout(90)
@pytest.mark.parametrize("database_url", ["postgresql"], indirect=True)
def test_two_daemons_on_one_database_run_each_scheduled_slot_exactly_once(
    database_url: str, tmp_path: Path
) -> None:
    every_second = {**NO_JOBS, "gap_scan_schedule": "* * * * * *"}
    envs = [daemon_env(database_url, tmp_path / f"wal-{n}", **every_second) for n in (1, 2)]
    with DaemonProcess(envs[0]) as first, DaemonProcess(envs[1]) as second:
        time.sleep(4)
        assert first.stop() == 0, first.log
        assert second.stop() == 0, second.log
    instances = {
        uuid.UUID((tmp_path / f"wal-{n}" / "instance_id").read_text().strip()) for n in (1, 2)
    }

    async def read() -> tuple[list[tuple[datetime, uuid.UUID]], list[tuple[datetime, uuid.UUID]]]:
        engine = create_engine(database_url)
        try:
            async with engine.connect() as conn:
                runs = await conn.execute(
                    sa.select(maintenance_runs.c.slot_at, maintenance_runs.c.instance_id)
                    .where(maintenance_runs.c.job == "gap-scan")
                    .order_by(maintenance_runs.c.slot_at)
                )
                slots = await conn.execute(
                    sa.select(maintenance_slots.c.slot_at, maintenance_slots.c.instance_id)
                    .where(maintenance_slots.c.job == "gap-scan")
                    .order_by(maintenance_slots.c.slot_at)
                )
                return [tuple(r) for r in runs], [tuple(r) for r in slots]  # type: ignore[misc]
        finally:
            await engine.dispose()

    runs, slots = run_async(read)
    run_slots = [slot for slot, _ in runs]
    assert len(runs) >= 4, runs
    assert len(set(run_slots)) == len(run_slots), "a slot ran twice"
    # Each run is the one its claim allowed, by the claiming instance; a slot claimed just
    # as the daemons stopped may have had its run cancelled by the shutdown (and so no row).
    assert set(runs) <= set(slots)
    assert all(slot >= max(run_slots) for slot, _ in set(slots) - set(runs)), (runs, slots)
    assert {instance for _, instance in runs} <= instances
    # Both daemons fired the slots: the one that lost a claim said so.
    taken = "job slot taken by another instance job=gap-scan"
    assert taken in first.log + second.log


@pytest.mark.timeout(30)
async def test_a_run_cancelled_by_shutdown_is_a_warning_not_a_crash(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """A job held up by a stalled database is cancelled at shutdown: a warning, no traceback."""
    started = asyncio.Event()

    async def run(job: str, slot: datetime) -> None:
        started.set()
        await asyncio.Event().wait()  # a database that never answers

    scheduler = Scheduler({"gap-scan": "* * * * * *"}, run, misfire_grace=60)  # every second
    scheduler.start()
    await asyncio.wait_for(started.wait(), timeout=5)
    await scheduler.shutdown(grace=0.1)
    await asyncio.sleep(0.1)  # the executor's done-callback runs after the task ends
    assert "job cancelled by shutdown" in caplog.text
    assert not [r for r in caplog.records if r.levelname == "ERROR"], caplog.text
    assert "Traceback" not in caplog.text


@pytest.mark.timeout(30)
async def test_a_run_that_ends_within_the_grace_is_let_finish() -> None:
    started, finished = asyncio.Event(), asyncio.Event()

    async def run(job: str, slot: datetime) -> None:
        started.set()
        await asyncio.sleep(0.3)
        finished.set()

    scheduler = Scheduler({"gap-scan": "* * * * * *"}, run, misfire_grace=60)
    scheduler.start()
    await asyncio.wait_for(started.wait(), timeout=5)
    await scheduler.shutdown(grace=5)
    assert finished.is_set()

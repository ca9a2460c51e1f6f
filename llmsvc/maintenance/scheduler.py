"""The daemon's own scheduler: each maintenance job on its cron schedule (APScheduler 3).

It knows job names and triggers only; what a run does, and that each slot
runs once across instances, is `runs.run_job`'s. Runs that a stall made late
are not dropped: `misfire_grace_time` is the setting (APScheduler's default
of one second would skip them), several missed runs coalesce into one, and a
job never runs twice at once.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Awaitable, Callable
from datetime import datetime

from apscheduler.events import EVENT_JOB_SUBMITTED, JobSubmissionEvent
from apscheduler.schedulers.asyncio import AsyncIOScheduler

from llmsvc.config import cron_trigger
from llmsvc.logs import logger

log = logger(__name__)

RunSlot = Callable[[str, datetime], Awaitable[object]]


def next_run(schedule: str, now: datetime) -> datetime | None:
    """When a job on `schedule` next fires after `now`; None for a job left to the CLI."""
    if not schedule:
        return None
    fire: datetime | None = cron_trigger(schedule).get_next_fire_time(None, now)
    return fire


class Scheduler:
    """Fires `run(job, slot)` for each job at each scheduled time (`slot`)."""

    def __init__(self, schedules: dict[str, str], run: RunSlot, misfire_grace: int) -> None:
        self.schedules = {name: expr for name, expr in schedules.items() if expr}
        self._run = run
        self._scheduler = AsyncIOScheduler(
            job_defaults={
                "coalesce": True,
                "max_instances": 1,
                "misfire_grace_time": misfire_grace,
            }
        )
        self._slots: dict[str, datetime] = {}
        self._running: set[asyncio.Task[object]] = set()

    def start(self) -> None:
        self._scheduler.add_listener(self._submitted, EVENT_JOB_SUBMITTED)
        for name, expression in self.schedules.items():
            self._scheduler.add_job(self._fire, cron_trigger(expression), args=[name], id=name)
        self._scheduler.start()
        log.info("scheduler started", jobs=",".join(self.schedules) or "-")

    def next_runs(self) -> dict[str, datetime | None]:
        jobs = {job.id: job.next_run_time for job in self._scheduler.get_jobs()}
        return {name: jobs.get(name) for name in self.schedules}

    def _submitted(self, event: JobSubmissionEvent) -> None:
        """Note the run's scheduled time; called before the job's coroutine starts."""
        self._slots[event.job_id] = event.scheduled_run_times[-1]

    async def _fire(self, name: str) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._running.add(task)
        try:
            await self._run(name, self._slots.pop(name))
        except asyncio.CancelledError:
            # Only `shutdown` cancels a run, and has logged it; raised on, the
            # cancellation would reach APScheduler, which logs it as a crash.
            return
        finally:
            self._running.discard(task)

    async def shutdown(self, grace: float) -> None:
        """Stop firing; give running jobs `grace` seconds, then cancel them.

        APScheduler's own shutdown cancels running jobs at once, so it comes last.
        """
        self._scheduler.pause()
        running = list(self._running)
        if running:
            _done, pending = await asyncio.wait(running, timeout=grace)
            for task in pending:
                log.warning("scheduler: job cancelled by shutdown", task=task.get_name())
                task.cancel()
            for task in pending:
                with contextlib.suppress(asyncio.CancelledError):
                    await task
        self._scheduler.shutdown(wait=False)

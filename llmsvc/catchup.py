"""Boot's catch-up with the database: run in the background while the daemon serves from its WAL.

A daemon never needs the database to start serving: requests are journaled
in the WAL whatever the database does. What a boot owes the store (the
schema, the previous run's records, its open requests marked `interrupted`,
the consistency check) is done step by step here, each step retried with
backoff for as long as the database is away (`status.CatchUp`); health says
which step runs and what it waits for.
"""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import Awaitable, Callable, Coroutine
from datetime import UTC, datetime
from typing import Any

from llmsvc.gateway.breaker import CLOSED
from llmsvc.logs import logger
from llmsvc.maintenance.consistency import as_result, check_and_repair, format_ranges
from llmsvc.maintenance.jobs import job_table, schedules
from llmsvc.maintenance.retention import ensure_partitions
from llmsvc.maintenance.runs import record_run
from llmsvc.maintenance.scheduler import Scheduler
from llmsvc.operations import Operations
from llmsvc.store.engine import migrate
from llmsvc.store.flusher import load_checkpoint
from llmsvc.store.queries import open_work, stored_reply
from llmsvc.store.replay import replay
from llmsvc.tokens import count_completion, count_prompt

log = logger(__name__)


class CatchUpSteps:
    """The steps, in order (`run`); built before this run journals anything."""

    def __init__(self, ops: Operations, stopping: asyncio.Event) -> None:
        self.ops = ops
        self.stopping = stopping  # the followers end when it is set
        self.boot_end = ops.writer.end  # the previous runs' records end here
        self.checkpoint_loaded = False  # the flusher starts from the database's checkpoint
        # Tasks following the database from a step on, each by what its end is logged as.
        self.followers: dict[str, asyncio.Task[None]] = {}
        self.task: asyncio.Task[None] | None = None

    def start(self, serving: str) -> None:
        """Run the steps in the background; `serving` is the systemd status said at the end."""
        self.task = asyncio.create_task(self.run(serving), name="catch-up")

    async def run(self, serving: str) -> None:
        """Every step, each retried while the database is away."""
        ops, stopping = self.ops, self.stopping
        s, step, flusher = ops.settings, ops.catch_up.run, ops.flusher
        await step("migrating the database", self._migrate)
        log.info("boot: schema at head", database=s.redacted_database_url())
        await step("reading the provider switches", self._adopt_provider_states)
        if ops.keys is not None:
            await step("reading the keys", ops.keys.read)
            self._follow("keys no longer followed", ops.keys.follow(stopping), "keys")
        await step("reading the checkpoint", self._load_checkpoint)
        behind = self.boot_end.lsn - 1 - flusher.checkpoint
        await step(
            f"replaying {behind} WAL records",
            lambda: replay(flusher, "boot", flusher.checkpoint),
        )
        interrupted = await step(
            "marking requests the last run left open interrupted", self._interrupt_open_work
        )
        log.info("boot: requests left open by the last run marked interrupted", count=interrupted)
        ops.flush_to = None  # what this run journaled follows
        ops.flusher_task = asyncio.create_task(flusher.run(), name="flusher")
        self._follow(
            "provider switches no longer followed",
            ops.switches.follow(stopping),
            "provider-switches",
        )
        self._follow("rate limits no longer shared", ops.limiter.follow(stopping), "limits")
        await step("checking the store", self._check)
        ops.jobs = job_table(s, ops.maintenance, ops.instance, ops.writer)
        if not stopping.is_set():  # no jobs to start in a shutdown
            ops.scheduler = Scheduler(schedules(s), ops.run_job, s.job_misfire_grace_seconds)
            ops.scheduler.start()
        ops.catch_up.done()
        log.info("boot: caught up with the database")
        ops.catch_up.status(serving)

    def died(self) -> bool:
        """Whether the steps' task ended before they were done: a bug."""
        return self.task is not None and self.task.done() and self.ops.catch_up.step is not None

    async def end(self, deadline: float, fatal: Callable[[], bool], close: float) -> None:
        """Let the steps go on until `deadline` while the database answers; else stop them."""
        task = self.task
        assert task is not None  # started
        while not (task.done() or fatal() or self.ops.database_problem()):
            if time.monotonic() >= deadline:
                break
            await asyncio.wait({task}, timeout=0.1)
        await end_task(task, 0.0, close)

    async def drain(self, deadline: float | None, close: float) -> None:
        """Flush what is journaled before `deadline` (None: nothing); the rest stays in the WAL.

        Given a deadline only once every request of this run has ended (journaled)
        and the checkpoint is loaded, so nothing is marked by mistake.
        """
        ops = self.ops
        ops.flusher.stop()
        if ops.flusher_task is not None:
            await end_task(ops.flusher_task, close, close)
        if deadline is not None:
            ops.flush_to = None
            await ops.flusher.drain(max(0.0, deadline - time.monotonic()))
        left = ops.writer.end.lsn - 1 - ops.flusher.checkpoint
        if left > 0:
            log.warning("shutdown: records left in the WAL for the next boot", count=left)
        await ops.flusher.close()

    def _follow(self, ended: str, follow: Coroutine[Any, Any, None], name: str) -> None:
        self.followers[ended] = asyncio.create_task(follow, name=name)

    async def _migrate(self) -> None:
        s, maintenance = self.ops.settings, self.ops.maintenance
        await migrate(maintenance, s.redacted_database_url())
        await ensure_partitions(maintenance, s.token_partition_ahead_days)

    async def _adopt_provider_states(self) -> None:
        """The stored switches, and stored circuits for providers not called since boot."""
        states = await self.ops.switches.read()
        breakers = self.ops.router.breakers
        for name, row in states.items():
            circuit = breakers.circuit(name) if name in self.ops.providers else None
            untouched = circuit is not None and circuit.state == CLOSED and not circuit.outcomes
            if untouched and row["circuit_state"] != CLOSED:
                since = row["updated_at"].timestamp()
                breakers.restore(name, row["circuit_state"], row["failure_count"], since)
                log.info("boot: circuit %s", row["circuit_state"], provider=name)

    async def _load_checkpoint(self) -> None:
        """Resume the flusher at the database's checkpoint, never past where the log ended.

        A checkpoint past it means a power loss took the log's unsynced tail after
        the flusher had stored it: the LSNs after the log's end are this run's.
        """
        flusher = self.ops.flusher
        stored = await load_checkpoint(self.ops.engine, self.ops.instance)
        last = self.boot_end.lsn - 1
        if stored > last:
            log.warning(
                "boot: the database holds records of this instance up to lsn=%d but the WAL "
                "ends at lsn=%d (its unsynced tail was lost); records after it are this run's",
                stored,
                last,
            )
            stored = last
        if stored != flusher.checkpoint:
            await flusher.start(stored)
        self.checkpoint_loaded = True

    async def _interrupt_open_work(self) -> int:
        """Journal an `interrupted` end for every request a previous run left `streaming`.

        The flusher has stored the previous runs' records and none of this
        run's, so what is still open is theirs.
        """
        found = await open_work(self.ops.maintenance, self.ops.instance)
        journaled: list[Awaitable[int]] = []
        for work in found:
            for attempt_id, tokens in work.attempts.items():
                self.ops.journal.attempt_end(
                    attempt_id,
                    status="interrupted",
                    token_count=tokens,
                    error_code="restart",
                    error_message="llmsvc stopped before the reply ended",
                )
            journaled.append(
                self.ops.journal.request_end(
                    work.request_id,
                    status="interrupted",
                    error="llmsvc stopped before the reply ended",
                    **await self._counted_usage(work.request_id),
                )
            )
        if journaled:
            await asyncio.shield(journaled[-1])
        return len(found)

    async def _counted_usage(self, request_id: uuid.UUID) -> dict[str, Any]:
        """An unended request's tokens, counted from what the store holds, and their cost."""
        reply = await stored_reply(self.ops.maintenance, request_id)
        if reply is None or not reply.deltas:
            return {}  # nothing received: nothing known billed
        completion, completion_source = count_completion(reply.model, [reply.texts], reply.deltas)
        prompt, prompt_source = count_prompt(reply.model, reply.messages)
        return {
            "prompt_tokens": prompt,
            "completion_tokens": completion,
            "prompt_tokens_source": prompt_source,
            "completion_tokens_source": completion_source,
            "provider": reply.provider,
            "cost": self.ops.router.cost(reply.provider, reply.model, prompt, completion),
        }

    async def _check(self) -> None:
        """The consistency check, token holes refilled from the WAL first, stored as a run.

        Problems left after the refill are logged, never hidden.
        """
        started = datetime.now(UTC)
        engine, wal_dir = self.ops.maintenance, self.ops.settings.wal_dir
        report, repaired = await check_and_repair(engine, wal_dir, self.ops.repairs)
        await record_run(engine, "check", self.ops.instance, started, as_result(report, repaired))
        for refill in repaired.get("refilled", []):
            log.info(
                "boot: token gap refilled from the WAL",
                attempt=refill["attempt_id"],
                seqs=format_ranges(refill["seqs"], sep=","),
                rows=refill["rows"],
            )
        for problem in report.problems:
            log.warning("boot: consistency problem: %s", problem)
        log.info(
            "boot: consistency check %s",
            "ok" if report.ok else "found problems",
            gaps=len(report.gaps),
            count_mismatches=len(report.mismatches),
        )


async def end_task(task: asyncio.Task[Any], within: float, close: float) -> None:
    """Give `task` up to `within` seconds to end, then cancel it (and wait `close` s more)."""
    if not (await asyncio.wait({task}, timeout=max(0.0, within)))[0]:
        task.cancel()
        await asyncio.wait({task}, timeout=close)
    if task.done() and not task.cancelled() and task.exception() is not None:
        log.error("shutdown: task %s had failed", task.get_name(), exc_info=task.exception())

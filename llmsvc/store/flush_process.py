"""The daemon's side of the flush process: starts it, asks it for batches, stops it.

A flush's CPU (reading records, building rows, SQLAlchemy and the driver)
came in bursts on the serving process's one GIL, in front of the requests
that arrived meanwhile: the p99 tail at c=1 (BENCHMARKS.md, "The tail side
by side"). The child (`flush_child.py`) does that work on the other core,
yielding to this process (`flush_priority.py`).
At most one request is in flight: one the flusher stopped waiting for (its
bound passed) is waited for again by the next flush, never sent twice.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import sys
from dataclasses import asdict, astuple, dataclass
from typing import Any

import orjson

from llmsvc.logs import logger
from llmsvc.store.flush_priority import CLAIM_SECONDS, set_policy
from llmsvc.wal import Position

log = logger(__name__)

STOP_SECONDS = 1.0  # to finish the batch under way once stdin closes, before a SIGKILL


@dataclass(frozen=True, slots=True)
class ChildConfig:
    """What the child needs to open the store and the log, sent on its stdin (the database
    URL may hold a password: never in its arguments or environment)."""

    daemon_pid: int
    database_url: str
    timeout: float | None
    wal_dir: str
    instance: str
    log_level: str
    log_json: bool
    secrets: list[str]
    process: str


class FlushProcessGone(Exception):
    """The flush process ended; the flusher writes in the daemon until it is started again."""


class FlushFailed(Exception):
    """The flush process's transaction failed for a reason that is not the records'."""


class FlushTimedOut(FlushFailed, TimeoutError):
    """… because the database did not answer in time."""


class FlushProcess:
    """One child process and its pipes."""

    def __init__(self, proc: asyncio.subprocess.Process) -> None:
        self.proc = proc
        self.ready = False  # it has opened the store and the log: until then the daemon flushes
        self.yields = False  # it runs as SCHED_IDLE, and is raised when an answer is late
        self._asked: asyncio.Future[dict[str, Any]] | None = None  # the request in flight
        self._replies = asyncio.create_task(self._read_replies(), name="flush-process-replies")

    @classmethod
    async def start(cls, config: ChildConfig) -> FlushProcess:
        proc = await asyncio.create_subprocess_exec(
            sys.executable,
            "-P",  # `-m` would put the working directory, and any llmsvc in it, first
            "-m",
            "llmsvc.store.flush_child",
            stdin=asyncio.subprocess.PIPE,
            stdout=asyncio.subprocess.PIPE,
        )
        assert proc.stdin is not None
        proc.stdin.write(orjson.dumps(asdict(config)) + b"\n")
        return cls(proc)

    @property
    def pid(self) -> int:
        return self.proc.pid

    @property
    def alive(self) -> bool:
        return not self._replies.done()

    async def flush(
        self, start: Position, end: Position, max_records: int, checkpoint: int
    ) -> dict[str, Any]:
        """The child's answer for the batch from `start`.

        A request still unanswered (its flush gave up waiting) is waited for
        instead of asking again: nothing has moved the flusher meanwhile, so
        it was asked from the same `start`.
        """
        if self._asked is None:
            if not self.alive:
                raise FlushProcessGone(f"the flush process (pid {self.pid}) has ended")
            request = {
                "start": astuple(start),
                "end": astuple(end),
                "max_records": max_records,
                "checkpoint": checkpoint,
            }
            assert self.proc.stdin is not None
            self.proc.stdin.write(orjson.dumps(request) + b"\n")
            self._asked = asyncio.get_running_loop().create_future()
        if self.yields and not (await asyncio.wait({self._asked}, timeout=CLAIM_SECONDS))[0]:
            self._claim()
        reply = await asyncio.shield(self._asked)
        self._asked = None
        if "failed" in reply:
            raise (FlushTimedOut if reply["timed_out"] else FlushFailed)(reply["failed"])
        return reply

    def _claim(self) -> None:
        """Raise the child to SCHED_OTHER: its answer is late, and SCHED_IDLE would leave it
        no CPU while the serving process takes all of it. It lowers itself again next batch."""
        try:
            set_policy(self.pid, os.SCHED_OTHER)
        except FileNotFoundError:  # it has ended: `_read_replies` sees that
            pass
        except OSError as exc:
            log.warning("flush process: its priority could not be raised", error=str(exc))

    async def _read_replies(self) -> None:
        stdout = self.proc.stdout
        assert stdout is not None
        if line := await stdout.readline():
            self.yields = orjson.loads(line)["yields"]
            self.ready = True
            log.info("flush process ready", pid=self.pid, yields_cpu=self.yields)
        while line := await stdout.readline():
            if self._asked is not None and not self._asked.done():
                self._asked.set_result(orjson.loads(line))
        code = await self.proc.wait()
        if self._asked is not None and not self._asked.done():
            self._asked.set_exception(
                FlushProcessGone(f"the flush process (pid {self.pid}) ended with code {code}")
            )

    async def close(self) -> None:
        """Close its stdin, let it finish the batch under way, then kill what is left: a
        killed batch is a transaction rolled back."""
        assert self.proc.stdin is not None
        self.proc.stdin.close()
        try:
            await asyncio.wait_for(self.proc.wait(), STOP_SECONDS)
        except TimeoutError:
            # The loop may have seen it end as the wait ran out: then there is none to kill.
            with contextlib.suppress(ProcessLookupError):
                self.proc.kill()
            await self.proc.wait()
        await self._replies
        if self._asked is not None and self._asked.done():
            self._asked.exception()  # seen: an answer no flush waits for any more

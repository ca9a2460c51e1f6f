"""Boot's catch-up with the database: run in the background while the daemon serves from its WAL.

A daemon never needs the database to start serving: requests are journaled
in the WAL whatever the database does. What a boot owes the store (the
schema, the previous run's records, its open requests marked `interrupted`,
the consistency check) is done step by step here, each step retried with
backoff for as long as the database is away; health says which step runs
and what it waits for.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable
from typing import TypeVar

from llmsvc.errors import LlmsvcError
from llmsvc.logs import logger
from llmsvc.store.engine import describe_error

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

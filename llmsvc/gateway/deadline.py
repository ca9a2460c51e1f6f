"""A task's movable deadline, as `asyncio.timeout_at` keeps one, for a loop and task in hand.

Python 3.11's `asyncio.timeout` looks up the running loop and task when made, entered
and moved: each lookup is a getpid(2). A request bounds its provider calls twice (the
shutdown's interruption, the attempt's deadline) and paid six of those syscalls for
it (strace, BENCHMARKS.md). This is the same contract for a task the request looked up
once (its loop is the task's): expiry cancels the task, and the cancellation leaves the
`with` as TimeoutError unless something else cancelled the task too. Its timer is one of
the loop's shared ones (llmsvc/timers.py): a stream keeps it for minutes.
"""

from __future__ import annotations

import asyncio
from types import TracebackType
from typing import Any

from llmsvc.timers import Timer, timers


class Deadline:
    """`with Deadline(task, when):` bounds the block, run by `task`, by its loop's time
    `when` (None: unbounded until moved). Entering and leaving await nothing: a plain `with`."""

    __slots__ = ("_cancelling", "_expired", "_inside", "_task", "_timer", "_when")

    def __init__(self, task: asyncio.Task[Any], when: float | None) -> None:
        self._task, self._when = task, when
        self._timer: Timer | None = None
        self._inside = self._expired = False
        self._cancelling = 0  # the task's pending cancellations when the block began

    def __enter__(self) -> Deadline:
        self._inside = True
        self._cancelling = self._task.cancelling()
        self.reschedule(self._when)
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self._inside = False
        self._disarm()
        if (
            self._expired
            and exc_type is asyncio.CancelledError
            and self._task.uncancel() <= self._cancelling
        ):
            raise TimeoutError from exc

    def reschedule(self, when: float | None) -> None:
        """Move the deadline (None: none); one already past expires at the loop's next round.
        Nothing once the block is left or the deadline expired."""
        if not self._inside or self._expired:
            return
        self._disarm()
        self._when = when
        if when is not None:  # one already past expires at the next round (Timers.call_at)
            self._timer = timers(self._task.get_loop()).call_at(when, self._expire)

    def expired(self) -> bool:
        return self._expired

    def _disarm(self) -> None:
        if self._timer is not None:
            timers(self._task.get_loop()).cancel(self._timer)
            self._timer = None

    def _expire(self) -> None:
        self._timer = None
        self._expired = True
        self._task.cancel()

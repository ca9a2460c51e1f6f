"""Many deadlines on one loop timer: a heap of them in Python, the loop's timer armed for
the earliest.

An open stream keeps two deadlines for minutes: its attempt's bound (gateway/deadline.py)
and its upstream's silence (providers/upstream_http.py); a connection keeps one, its head's,
body's, keep-alive's or linger's (gateway/http_protocol.py). A uvloop `call_at` costs ~540
bytes (its handle, libuv's timer, a copy of the context, the bound method); a timer here
costs a heap entry and the callback, ~150 bytes (BENCHMARKS.md, "What an open stream keeps").
They fire as the loop's own would: when due, in order, in a loop callback.
"""

from __future__ import annotations

import asyncio
import heapq
import itertools
import math
import weakref
from collections.abc import Callable
from typing import Any

# A timer: [when, sequence, callback]; the callback is None once cancelled or fired. A list:
# the heap compares it in C, by time, then by scheduling (the sequence), never by callback.
# One already due when made is not in the heap: its sequence is DUE (see `call_at`).
Timer = list[Any]
DUE = -1
COMPACT_AFTER = 64  # cancelled timers the heap may hold before a clean-up is considered
# Each loop's timers, held weakly: the loop's own timer, armed while any is pending, is what
# keeps them, so a loop dropped with timers pending goes as a loop with a `call_at` would.
_of_loop: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, weakref.ref[Timers]] = (
    weakref.WeakKeyDictionary()
)


def timers(loop: asyncio.AbstractEventLoop) -> Timers:
    """The loop's timers, made at the first use (again once none is pending)."""
    held = _of_loop.get(loop)
    found = held() if held is not None else None
    if found is None:
        found = Timers(loop)
        _of_loop[loop] = weakref.ref(found)
    return found


class Timers:
    """One loop's timers. Not thread-safe: used from the loop, as `call_at` is."""

    __slots__ = ("__weakref__", "_armed", "_cancelled", "_handle", "_heap", "_loop", "_sequence")

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self._loop = loop
        self._heap: list[Timer] = []
        self._sequence = itertools.count()
        self._handle: asyncio.TimerHandle | None = None
        self._armed = math.inf  # when the loop's timer fires
        self._cancelled = 0  # cancelled timers still in the heap

    def call_at(self, when: float, callback: Callable[[], object]) -> Timer:
        """Call `callback` at the loop's time `when`; `cancel` the timer returned to not.

        One already due runs at the loop's next round, before what the round after brings,
        as `call_soon` would (a shutdown's interruption goes before later callbacks)."""
        if when <= self._loop.time():
            timer: Timer = [when, DUE, callback]
            self._loop.call_soon(self._run, timer)
            return timer
        timer = [when, next(self._sequence), callback]
        heapq.heappush(self._heap, timer)
        if when < self._armed:
            self._arm(when)
        return timer

    def cancel(self, timer: Timer) -> None:
        """Not call the timer's callback; nothing if it ran or was cancelled. A heap mostly of
        cancelled timers (streams that ended before their far deadlines) is cleaned."""
        if timer[2] is None:
            return
        timer[2] = None
        if timer[1] == DUE:  # not in the heap: `_run` finds it cancelled
            return
        self._cancelled += 1
        if self._cancelled > COMPACT_AFTER and 2 * self._cancelled > len(self._heap):
            self._heap = [t for t in self._heap if t[2] is not None]
            heapq.heapify(self._heap)
            self._cancelled = 0

    def __len__(self) -> int:
        """Timers waiting in the heap, cancelled ones not counted."""
        return len(self._heap) - self._cancelled

    def _arm(self, when: float) -> None:
        if self._handle is not None:
            self._handle.cancel()
        self._armed = when
        self._handle = self._loop.call_at(when, self._fire)

    def _fire(self) -> None:
        """Run the due timers, then arm the loop's timer for the next. Due means within a
        millisecond, the resolution of uvloop's clock, as asyncio's own loop counts it."""
        self._handle, self._armed = None, math.inf
        heap, due = self._heap, self._loop.time() + 0.001
        while heap and heap[0][0] <= due:
            timer = heapq.heappop(heap)
            if timer[2] is None:
                self._cancelled -= 1
            else:
                self._run(timer)
        if heap:
            self._arm(heap[0][0])

    def _run(self, timer: Timer) -> None:
        """Call a due timer's callback, unless it was cancelled; once."""
        callback, timer[2] = timer[2], None
        if callback is None:
            return
        try:
            callback()
        except Exception as exc:  # as the loop treats a failing callback: told, not fatal
            self._loop.call_exception_handler(
                {"message": "a timer's callback failed", "exception": exc}
            )

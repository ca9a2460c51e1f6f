"""At most a few requests begin in one loop round; the rest begin in the rounds after it.

A request's set-up (validation, admission, its records, routing, the upstream's
request) is ~150 µs of Python that runs without yielding until it waits on the
upstream, and the loop runs every ready callback before it polls again. 300
arriving at once ran their set-ups back to back, ~45 ms in which open streams'
tokens waited and, on a cold pool, no upstream request went out. Letting PER_ROUND
begin and the rest wait their turn, in arrival order, lets the loop poll between
them (docs/DECISIONS.md, "A burst of arrivals begins a round at a time").
"""

from __future__ import annotations

import asyncio
from collections import deque

PER_ROUND = 16  # requests that begin in one loop round: ~2.4 ms of set-ups between polls


class Starts:
    """The turns of one loop's requests to begin: `begin` at once if this round has one
    left and nobody waits, else `await turn()` for one in a later round."""

    __slots__ = ("_armed", "_left", "_loop", "_waiting", "_woken")

    def __init__(self) -> None:
        self._loop: asyncio.AbstractEventLoop | None = None  # whose rounds these are
        self._left = PER_ROUND  # turns left in this round
        self._waiting: deque[asyncio.Future[None]] = deque()
        self._woken = 0  # given a turn, not yet running: nobody new goes before them
        self._armed = False  # `_next_round` is called soon

    def begin(self) -> bool:
        """Take a turn in this round if one is left and nobody waits for one."""
        self._arm()
        if self._left and not self._waiting and not self._woken:
            self._left -= 1
            return True
        return False

    async def turn(self) -> None:
        """Wait for a turn in a later round, after the requests that came before."""
        waiter = self._arm().create_future()
        self._waiting.append(waiter)
        try:
            await waiter  # a waiter cancelled before its turn passes it on (`_next_round`)
        finally:
            if waiter.done() and not waiter.cancelled():
                self._woken -= 1

    def _arm(self) -> asyncio.AbstractEventLoop:
        """The next round's call, once for the round: its turns are counted from then. On
        another loop than the last (a test's), the rounds start afresh: nothing of a loop
        gone may hold back this one."""
        loop = asyncio.get_running_loop()
        if loop is not self._loop:
            self._loop, self._left, self._woken, self._armed = loop, PER_ROUND, 0, False
            self._waiting.clear()
        if not self._armed:
            self._armed = True
            loop.call_soon(self._next_round)
        return loop

    def _next_round(self) -> None:
        """A new round: its turns go first to the requests waiting, in order."""
        self._armed = False
        left, waiting = PER_ROUND, self._waiting
        while waiting and left:
            waiter = waiting.popleft()
            if not waiter.done():  # else cancelled while it waited (a stop): its turn passes
                waiter.set_result(None)
                self._woken += 1
                left -= 1
        self._left = left
        if waiting or left < PER_ROUND:
            self._arm()

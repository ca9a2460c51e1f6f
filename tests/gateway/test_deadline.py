"""Deadline: asyncio.timeout_at's contract, with the loop and task given."""

from __future__ import annotations

import asyncio
import math
from typing import Any

import pytest

from llmsvc.gateway.deadline import Deadline
from llmsvc.timers import timers


def _here() -> tuple[asyncio.AbstractEventLoop, asyncio.Task[Any]]:
    loop = asyncio.get_running_loop()
    task = asyncio.current_task(loop)
    assert task is not None
    return loop, task


async def _bounded(bound: Deadline, move_to: float | None = None, wait: float = 5) -> None:
    """Sleep `wait` s inside `bound`, moved to `move_to` first if given."""
    with bound:
        if move_to is not None:
            bound.reschedule(move_to)
        await asyncio.sleep(wait)


async def test_a_deadline_that_passes_ends_the_block_with_timeout_error() -> None:
    loop, task = _here()
    bound = Deadline(task, loop.time() + 0.01)
    with pytest.raises(TimeoutError):
        await _bounded(bound)
    assert bound.expired()
    assert task.cancelling() == 0  # its own cancellation taken back


async def test_a_block_done_in_time_is_untouched_and_leaves_no_timer() -> None:
    loop, task = _here()
    bound = Deadline(task, loop.time() + 0.05)
    await _bounded(bound, wait=0)
    assert len(timers(loop)) == 0
    await asyncio.sleep(0.1)  # past the deadline: nothing cancels the task now
    assert not bound.expired()


async def test_moved_later_it_waits_and_moved_to_none_it_never_expires() -> None:
    loop, task = _here()
    with Deadline(task, loop.time() + 0.02) as bound:
        bound.reschedule(loop.time() + 0.2)
        await asyncio.sleep(0.05)
        bound.reschedule(None)
        await asyncio.sleep(0.25)
    assert not bound.expired()


async def test_moved_to_the_past_it_expires_at_the_next_round() -> None:
    loop, task = _here()
    bound = Deadline(task, None)
    with pytest.raises(TimeoutError):
        await _bounded(bound, move_to=-math.inf)
    assert bound.expired()
    bound.reschedule(loop.time() + 0.01)  # left: moving it does nothing
    await asyncio.sleep(0.05)


async def test_another_cancellation_stays_a_cancellation() -> None:
    bounds: list[Deadline] = []

    async def bounded(started: asyncio.Event) -> None:
        loop, task = _here()
        with Deadline(task, loop.time() + 5) as bound:
            bounds.append(bound)
            started.set()
            await asyncio.sleep(5)

    started = asyncio.Event()
    runner = asyncio.create_task(bounded(started))
    await started.wait()
    runner.cancel()  # before the deadline
    with pytest.raises(asyncio.CancelledError):
        await runner

    started.clear()
    both = asyncio.create_task(bounded(started))
    await started.wait()
    bounds[-1].reschedule(-math.inf)  # the deadline's cancellation, and in the same round
    both.cancel()  # another one: the block must not swallow it as its own
    with pytest.raises(asyncio.CancelledError):
        await both
    assert bounds[-1].expired()


async def test_nested_the_outer_expiry_is_the_outers_and_the_inner_is_the_inners() -> None:
    loop, task = _here()
    outer, inner = Deadline(task, None), Deadline(task, loop.time() + 5)

    async def outer_expires() -> None:
        with outer:
            await _bounded(inner, move_to=None)

    loop.call_soon(outer.reschedule, -math.inf)  # once both are entered
    with pytest.raises(TimeoutError):
        await outer_expires()
    assert (outer.expired(), inner.expired()) == (True, False)

    outer, inner = Deadline(task, None), Deadline(task, loop.time() + 0.01)
    with outer, pytest.raises(TimeoutError):
        await _bounded(inner)
    assert (outer.expired(), inner.expired()) == (False, True)
    assert task.cancelling() == 0

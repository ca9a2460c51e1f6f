"""Timers: many deadlines on one loop timer, fired as the loop's own would be."""

from __future__ import annotations

import asyncio
import gc
import logging
import weakref

import pytest

from llmsvc.timers import COMPACT_AFTER, timers


async def test_timers_fire_in_time_order_then_scheduling_order() -> None:
    loop = asyncio.get_running_loop()
    fired: list[str] = []
    now = loop.time()
    for name, delay in [("c", 0.06), ("a", 0.02), ("b1", 0.04), ("b2", 0.04)]:
        timers(loop).call_at(now + delay, lambda n=name: fired.append(n))
    await asyncio.sleep(0.01)
    assert fired == []
    await asyncio.sleep(0.1)
    assert fired == ["a", "b1", "b2", "c"]
    assert len(timers(loop)) == 0


async def test_a_timer_never_fires_early() -> None:
    loop = asyncio.get_running_loop()
    fired: list[float] = []
    when = loop.time() + 0.03
    timers(loop).call_at(when, lambda: fired.append(loop.time()))
    await asyncio.sleep(0.08)
    assert len(fired) == 1
    assert fired[0] >= when - 0.001  # the loop clock's resolution


async def test_an_earlier_timer_rearms_the_loop_timer() -> None:
    loop = asyncio.get_running_loop()
    fired: list[str] = []
    timers(loop).call_at(loop.time() + 30, lambda: fired.append("late"))
    timers(loop).call_at(loop.time() + 0.02, lambda: fired.append("soon"))
    await asyncio.sleep(0.06)
    assert fired == ["soon"]
    assert len(timers(loop)) == 1


async def test_a_cancelled_timer_does_not_fire_and_cancel_is_idempotent() -> None:
    loop = asyncio.get_running_loop()
    fired: list[str] = []
    timer = timers(loop).call_at(loop.time() + 0.02, lambda: fired.append("x"))
    timers(loop).cancel(timer)
    timers(loop).cancel(timer)
    assert len(timers(loop)) == 0
    await asyncio.sleep(0.05)
    assert fired == []


async def test_cancelling_a_fired_timer_changes_nothing() -> None:
    loop = asyncio.get_running_loop()
    fired: list[str] = []
    timer = timers(loop).call_at(loop.time(), lambda: fired.append("x"))
    other = timers(loop).call_at(loop.time() + 0.05, lambda: fired.append("y"))
    await asyncio.sleep(0.01)
    timers(loop).cancel(timer)
    assert fired == ["x"]
    assert len(timers(loop)) == 1
    await asyncio.sleep(0.08)
    assert fired == ["x", "y"]
    timers(loop).cancel(other)
    assert len(timers(loop)) == 0


async def test_a_heap_of_cancelled_timers_is_cleaned() -> None:
    """Streams that end long before their far deadlines leave nothing behind."""
    loop = asyncio.get_running_loop()
    fired: list[int] = []
    far = [timers(loop).call_at(loop.time() + 900, lambda: None) for _ in range(1000)]
    kept = timers(loop).call_at(loop.time() + 0.03, lambda: fired.append(1))
    for timer in far:
        timers(loop).cancel(timer)
    assert len(timers(loop)) == 1
    assert len(timers(loop)._heap) <= 2 * COMPACT_AFTER + 1
    await asyncio.sleep(0.06)
    assert fired == [1]
    timers(loop).cancel(kept)


async def test_a_failing_callback_is_reported_and_the_rest_still_fire(
    caplog: pytest.LogCaptureFixture,
) -> None:
    loop = asyncio.get_running_loop()
    fired: list[str] = []

    def fail() -> None:
        raise RuntimeError("boom")

    now = loop.time()
    timers(loop).call_at(now + 0.01, fail)
    timers(loop).call_at(now + 0.01, lambda: fired.append("same round"))
    timers(loop).call_at(now + 0.04, lambda: fired.append("later"))
    with caplog.at_level(logging.ERROR, logger="asyncio"):
        await asyncio.sleep(0.08)
    assert fired == ["same round", "later"]
    assert "a timer's callback failed" in caplog.text


def test_each_loop_has_its_own_timers() -> None:
    first, second = asyncio.new_event_loop(), asyncio.new_event_loop()
    try:
        assert timers(first) is timers(first)
        assert timers(first) is not timers(second)
    finally:
        first.close()
        second.close()


def test_a_loop_dropped_with_timers_pending_is_not_kept() -> None:
    """Nothing global keeps a loop, its timers or what their callbacks hold."""
    loop = asyncio.new_event_loop()
    held = object()
    timers(loop).call_at(loop.time() + 900, lambda: print(held))
    gone = weakref.ref(loop)
    loop.close()
    del loop
    gc.collect()
    assert gone() is None


async def test_timers_made_again_after_none_is_pending_still_fire() -> None:
    loop = asyncio.get_running_loop()
    fired: list[str] = []
    timers(loop).call_at(loop.time(), lambda: fired.append("first"))
    await asyncio.sleep(0.01)
    gc.collect()
    timers(loop).call_at(loop.time() + 0.01, lambda: fired.append("second"))
    await asyncio.sleep(0.05)
    assert fired == ["first", "second"]


async def test_a_timer_already_due_runs_before_what_the_next_round_brings() -> None:
    """As call_soon: it goes before a callback scheduled after it, and is not in the heap."""
    loop = asyncio.get_running_loop()
    fired: list[str] = []
    timers(loop).call_at(loop.time() - 1, lambda: fired.append("due"))
    loop.call_soon(lambda: fired.append("after"))
    assert len(timers(loop)) == 0
    await asyncio.sleep(0)
    await asyncio.sleep(0)
    assert fired == ["due", "after"]


async def test_a_timer_already_due_can_be_cancelled() -> None:
    loop = asyncio.get_running_loop()
    fired: list[str] = []
    timer = timers(loop).call_at(loop.time(), lambda: fired.append("due"))
    timers(loop).cancel(timer)
    timers(loop).cancel(timer)
    await asyncio.sleep(0.01)
    assert fired == []
    assert len(timers(loop)) == 0

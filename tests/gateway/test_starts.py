"""Starts: a burst of requests begins a few per loop round, in arrival order, with the
loop's other work run between them."""

from __future__ import annotations

import asyncio

from llmsvc.gateway.starts import PER_ROUND, Starts


async def _request(starts: Starts, name: str, log: list[str]) -> None:
    """What Gateway.__call__ does first, then the set-up's mark."""
    if not starts.begin():
        await starts.turn()
    log.append(name)


async def test_a_burst_begins_a_round_at_a_time_with_the_loops_work_between() -> None:
    loop = asyncio.get_running_loop()
    starts, log = Starts(), []
    names = [f"r{i}" for i in range(2 * PER_ROUND + 3)]
    tasks = [asyncio.create_task(_request(starts, name, log)) for name in names]
    # Work the loop was given while the burst arrived (an upstream's bytes, say).
    loop.call_soon(lambda: log.append("other work"))
    await asyncio.gather(*tasks)
    assert [n for n in log if n != "other work"] == names  # in arrival order
    assert log.index("other work") == PER_ROUND  # after the first round, before the second
    for at in (PER_ROUND, 2 * PER_ROUND):  # each round's first waited for the loop
        assert log[at + 1] == names[at]


async def test_a_new_arrival_waits_behind_those_already_waiting() -> None:
    starts, log = Starts(), []
    first = [asyncio.create_task(_request(starts, f"r{i}", log)) for i in range(PER_ROUND + 1)]
    await asyncio.sleep(0)  # the first round ran: PER_ROUND began, one waits
    assert len(log) == PER_ROUND
    assert not starts.begin()  # a turn is left in no round while one waits
    late = asyncio.create_task(_request(starts, "late", log))
    await asyncio.gather(*first, late)
    assert log[PER_ROUND:] == [f"r{PER_ROUND}", "late"]


async def test_turns_come_back_each_round() -> None:
    starts = Starts()
    for _ in range(3):
        assert all(starts.begin() for _ in range(PER_ROUND))
        assert not starts.begin()
        await asyncio.sleep(0)  # a new round
        await asyncio.sleep(0)


async def test_a_cancelled_wait_passes_its_turn_on() -> None:
    starts, log = Starts(), []
    first = [asyncio.create_task(_request(starts, f"f{i}", log)) for i in range(PER_ROUND)]
    gone = asyncio.create_task(_request(starts, "gone", log))
    kept = [asyncio.create_task(_request(starts, f"k{i}", log)) for i in range(PER_ROUND)]
    await asyncio.sleep(0)  # the first round: PER_ROUND began, the rest wait
    gone.cancel()  # a stop's cancel while it waits: it never begins
    await asyncio.gather(*first, *kept)
    assert gone.cancelled()
    assert log == [f"f{i}" for i in range(PER_ROUND)] + [f"k{i}" for i in range(PER_ROUND)]
    assert starts.begin()  # every turn came back: none is held by the cancelled wait


async def test_a_request_cancelled_once_given_its_turn_holds_none() -> None:
    starts, log = Starts(), []
    first = [asyncio.create_task(_request(starts, f"f{i}", log)) for i in range(PER_ROUND)]
    woken = [asyncio.create_task(_request(starts, f"w{i}", log)) for i in range(PER_ROUND)]
    await asyncio.sleep(0)  # the first round: PER_ROUND began, the rest wait
    await asyncio.sleep(0)  # the second: the waiting are given their turns, not yet running
    assert not starts.begin()  # nobody new goes before them
    woken[0].cancel()
    await asyncio.gather(*first, *woken[1:])
    assert woken[0].cancelled()
    assert log[PER_ROUND:] == [f"w{i}" for i in range(1, PER_ROUND)]
    assert starts.begin()


def test_a_new_loop_starts_its_rounds_afresh() -> None:
    """Turns taken on a loop that closed since (a test's) hold nothing back on the next:
    its rounds, its turns and its waiters went with it."""
    starts = Starts()
    first = asyncio.new_event_loop()

    async def burst() -> None:
        for _ in range(PER_ROUND):
            assert starts.begin()
        assert not starts.begin()

    first.run_until_complete(burst())
    first.close()

    async def later() -> bool:
        return starts.begin()

    assert asyncio.run(later())

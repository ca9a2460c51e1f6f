"""Workers asking each other to store their WALs (`llmsvc.siblings`): real Unix sockets in
real directories, on a real event loop; each worker's own catch-up is a gate the test
opens, as the store catching up would."""

from __future__ import annotations

import asyncio
import stat
import time
from pathlib import Path

import pytest

from llmsvc.errors import LlmsvcError, ServiceUnavailable
from llmsvc.siblings import MAX_PATH_BYTES, Siblings, socket_path


class Worker:
    """A worker's siblings endpoint whose store catches up when the test says so."""

    def __init__(self, own: Path, others: list[Path], wait_seconds: float = 5.0) -> None:
        self.stored = asyncio.Event()
        self.asked = 0
        self.siblings = Siblings(own, others, self.caught_up, wait_seconds)

    async def caught_up(self) -> None:
        self.asked += 1
        try:
            async with asyncio.timeout(1.0):
                await self.stored.wait()
        except TimeoutError:
            raise ServiceUnavailable("the store has not caught up") from None


def paths(tmp_path: Path, n: int) -> list[Path]:
    dirs = [tmp_path / f"worker-{k}" for k in range(n)]
    for directory in dirs:
        directory.mkdir(mode=0o700)
    return [socket_path(directory) for directory in dirs]


async def test_a_worker_waits_until_every_other_has_stored_its_wal(tmp_path: Path) -> None:
    a, b, c = paths(tmp_path, 3)
    asker = Worker(a, [b, c])
    others = [Worker(b, [a, c]), Worker(c, [a, b])]
    try:
        waiting = asyncio.create_task(asker.siblings.others_caught_up())
        await asyncio.sleep(0.1)
        assert [w.asked for w in others] == [1, 1]
        others[0].stored.set()
        await asyncio.sleep(0.1)
        assert not waiting.done()  # one of the two has answered
        others[1].stored.set()
        await asyncio.wait_for(waiting, 1.0)
        assert asker.asked == 0  # its own store is its own caller's to wait for
    finally:
        for worker in (asker, *others):
            worker.siblings.close()


async def test_a_worker_that_is_not_running_is_not_waited_for(tmp_path: Path) -> None:
    a, b = paths(tmp_path, 2)
    asker = Worker(a, [b])
    try:
        started = time.monotonic()
        await asker.siblings.others_caught_up()
        assert time.monotonic() - started < 0.5
        gone = Worker(b, [a])
        gone.siblings.close()  # its socket file stays, nobody reads it
        await asker.siblings.others_caught_up()
    finally:
        asker.siblings.close()


async def test_a_worker_whose_store_does_not_catch_up_is_a_503_naming_the_bound(
    tmp_path: Path,
) -> None:
    a, b = paths(tmp_path, 2)
    asker, stuck = Worker(a, [b], wait_seconds=0.3), Worker(b, [a])
    try:
        with pytest.raises(ServiceUnavailable, match=r"0\.3 s \(database_timeout_seconds\)"):
            await asker.siblings.others_caught_up()
    finally:
        asker.siblings.close()
        stuck.siblings.close()


async def test_answers_are_matched_to_their_question(tmp_path: Path) -> None:
    """Two questions at once: each returns once its own answer came."""
    a, b = paths(tmp_path, 2)
    asker, other = Worker(a, [b]), Worker(b, [a])
    try:
        first = asyncio.create_task(asker.siblings.others_caught_up())
        second = asyncio.create_task(asker.siblings.others_caught_up())
        await asyncio.sleep(0.1)
        assert other.asked == 2
        assert not first.done()
        assert not second.done()
        other.stored.set()
        await asyncio.wait_for(asyncio.gather(first, second), 1.0)
    finally:
        asker.siblings.close()
        other.siblings.close()


async def test_the_socket_is_private_and_a_stale_one_is_replaced(tmp_path: Path) -> None:
    (a,) = paths(tmp_path, 1)
    a.write_bytes(b"")  # left by a worker that died
    worker = Worker(a, [])
    try:
        assert stat.S_ISSOCK(a.stat().st_mode)
        assert stat.S_IMODE(a.stat().st_mode) == 0o600
    finally:
        worker.siblings.close()


def test_a_wal_dir_too_long_for_a_socket_is_refused_naming_it(tmp_path: Path) -> None:
    deep = tmp_path / ("d" * (MAX_PATH_BYTES - len(str(tmp_path))))
    with pytest.raises(LlmsvcError, match="wal_dir is too long for workers"):
        socket_path(deep)

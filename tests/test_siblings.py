"""Workers asking each other to store their WALs (`llmsvc.siblings`): real Unix sockets in
the abstract namespace, on a real event loop, and a real process of another user; each
worker's own catch-up is a gate the test opens, as its store catching up would."""

from __future__ import annotations

import asyncio
import os
import secrets
import socket
import time

import pytest

from llmsvc.errors import ServiceUnavailable
from llmsvc.siblings import ASK, Siblings, address

NOBODY = 65534


class Worker:
    """A worker's siblings endpoint whose store catches up when the test says so."""

    def __init__(self, own: bytes, others: list[bytes], wait_seconds: float = 5.0) -> None:
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


def names(n: int) -> list[bytes]:
    group = secrets.token_hex(8)  # tests run side by side
    return [address(group, k) for k in range(n)]


async def test_a_worker_waits_until_every_other_has_stored_its_wal() -> None:
    a, b, c = names(3)
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


async def test_a_worker_that_is_not_running_is_not_waited_for() -> None:
    a, b = names(2)
    asker = Worker(a, [b])
    try:
        started = time.monotonic()
        await asker.siblings.others_caught_up()
        gone = Worker(b, [a])
        gone.siblings.close()
        await asker.siblings.others_caught_up()
        assert time.monotonic() - started < 0.5
    finally:
        asker.siblings.close()


async def test_a_worker_whose_store_does_not_catch_up_is_a_503_naming_the_bound() -> None:
    a, b = names(2)
    asker, stuck = Worker(a, [b], wait_seconds=0.3), Worker(b, [a])
    try:
        with pytest.raises(ServiceUnavailable, match=r"0\.3 s \(database_timeout_seconds\)"):
            await asker.siblings.others_caught_up()
        assert stuck.asked == 1
    finally:
        asker.siblings.close()
        stuck.siblings.close()


async def test_answers_are_matched_to_their_question() -> None:
    """Two questions at once: each returns once its own answer came."""
    a, b = names(2)
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


async def test_a_question_from_another_users_process_is_not_answered() -> None:
    """Any local process can send to a name in the abstract namespace; only this user's
    are taken. The suite runs as root, so a forked child can send as nobody."""
    (a,) = names(1)
    worker = Worker(a, [])
    worker.stored.set()
    try:
        for user in (NOBODY, os.getuid()):
            pid = os.fork()
            if pid == 0:  # the child: send one question as `user`, nothing else
                code = 1
                try:
                    os.setuid(user)
                    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
                    sock.bind(b"\0" + secrets.token_hex(8).encode())
                    sock.sendto(ASK + b"12345678", a)
                    code = 0
                finally:
                    os._exit(code)
            _, status = await asyncio.to_thread(os.waitpid, pid, 0)
            assert os.waitstatus_to_exitcode(status) == 0
            await asyncio.sleep(0.2)
            assert worker.asked == (0 if user == NOBODY else 1)
    finally:
        worker.siblings.close()

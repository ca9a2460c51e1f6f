"""The workers of a supervisor asking each other to store what they have journaled.

Each worker journals into a WAL of its own and flushes it on its own, and a client that
continues a conversation on a new connection may reach another worker than the one that
answered its last turn: that turn may still be in the other's WAL. So before reading a
conversation a worker asks each other worker to store everything it has journaled, and
waits for their answers; each answers once its store holds what its WAL held when asked.

A question and its answer are one datagram each, on a Unix socket per worker in the
abstract namespace (no file, no path to outgrow), named after the supervisor's group
(its pid and a random part) and the worker's index. Any local process can send to such
a name, so a datagram whose sender is not of this user is dropped, by the credentials
the kernel attaches. A worker that is not running cannot be asked: what it journaled is
stored by its replacement when it boots.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import socket
import struct
from collections.abc import Awaitable, Callable, Iterable

from llmsvc.errors import ServiceUnavailable
from llmsvc.logs import logger

log = logger(__name__)

UCRED = struct.Struct("iII")  # struct ucred: the sender's pid, uid, gid
ASK, DONE = b"?", b"!"  # then the question's nonce
NONCE_BYTES = 8


def address(group: str, index: int) -> bytes:
    """Worker `index`'s socket name in the abstract namespace (the leading NUL)."""
    return f"\0llmsvc-{group}-worker-{index}-hurry".encode()


def sender(ancillary: list[tuple[int, int, bytes]]) -> tuple[int, int] | None:
    """The pid and uid the kernel attached to a datagram (SO_PASSCRED), if it did."""
    for level, kind, data in ancillary:
        if (level, kind) == (socket.SOL_SOCKET, socket.SCM_CREDENTIALS):
            pid, uid, _ = UCRED.unpack(data[: UCRED.size])
            return pid, uid
    return None


class Siblings:
    """This worker's socket: it answers the others' questions and asks them its own.

    `caught_up` is this worker's own wait for its store to hold its WAL (it raises
    ServiceUnavailable past its bound); `wait_seconds` bounds a wait for the others.
    """

    def __init__(
        self,
        own: bytes,
        others: Iterable[bytes],
        caught_up: Callable[[], Awaitable[None]],
        wait_seconds: float,
    ) -> None:
        self.others = list(others)
        self.caught_up = caught_up
        self.wait_seconds = wait_seconds
        self._uid = os.getuid()
        self._loop = asyncio.get_running_loop()
        self._asked: dict[bytes, tuple[asyncio.Future[None], set[bytes]]] = {}
        self._answering: set[asyncio.Task[None]] = set()
        self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC)
        try:
            self._sock.bind(own)
            self._sock.setsockopt(socket.SOL_SOCKET, socket.SO_PASSCRED, 1)
            self._sock.setblocking(False)
        except OSError:
            self._sock.close()
            raise
        self._loop.add_reader(self._sock.fileno(), self._readable)

    async def others_caught_up(self) -> None:
        """Return once every other running worker's store holds what its WAL held when
        asked; ServiceUnavailable if one has not answered within `wait_seconds`."""
        nonce = os.urandom(NONCE_BYTES)
        waiting: set[bytes] = set()
        for other in self.others:
            try:
                self._sock.sendto(ASK + nonce, other)
            except ConnectionRefusedError:
                continue  # not running
            except BlockingIOError:  # its queue is full: it is answering many already
                log.warning("workers: a worker too busy to be asked", worker=other[1:].decode())
                continue
            waiting.add(other)
        if not waiting:
            return
        answered = self._loop.create_future()
        self._asked[nonce] = (answered, waiting)
        try:
            async with asyncio.timeout(self.wait_seconds):
                await answered
        except TimeoutError:
            raise ServiceUnavailable(
                "another worker's store has not caught up with its WAL after "
                f"{self.wait_seconds:g} s (database_timeout_seconds); its health says why"
            ) from None
        finally:
            del self._asked[nonce]

    def close(self) -> None:
        """Stop answering; those asking now wait out their bound or find this socket gone."""
        if self._sock.fileno() >= 0:
            self._loop.remove_reader(self._sock.fileno())
            self._sock.close()
        for task in self._answering:
            task.cancel()

    def _readable(self) -> None:
        while True:
            try:
                data, ancillary, _, name = self._sock.recvmsg(
                    1 + NONCE_BYTES, socket.CMSG_SPACE(UCRED.size)
                )
            except (BlockingIOError, InterruptedError):
                return
            ids = sender(ancillary)
            if ids is None or ids[1] != self._uid or not isinstance(name, bytes):
                continue  # another user's process, or a sender with no name to answer
            kind, nonce = data[:1], data[1:]
            if kind == ASK:
                task = self._loop.create_task(self._answer(nonce, name))
                self._answering.add(task)
                task.add_done_callback(self._answering.discard)
            elif kind == DONE and nonce in self._asked:
                answered, waiting = self._asked[nonce]
                waiting.discard(name)
                if not waiting and not answered.done():
                    answered.set_result(None)

    async def _answer(self, nonce: bytes, asker: bytes) -> None:
        """Answer once this worker's store holds its WAL as it is now; no answer if it does not
        within its bound (the asker's own bound says so to its client)."""
        try:
            await self.caught_up()
        except ServiceUnavailable:
            return
        with contextlib.suppress(OSError):  # the asker is gone, or its queue is full
            self._sock.sendto(DONE + nonce, asker)

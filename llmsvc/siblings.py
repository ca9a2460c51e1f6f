"""The workers of a supervisor asking each other to store what they have journaled.

Each worker journals into a WAL of its own and flushes it on its own, and a client that
continues a conversation on a new connection may reach another worker than the one that
answered its last turn: that turn may still be in the other's WAL. So before reading a
conversation a worker asks each other worker to store everything it has journaled, and
waits for their answers; each answers once its store holds what its WAL held when asked.

A question and its answer are one datagram each, on a Unix socket per worker in its
private WAL directory (0600, as the directory is 0700). A worker that is not running
cannot be asked: what it journaled is stored by its replacement when it boots.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import socket
from collections.abc import Awaitable, Callable, Iterable
from pathlib import Path

from llmsvc.errors import LlmsvcError, ServiceUnavailable
from llmsvc.logs import logger

log = logger(__name__)

SOCKET_NAME = "hurry"
MAX_PATH_BYTES = 107  # sun_path's 108 bytes, less the terminating NUL
ASK, DONE = b"?", b"!"  # then the question's 8-byte nonce
NONCE_BYTES = 8


def socket_path(wal_dir: Path) -> Path:
    """A worker's socket, in its own WAL directory; LlmsvcError if the path is too long."""
    path = wal_dir / SOCKET_NAME
    if len(os.fsencode(path)) > MAX_PATH_BYTES:
        raise LlmsvcError(
            f"wal_dir is too long for workers: {path} is over the {MAX_PATH_BYTES} bytes a "
            "Unix socket's path may have; use a shorter wal_dir"
        )
    return path


class Siblings:
    """This worker's socket: it answers the others' questions and asks them its own.

    `caught_up` is this worker's own wait for its store to hold its WAL (it raises
    ServiceUnavailable past its bound); `wait_seconds` bounds a wait for the others.
    """

    def __init__(
        self,
        own: Path,
        others: Iterable[Path],
        caught_up: Callable[[], Awaitable[None]],
        wait_seconds: float,
    ) -> None:
        self.others = [str(path) for path in others]
        self.caught_up = caught_up
        self.wait_seconds = wait_seconds
        self._loop = asyncio.get_running_loop()
        self._asked: dict[bytes, tuple[asyncio.Future[None], set[str]]] = {}
        self._answering: set[asyncio.Task[None]] = set()
        self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC)
        try:
            with contextlib.suppress(FileNotFoundError):
                own.unlink()  # a predecessor's: this worker holds the WAL's lock
            self._sock.bind(str(own))
            os.chmod(own, 0o600)
            self._sock.setblocking(False)
        except OSError:
            self._sock.close()
            raise
        self._loop.add_reader(self._sock.fileno(), self._readable)

    async def others_caught_up(self) -> None:
        """Return once every other running worker's store holds what its WAL held when
        asked; ServiceUnavailable if one has not answered within `wait_seconds`."""
        nonce = os.urandom(NONCE_BYTES)
        waiting: set[str] = set()
        for path in self.others:
            try:
                self._sock.sendto(ASK + nonce, path)
            except (FileNotFoundError, ConnectionRefusedError):
                continue  # not running
            except BlockingIOError:  # its queue is full: it is answering many already
                log.warning("workers: a worker too busy to be asked", socket=path)
                continue
            waiting.add(path)
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
                data, sender = self._sock.recvfrom(1 + NONCE_BYTES)
            except (BlockingIOError, InterruptedError):
                return
            kind, nonce = data[:1], data[1:]  # `sender`: a worker's socket path (str)
            if kind == ASK and sender:
                task = self._loop.create_task(self._answer(nonce, sender))
                self._answering.add(task)
                task.add_done_callback(self._answering.discard)
            elif kind == DONE and nonce in self._asked:
                answered, waiting = self._asked[nonce]
                waiting.discard(sender)
                if not waiting and not answered.done():
                    answered.set_result(None)

    async def _answer(self, nonce: bytes, asker: str) -> None:
        """Answer once this worker's store holds its WAL as it is now; no answer if it does not
        within its bound (the asker's own bound says so to its client)."""
        try:
            await self.caught_up()
        except ServiceUnavailable:
            return
        with contextlib.suppress(OSError):  # the asker is gone, or its queue is full
            self._sock.sendto(DONE + nonce, asker)

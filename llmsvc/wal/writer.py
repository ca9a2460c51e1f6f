"""The WAL writer: one thread owns the live segment and commits appends in groups.

Appends from the event loop go into a shared buffer; the writer thread swaps
the buffer out, writes it with one write(2) (and one fdatasync in `fsync`
mode), then wakes every waiter of that batch with one call into the loop. The
cost of a syscall is shared by every stream that appended meanwhile. Under
load (the previous batch was written less than `commit_delay` ago) the thread
waits that long before taking a batch, so many streams' tokens share one
thread hop; an idle log is written at once.

In `write` mode an append that finds the thread idle is written by the loop
itself, and its future is done when `append` returns: a small write(2) to the
page cache costs a few µs, the hop to the thread and back ~85 µs (BENCHMARKS.md,
"How long an append waits"). Anything unusual goes to the thread: a batch it
is writing or about to, a large one, one that fills the segment (the thread
rotates), a full disk (the cut-off batch is written again there, and refused).
A failed write on the loop is fatal, as on the thread. A write that hangs (a
frozen filesystem) then hangs the loop, which the systemd watchdog sees as it
sees a stuck writer thread: no more pings.

`append_soon` is the loop's own group commit: what a loop round appends is
written at its end, in one write(2).

A full disk is survivable, a failed fsync is not. When write(2) reports
ENOSPC the partial batch is cut off, that batch and everything queued behind
it are refused (their waiters get WalFull, so no record is ever written after
one that was lost), and appends are refused until space returns; only `hold`
records (the ends of requests the full disk broke off) are kept, in memory,
and written first once it does.
"""

from __future__ import annotations

import asyncio
import errno
import os
import threading
import time
import uuid
from collections.abc import Callable
from pathlib import Path

from llmsvc.config import WalPolicy
from llmsvc.errors import WalFatal, WalFull
from llmsvc.logs import logger
from llmsvc.wal.reader import Position
from llmsvc.wal.repair import Repairs, repair_log
from llmsvc.wal.segment import (
    HEADER_SIZE,
    Segment,
    create_segment,
    remove_unfinished_segments,
)

log = logger(__name__)

DISK_FULL = (errno.ENOSPC, errno.EDQUOT)
FULL_RETRY_SECONDS = 1.0
FULL_MIN_FREE_BYTES = 64 * 1024  # what must be free before writing is tried again
INLINE_MAX_BYTES = 64 * 1024  # the most the loop writes itself; a larger batch goes to the thread


class BatchFuture(asyncio.Future[int]):
    """One batch's future, awaited by every stream that appended to it.

    A waiter's cancellation must not cancel the batch for the others, so
    `cancel` is refused: a cancelled waiter wakes, cancelled, when its batch is
    written. Cheaper than an `asyncio.shield` per append on the hot path.
    """

    def cancel(self, msg: object = None) -> bool:
        return False


class WalWriter:
    """Group-committing appender for one WAL directory.

    `append` is called on the event loop thread only. With sync `write` a
    batch is acknowledged once write(2) returned and a syncer thread fsyncs
    every `fsync_interval` seconds; with `fsync` it is acknowledged after its
    fdatasync.
    """

    def __init__(
        self,
        wal_dir: Path,
        instance_id: uuid.UUID,
        policy: WalPolicy,
        *,
        on_fsync: Callable[[float], None] | None = None,
    ) -> None:
        self.wal_dir = wal_dir
        self.instance_id = instance_id
        self.sync = policy.sync
        self.fsync_interval = policy.fsync_interval
        self.commit_delay = policy.commit_delay
        self._last_write = 0.0  # monotonic time the previous batch was written
        self.segment_max_bytes = policy.segment_max_bytes
        self.end = Position(0, 0, 1)  # published to the loop after each batch
        self.appended_lsn = 0
        self.appended_records = 0  # written since open (for metrics; any thread)
        self.on_fsync = on_fsync  # told each fdatasync's seconds, on the writer's threads
        self._cond = threading.Condition()
        self._buf = bytearray()
        self._count = 0
        self._woken = False  # the thread was asked to write the pending batch
        self._idle = False  # the thread waits for work, so the loop may write (`write` mode)
        self._round_end = False  # `append_soon` has asked the loop to write at its round's end
        self._fut: BatchFuture | None = None
        self._closing = False
        self._rotate_wanted = False
        self.segment_opened = time.monotonic()  # when appends began going to the live segment
        self._failed: WalFatal | None = None
        self.full: WalFull | None = None  # set while the disk is full
        self._held: list[bytes] = []
        self._fd_lock = threading.Lock()
        self._stop_syncer = threading.Event()
        self._fd = -1
        self._segment = Segment(Path(), 0)
        self._offset = 0
        self._lsn = 0
        self._written_bytes = 0
        self._synced_bytes = 0
        self._threads: list[threading.Thread] = []
        self._writing_since: float | None = None  # monotonic start of the write under way
        self._loop: asyncio.AbstractEventLoop | None = None
        self._on_fatal: Callable[[WalFatal], None] = lambda exc: None

    def open(
        self,
        loop: asyncio.AbstractEventLoop,
        on_fatal: Callable[[WalFatal], None],
        checkpoint: int = 0,
    ) -> Repairs:
        """Repair the log, find where it ends and start the threads; return what repair did.

        `checkpoint` is the last LSN the database holds. If the log ends before
        it (a power loss took an unsynced tail, or the directory was emptied),
        appends go on in a new segment after it, so no LSN is ever reused.
        """
        self._loop, self._on_fatal = loop, on_fatal
        for path in remove_unfinished_segments(self.wal_dir):
            log.info("wal removed an unfinished segment", file=path.name)
        repairs = repair_log(self.wal_dir, self.instance_id, checkpoint)
        newest = repairs.newest
        if newest is None or newest.segment.first_lsn + newest.records <= checkpoint:
            self._segment = create_segment(self.wal_dir, self.instance_id, checkpoint + 1)
            self._offset, self._lsn = HEADER_SIZE, checkpoint
        else:
            self._segment, self._offset = newest.segment, newest.end
            self._lsn = newest.segment.first_lsn + newest.records - 1
        self._fd = os.open(self._segment.path, os.O_WRONLY | os.O_APPEND)
        self.appended_lsn = self._lsn
        self.end = Position(self._segment.first_lsn, self._offset, self._lsn + 1)
        self._start("wal-writer", self._run)
        if self.sync == "write":
            self._start("wal-syncer", self._sync_loop)
        log.info(
            "wal opened", dir=self.wal_dir, segment=self._segment.path.name, next_lsn=self._lsn + 1
        )
        return repairs

    def append(self, *frames: bytes) -> asyncio.Future[int]:
        """Queue encoded frames; the future resolves to the last LSN once they are journaled.

        Every append of one batch shares one future, which no waiter can cancel.
        """
        return self._put(frames, wake=True)

    def append_soon(self, *frames: bytes) -> asyncio.Future[int]:
        """`append`, but written at the end of this loop round, with everything else appended
        in it: streams read in one round share one write(2), as the thread's group commit
        has them share one, without the hop. For callbacks that go on from the batch
        future's done callback rather than a task's await (chat.Exchange's pump)."""
        fut = self._put(frames, wake=False)
        if not self._round_end:
            self._round_end = True
            self._loop.call_soon(self._end_round)  # type: ignore[union-attr]
        return fut

    def append_to(self, fut: asyncio.Future[int], *frames: bytes) -> bool:
        """Append frames to the batch `fut` stands for if it is still gathering, so one write
        holds them all or none; False, nothing appended, once the thread took it, or in
        `fsync` mode once the thread was asked to write it: such a batch waits for the
        fdatasync before it, and would gather for as long as that takes (a stalled disk),
        the log running that far ahead of the clients. For a stream whose next read comes
        before its batch is written (chat.Exchange's pump)."""
        with self._cond:
            if fut is not self._fut or (self._woken and self.sync == "fsync"):
                return False
            self._put(frames, wake=False)
            return True

    def _end_round(self) -> None:
        self._round_end = False
        if self._fut is not None and self._failed is None and self.full is None:
            self._put((), wake=True)  # at once if the thread is idle, else by it

    def queue(self, *frames: bytes) -> asyncio.Future[int]:
        """Queue frames nobody waits on now, without waking the writer thread.

        They are written, in order, with the next batch someone appends and
        waits on (or at close): a thread wake-up saved per record.
        """
        return self._put(frames, wake=False)

    def rotate(self) -> None:
        """Seal the live segment now if it holds records, so housekeeping can remove it later."""
        with self._cond:
            self._rotate_wanted = self._woken = True
            self._cond.notify()

    def hold(self, *frames: bytes) -> None:
        """Journal frames that must survive a full disk, without waiting for them.

        While the log is writable this is `append`; while the disk is full the
        frames wait in memory and are written before anything else once space
        returns.
        """
        with self._cond:  # re-entrant: full cannot change between the test and the put
            if self.full is not None and self._failed is None:
                self._held.extend(frames)
                return
            self._put(frames, wake=True)

    def _put(self, frames: tuple[bytes, ...], wake: bool) -> asyncio.Future[int]:
        with self._cond:
            if self._failed is not None:
                raise self._failed
            if self.full is not None:
                raise self.full
            for frame in frames:
                self._buf += frame
            self._count += len(frames)
            self.appended_lsn += len(frames)
            if wake and self._idle and self.sync == "write" and not self._woken:
                done = self._write_inline()
                if done is not None:
                    return done
            fut = self._fut
            if fut is None:
                fut = self._fut = BatchFuture(loop=self._loop)
            if wake and not self._woken:
                self._woken = True
                self._cond.notify()
        return fut

    def _write_inline(self) -> asyncio.Future[int] | None:
        """Write the pending batch on the loop (the thread is idle, `_cond` held) and return its
        future, done; None leaves the batch to the thread."""
        buf = self._buf
        if (
            len(buf) > INLINE_MAX_BYTES
            or self._offset + len(buf) >= self.segment_max_bytes  # the thread writes and rotates
            or self._closing
        ):
            return None
        fut = self._fut
        if fut is None:
            fut = self._fut = BatchFuture(loop=self._loop)
        try:
            self._write(buf)
        except OSError as exc:
            if exc.errno in DISK_FULL:  # cut off; the thread meets the full disk and refuses
                return None
            self._fail(exc, None)  # as on the thread: the batch is refused, the daemon stops
            return fut
        self._lsn += self._count
        self.appended_records += self._count
        self._buf, self._fut, self._count = bytearray(), None, 0
        self._last_write = time.monotonic()
        self.end = Position(self._segment.first_lsn, self._offset, self._lsn + 1)
        fut.set_result(self._lsn)
        return fut

    async def close(self) -> None:
        """Write what is queued, fsync, and stop the threads."""
        with self._cond:
            self._closing = True
            self._cond.notify_all()
        self._stop_syncer.set()
        for thread in self._threads:
            await asyncio.to_thread(thread.join)
        if self._fd >= 0:
            if self._failed is None:
                await asyncio.to_thread(self._fdatasync)  # never on the loop thread
            os.close(self._fd)
            self._fd = -1
        if self._held:
            log.warning(
                "wal closed with the disk still full: held records not written count=%d; "
                "the next boot marks their requests interrupted",
                len(self._held),
            )
        log.info("wal closed", next_lsn=self._lsn + 1)

    def stuck(self, after: float) -> str | None:
        """Why the log takes no appends now, or None: a thread died, or a write hangs.

        A write lasting `after` seconds is a frozen disk (any thread may ask).
        """
        if self._closing or self._failed is not None:
            return None
        if not all(thread.is_alive() for thread in self._threads):
            return "a WAL thread has stopped"
        since = self._writing_since
        if since is not None and (took := time.monotonic() - since) >= after:
            return f"a WAL write has not returned for {took:.0f} s"
        return None

    def _start(self, name: str, target: Callable[[], None]) -> None:
        thread = threading.Thread(target=target, name=name, daemon=True)
        thread.start()
        self._threads.append(thread)

    def _run(self) -> None:
        while True:
            with self._cond:
                if self.full is not None:
                    if not self._closing:
                        self._cond.wait(FULL_RETRY_SECONDS)
                    if self._closing:
                        return
                    if not self._space_returned():
                        continue
                    buf, fut, count = bytearray(b"".join(self._held)), None, len(self._held)
                    rotate = False
                else:
                    while not self._woken and not self._closing:
                        self._idle = True
                        self._cond.wait()
                    self._idle = False
                    if time.monotonic() - self._last_write < self.commit_delay:
                        self._cond.wait(self.commit_delay)  # appenders see _woken: no notify
                    if self._closing and not self._count and self._fut is None:
                        return
                    buf, fut, count = self._buf, self._fut, self._count
                    rotate, self._rotate_wanted = self._rotate_wanted, False
                    self._buf, self._fut, self._count, self._woken = bytearray(), None, 0, False
            self._writing_since = time.monotonic()
            try:
                if rotate and self._offset > HEADER_SIZE:
                    self._rotate()  # before the batch: what was written when it was asked
            except OSError as exc:  # its fdatasync failed: fatal, as every fsync's failure is
                self._fail(exc, fut)
                return
            try:
                if buf:
                    self._write(buf)
            except OSError as exc:
                self._writing_since = None
                if exc.errno in DISK_FULL:
                    self._disk_full(exc, fut)
                    continue
                self._fail(exc, fut)
                return
            try:
                if self.sync == "fsync" and buf:
                    self._fdatasync()
                self._lsn += count
                self.appended_records += count
                if self._offset >= self.segment_max_bytes:
                    self._rotate()
                end = Position(self._segment.first_lsn, self._offset, self._lsn + 1)
            except OSError as exc:
                self._fail(exc, fut)
                return
            self._writing_since = None
            if self.full is not None:
                self._writable_again(count)
            self._last_write = time.monotonic()
            self._loop.call_soon_threadsafe(self._resolve, fut, end)  # type: ignore[union-attr]

    def _write(self, buf: bytearray) -> None:
        """One batch, whole or not at all: a short write is cut off before raising."""
        view = memoryview(buf)
        try:
            while view:
                n = os.write(self._fd, view)
                view = view[n:]
        except OSError:
            os.ftruncate(self._fd, self._offset)
            raise
        self._offset += len(buf)
        self._written_bytes += len(buf)

    def _fdatasync(self) -> None:
        started = time.perf_counter()
        os.fdatasync(self._fd)
        if self.on_fsync is not None:
            self.on_fsync(time.perf_counter() - started)

    @property
    def written_bytes(self) -> int:
        """Bytes written to the log since it was opened (for metrics; any thread)."""
        return self._written_bytes

    def _disk_full(self, exc: OSError, fut: asyncio.Future[int] | None) -> None:
        """Refuse the batch and everything queued behind it; hold nothing but `hold` records."""
        full = WalFull(
            f"llmsvc cannot write its log: {exc.strerror or exc} in {self.wal_dir}; "
            "requests are refused until space is freed"
        )
        with self._cond:
            first = self.full is None
            self.full = full
            queued, self._fut = self._fut, None
            self._buf, self._count, self._woken = bytearray(), 0, False
            self.appended_lsn = self._lsn
        if first:
            log.error("wal full: %s", full)
        self._loop.call_soon_threadsafe(self._refuse, full, [fut, queued])  # type: ignore[union-attr]

    def _space_returned(self) -> bool:
        stat = os.statvfs(self.wal_dir)
        need = FULL_MIN_FREE_BYTES + sum(len(frame) for frame in self._held)
        return stat.f_bavail * stat.f_frsize >= need

    def _writable_again(self, written: int) -> None:
        with self._cond:
            self.full = None
            del self._held[:written]
            self.appended_lsn = self._lsn
        log.info("wal writable again", held_records_written=written)

    def _rotate(self) -> None:
        """Seal the live segment (fdatasync) and continue in a new one.

        With no room for the new segment the old one simply grows; the next
        batch's write finds the disk full.
        """
        try:
            segment = create_segment(self.wal_dir, self.instance_id, self._lsn + 1)
        except OSError as exc:
            if exc.errno not in DISK_FULL:
                raise
            log.warning("wal rotation postponed: %s", exc.strerror)
            return
        with self._fd_lock:
            self._fdatasync()
            os.close(self._fd)
            self._segment = segment
            self._fd = os.open(self._segment.path, os.O_WRONLY | os.O_APPEND)
            self._offset = HEADER_SIZE
            self.segment_opened = time.monotonic()
        log.info("wal rotated", segment=self._segment.path.name)

    def _sync_loop(self) -> None:
        """In `write` mode, bound what a power loss can take to one interval."""
        while not self._stop_syncer.wait(self.fsync_interval):
            written = self._written_bytes
            if written == self._synced_bytes:
                continue
            try:
                with self._fd_lock:
                    self._fdatasync()
            except OSError as exc:
                self._fail(exc, None)
                return
            self._synced_bytes = written

    def _fail(self, exc: OSError, fut: asyncio.Future[int] | None) -> None:
        """A failed write or fsync is fatal: the page cache can no longer be trusted."""
        fatal = WalFatal(f"wal: {exc.strerror or exc} on {self._segment.path.name}")
        with self._cond:
            self._failed = fatal
            pending, self._fut = self._fut, None
        log.critical("wal write or fsync failed error=%s: exiting to recover from the log", fatal)
        self._loop.call_soon_threadsafe(self._fail_on_loop, fatal, [fut, pending])  # type: ignore[union-attr]

    def _fail_on_loop(self, fatal: WalFatal, futures: list[asyncio.Future[int] | None]) -> None:
        self._refuse(fatal, futures)
        self._on_fatal(fatal)

    @staticmethod
    def _refuse(exc: Exception, futures: list[asyncio.Future[int] | None]) -> None:
        for fut in futures:
            if fut is not None and not fut.done():
                fut.set_exception(exc)
                fut.exception()  # a batch of unawaited start records is not an unseen error

    def _resolve(self, fut: asyncio.Future[int] | None, end: Position) -> None:
        if end.lsn >= self.end.lsn:  # the loop may have written a later batch meanwhile
            self.end = end
        if fut is not None and not fut.done():
            fut.set_result(end.lsn - 1)

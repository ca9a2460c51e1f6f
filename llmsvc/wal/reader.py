"""Reading the log in LSN order: a boot-time scan and the flusher's tailing reader.

Both stop at the first frame that fails its checks; nothing after it is ever
returned. The tailing reader reads the live segment only up to the end the
writer has published, so a half-written batch is never mistaken for damage.
"""

from __future__ import annotations

import asyncio
import os
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from llmsvc.logs import logger
from llmsvc.wal.codec import FRAME, Decoded, Stop, decode
from llmsvc.wal.errors import Corruption, Damage
from llmsvc.wal.segment import (
    HEADER_SIZE,
    INSTANCE_FILE,
    Segment,
    check_header,
    list_segments,
    read_instance_id,
)

# Decoding a chunk makes two objects a record (~40 MiB for 8 MiB of tokens), and CPython
# keeps that high-water mark: small chunks keep scans and catch-up from raising RSS for good.
CHUNK_BYTES = 1024 * 1024

log = logger(__name__)


@dataclass(frozen=True, slots=True)
class Position:
    """Where the next record is: its segment (by first LSN), byte offset and LSN."""

    segment: int
    offset: int
    lsn: int


@dataclass(frozen=True, slots=True)
class Scan:
    """A segment's valid prefix: how many records, where they end, and what follows."""

    segment: Segment
    records: int
    end: int
    size: int
    stop: Stop


def scan_segment(
    segment: Segment,
    instance_id: uuid.UUID,
    on_records: Callable[[list[tuple[int, bytes]]], None] | None = None,
) -> Scan:
    """Count a segment's valid records, reading it in chunks (boot, verify, refill).

    `on_records` is handed each chunk's valid records, in order, for callers
    that want the records themselves and not only their count.
    """
    with segment.path.open("rb") as f:
        check_header(segment, f.read(HEADER_SIZE), instance_id)
        records, offset, carry = 0, HEADER_SIZE, b""
        while True:
            chunk = f.read(CHUNK_BYTES)
            buf = carry + chunk
            decoded = decode(buf)
            records += len(decoded.records)
            if on_records is not None and decoded.records:
                on_records(decoded.records)
            # A chunk that ends on a frame boundary decodes to END: only the file's end ends it.
            if decoded.stop is Stop.CORRUPT or not chunk:
                end = offset + decoded.end
                size = f.seek(0, 2)
                return Scan(segment, records, end, size, decoded.stop)
            offset += decoded.end
            carry = buf[decoded.end :]


def scan_log(wal_dir: Path, on_records: Callable[[list[tuple[int, bytes]]], None]) -> None:
    """Hand every valid record of every segment still on disk to `on_records` (refill).

    Blocking reads. A segment that cannot be read is skipped with a warning,
    so what it held stays missing rather than guessed at.
    """
    instance = read_instance_id(wal_dir)
    if instance is None:
        return
    for segment in list_segments(wal_dir):
        try:
            scan_segment(segment, instance, on_records=on_records)
        except (OSError, Corruption) as exc:
            log.warning("refill: WAL segment skipped", segment=segment.path.name, error=exc)


class WalReader:
    """Tails the segments from a position; the flusher's only way into the log.

    LSNs missing between segments (lost to damage, reported by repair at
    boot) are skipped with a warning; damage inside a segment stops reading.
    """

    def __init__(self, wal_dir: Path, instance_id: uuid.UUID) -> None:
        self.wal_dir = wal_dir
        self.instance_id = instance_id
        self.position = Position(0, 0, 1)
        self._fd: int | None = None  # the current segment's, read with pread(2)
        self._segment: Segment | None = None

    async def seek(self, lsn: int) -> None:
        """Position the reader at `lsn`, the next record wanted."""
        await self._close()
        holding = [s for s in list_segments(self.wal_dir) if s.first_lsn <= lsn]
        if holding:
            await self._enter(holding[-1])
            while self.position.lsn < lsn:
                if not await self._read_segment(None, lsn - self.position.lsn):
                    await self._close()  # the log ends before `lsn`: go on from a later segment
                    break
        if self._segment is None:
            self.position = Position(0, 0, lsn)

    async def resume(self, position: Position) -> None:
        """Position the reader at a position a reader of this log reported, without reading
        up to it; `seek` when its segment is gone."""
        held = [s for s in list_segments(self.wal_dir) if s.first_lsn == position.segment]
        if not held:
            await self.seek(position.lsn)
            return
        await self._enter(held[0])
        self.position = position

    async def read(self, end: Position | None, max_records: int) -> list[tuple[int, bytes]]:
        """Return up to `max_records` records after the position and advance past them.

        `end` is the writer's published end; None means every segment is closed.
        A closed segment is read to its end, then the next one is entered.
        """
        while True:
            if self._segment is None:
                nxt = self._segment_at(self.position.lsn)
            else:
                records = await self._read_segment(end, max_records)
                if records:
                    return records
                if end is not None and end.segment == self.position.segment:
                    return []  # the live segment, read to its published end
                nxt = self._segment_after(self._segment)  # not by LSN: a segment may be empty
            if nxt is None:
                return []  # the newest segment, read to its end
            if nxt.first_lsn > self.position.lsn:
                log.warning(
                    "wal records missing lsn=%d..%d: skipped",
                    self.position.lsn,
                    nxt.first_lsn - 1,
                )
            await self._enter(nxt)

    async def _read_segment(
        self, end: Position | None, max_records: int
    ) -> list[tuple[int, bytes]]:
        """Up to `max_records` records of the current segment; none at its (published) end."""
        chunk = CHUNK_BYTES
        while True:
            pos = self.position
            live = end is not None and end.segment == pos.segment
            want = min(chunk, end.offset - pos.offset) if live else chunk  # type: ignore[union-attr]
            if want <= 0:
                return []
            # Read and decoded off the event loop in one hop (a flush's fixed cost is mostly
            # such hops), and decoded no further than the batch needs.
            data, decoded = await asyncio.to_thread(self._read_at, pos.offset, want, max_records)
            records = decoded.records
            self.position = Position(pos.segment, pos.offset + decoded.end, pos.lsn + len(records))
            if records:
                return records
            at_eof = len(data) < want
            if decoded.stop is Stop.PARTIAL and not at_eof and want == chunk:
                chunk = FRAME.size + FRAME.unpack_from(data, decoded.end)[0]  # one large record
                continue
            if decoded.stop is not Stop.END:
                where = self._segment.path if self._segment else self.wal_dir
                raise Corruption(where, self.position.offset, decoded.stop.name)
            return []

    def _segment_at(self, lsn: int) -> Segment | None:
        """The first segment holding `lsn` or a later LSN (a later one: records are missing)."""
        later = [s for s in list_segments(self.wal_dir) if s.first_lsn >= lsn]
        return later[0] if later else None

    def _segment_after(self, segment: Segment) -> Segment | None:
        """The segment that follows `segment` in the log, if one has been started."""
        later = [s for s in list_segments(self.wal_dir) if s.first_lsn > segment.first_lsn]
        return later[0] if later else None

    def _read_at(self, offset: int, size: int, max_records: int) -> tuple[bytes, Decoded]:
        assert self._fd is not None
        data = os.pread(self._fd, size, offset)
        return data, decode(data, 0, max_records)

    async def _enter(self, segment: Segment) -> None:
        await self._close()
        self._fd = os.open(segment.path, os.O_RDONLY | os.O_CLOEXEC)
        self._segment = segment
        header = await asyncio.to_thread(os.pread, self._fd, HEADER_SIZE, 0)
        check_header(segment, header, self.instance_id)
        self.position = Position(segment.first_lsn, HEADER_SIZE, segment.first_lsn)

    async def _close(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
        self._fd, self._segment = None, None

    async def close(self) -> None:
        await self._close()


@dataclass(frozen=True, slots=True)
class SegmentCheck:
    """One segment as `llmsvc wal verify` sees it."""

    name: str
    first_lsn: int
    records: int
    bytes: int
    problem: str  # empty when the segment is whole and in sequence
    missing: tuple[int, int] | None = None  # LSNs missing before it (a segment is gone)
    damage: Damage | None = None  # what is wrong inside it, if it could be checked


def verify_log(wal_dir: Path) -> list[SegmentCheck]:
    """Check every segment's header and frames, and that LSNs run on between segments.

    Reads only; a torn tail of the newest segment is reported as such (the
    next boot cuts it off), damage anywhere else is corruption. Damage kinds
    are repair's, as the segment stands now (repair alone can tell an overlap).
    """
    segments = list_segments(wal_dir)
    if not segments:
        return []
    instance_id = read_instance_id(wal_dir)
    checks: list[SegmentCheck] = []
    expected: int | None = segments[0].first_lsn  # None after a segment not read to its end
    for i, segment in enumerate(segments):
        size = segment.path.stat().st_size
        problems = []
        missing, damage = None, None
        if expected is not None and segment.first_lsn != expected:
            missing = (expected, segment.first_lsn - 1)
            problems.append(f"records {expected}..{missing[1]} are missing (a segment is gone)")
        records = 0
        if instance_id is None:
            problems.append(f"no {INSTANCE_FILE} file: cannot check segment headers")
        else:
            try:
                scan = scan_segment(segment, instance_id)
                records = scan.records
                if scan.stop is not Stop.END:
                    newest = i == len(segments) - 1
                    damage = Damage.TORN_TAIL if newest else Damage.CORRUPT
                    kind = "torn tail (cut off at next boot)" if newest else "corruption"
                    problems.append(f"{kind} at byte {scan.end}: {scan.stop.name.lower()}")
            except Corruption as exc:
                damage = Damage.BAD_HEADER
                problems.append(exc.reason)
            except OSError as exc:
                damage = Damage.UNREADABLE
                problems.append(f"unreadable: {exc.strerror or exc}")
        problem = "; ".join(problems)
        checks.append(
            SegmentCheck(
                segment.path.name, segment.first_lsn, records, size, problem, missing, damage
            )
        )
        expected = None if problem else segment.first_lsn + records
    return checks

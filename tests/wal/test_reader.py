"""The tailing reader: published ends, seeking, missing segments and damage."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator, Callable
from pathlib import Path

import pytest
from wal_records import OpenWriter, ReadLog, frame_offsets, records_of, straddling_frames, token

from llmsvc.wal.codec import FRAME, Stop
from llmsvc.wal.errors import Corruption
from llmsvc.wal.reader import Position, WalReader, scan_segment
from llmsvc.wal.segment import HEADER_SIZE, create_segment, list_segments, segment_name

TOKEN_SIZE = len(token(0))
FOUR_PER_SEGMENT = HEADER_SIZE + 4 * TOKEN_SIZE


async def _write(open_writer: OpenWriter, frames: list[bytes], **settings: int) -> Position:
    """Append `frames` one batch each, close, and return the writer's last published end."""
    writer = open_writer(**settings)
    for frame in frames:
        await writer.append(frame)
    await writer.close()
    return writer.end


async def _read(
    reader: WalReader, end: Position | None, max_records: int = 100
) -> list[tuple[int, bytes]]:
    """One read, bounded in time: a reader that spins instead of answering fails the test."""
    try:
        return await asyncio.wait_for(reader.read(end, max_records), 2)
    except TimeoutError:
        pytest.fail(f"read({end}, {max_records}) from {reader.position} spun for 2 s")


@pytest.fixture
async def reader(wal_dir: Path, wal_id: uuid.UUID) -> AsyncIterator[WalReader]:
    reader = WalReader(wal_dir, wal_id)
    yield reader
    await reader.close()


async def test_read_stops_at_the_published_end_of_the_live_segment(
    open_writer: OpenWriter, reader: WalReader
) -> None:
    frames = [token(lsn) for lsn in range(1, 6)]
    writer = open_writer()
    for frame in frames[:3]:
        await writer.append(frame)
    end = writer.end
    for frame in frames[3:]:
        await writer.append(frame)

    await reader.seek(1)

    assert await _read(reader, end) == records_of(frames[:3])
    assert reader.position == end
    assert await _read(reader, end) == []
    assert await _read(reader, writer.end) == records_of(frames[3:])


async def test_bytes_past_the_published_end_are_not_mistaken_for_damage(
    open_writer: OpenWriter, reader: WalReader, wal_dir: Path
) -> None:
    frames = [token(lsn) for lsn in range(1, 4)]
    end = await _write(open_writer, frames)
    [segment] = list_segments(wal_dir)
    with segment.path.open("ab") as f:
        f.write(token(4)[:15])  # the next batch, half written

    await reader.seek(1)

    assert await _read(reader, end) == records_of(frames)
    assert await _read(reader, end) == []


async def test_read_returns_at_most_max_records_and_resumes_after_them(
    open_writer: OpenWriter, reader: WalReader
) -> None:
    frames = [token(lsn) for lsn in range(1, 11)]
    end = await _write(open_writer, frames, segment_max_bytes=FOUR_PER_SEGMENT)
    await reader.seek(1)

    got = []
    while batch := await _read(reader, end, 3):
        assert len(batch) <= 3
        got += batch

    assert got == records_of(frames)


async def test_seek_to_an_lsn_in_the_middle_of_an_older_segment(
    open_writer: OpenWriter, reader: WalReader
) -> None:
    frames = [token(lsn) for lsn in range(1, 21)]
    await _write(open_writer, frames, segment_max_bytes=FOUR_PER_SEGMENT)  # 1, 5, 9, 13, 17

    await reader.seek(7)

    assert (reader.position.segment, reader.position.lsn) == (5, 7)
    got = []
    while batch := await _read(reader, None):
        got += batch
    assert got == records_of(frames[6:])


async def test_reader_seeked_to_the_end_of_the_live_segment_reads_later_appends(
    open_writer: OpenWriter, reader: WalReader
) -> None:
    """The flusher's case at every boot after a full flush: seek(checkpoint + 1)."""
    writer = open_writer()
    for lsn in range(1, 4):
        await writer.append(token(lsn))
    await reader.seek(4)

    for lsn in range(4, 6):
        await writer.append(token(lsn))

    assert await _read(reader, writer.end) == records_of([token(4), token(5)])


async def test_a_missing_middle_segment_is_skipped_with_its_lsns_named(
    open_writer: OpenWriter, reader: WalReader, wal_dir: Path, caplog: pytest.LogCaptureFixture
) -> None:
    frames = [token(lsn) for lsn in range(1, 13)]
    await _write(open_writer, frames, segment_max_bytes=FOUR_PER_SEGMENT)  # 1, 5, 9
    (wal_dir / segment_name(5)).unlink()
    await reader.seek(1)

    assert await _read(reader, None) == records_of(frames[:4])
    assert await _read(reader, None) == records_of(frames[8:])
    assert reader.position.lsn == 13
    assert "wal records missing lsn=5..8: skipped" in caplog.text


async def test_seek_into_a_missing_segment_starts_at_the_next_one(
    open_writer: OpenWriter, reader: WalReader, wal_dir: Path
) -> None:
    frames = [token(lsn) for lsn in range(1, 13)]
    await _write(open_writer, frames, segment_max_bytes=FOUR_PER_SEGMENT)  # 1, 5, 9
    (wal_dir / segment_name(5)).unlink()
    await reader.seek(6)

    assert await _read(reader, None) == records_of(frames[8:])


def _flip_payload(data: bytearray, at: int, size: int) -> None:
    data[at + FRAME.size + 2] ^= 0x10


def _unknown_type(data: bytearray, at: int, size: int) -> None:
    data[at + FRAME.size - 1] = 0x7F


def _longer_length(data: bytearray, at: int, size: int) -> None:
    data[at + 1] ^= 0x01  # the length grows by 256: the frame runs past its neighbours


def _zero_frame(data: bytearray, at: int, size: int) -> None:
    data[at : at + size] = bytes(size)


def _cut_inside(data: bytearray, at: int, size: int) -> None:
    del data[at + size // 2 :]


Damage = Callable[[bytearray, int, int], None]
DAMAGE: dict[str, Damage] = {
    "flipped payload byte": _flip_payload,
    "unknown type byte": _unknown_type,
    "length grown by 256": _longer_length,
    "frame zero-filled": _zero_frame,
    "segment cut inside the frame": _cut_inside,
}
# Record 3 of segment 1 is damaged. "closed": segment 1 holds records 1-5 and
# segment 6 follows it, so it is read to its end; "live": segment 1 holds records
# 1-4 and is the newest, read up to the writer's published end.
SEGMENT_KINDS = {"closed": 8, "live": 4}


@pytest.mark.parametrize("damage", DAMAGE.values(), ids=list(DAMAGE))
@pytest.mark.parametrize("records", SEGMENT_KINDS.values(), ids=list(SEGMENT_KINDS))
async def test_damaged_frame_raises_corruption_after_the_records_before_it(
    damage: Damage, records: int, open_writer: OpenWriter, reader: WalReader, wal_dir: Path
) -> None:
    frames = [token(lsn) for lsn in range(1, records + 1)]
    end = await _write(open_writer, frames, segment_max_bytes=FOUR_PER_SEGMENT + 1)
    segment = list_segments(wal_dir)[0]
    live = end.segment == segment.first_lsn
    assert live == (records == SEGMENT_KINDS["live"])
    damaged_at = frame_offsets(frames, HEADER_SIZE)[2]
    data = bytearray(segment.path.read_bytes())
    damage(data, damaged_at, TOKEN_SIZE)
    segment.path.write_bytes(data)
    await reader.seek(1)

    got: list[tuple[int, bytes]] = []
    with pytest.raises(Corruption) as exc:  # noqa: PT012 (the reads before it return records)
        while True:
            got += await _read(reader, end)

    assert got == records_of(frames[:2])
    assert (exc.value.segment, exc.value.offset) == (segment.path, damaged_at)


async def test_scan_counts_a_record_whose_header_straddles_a_chunk_boundary(
    open_writer: OpenWriter, wal_dir: Path, wal_id: uuid.UUID
) -> None:
    await _write(open_writer, straddling_frames())
    [segment] = list_segments(wal_dir)

    scan = scan_segment(segment, wal_id)

    assert (scan.records, scan.stop) == (3, Stop.END)
    assert scan.end == scan.size == segment.path.stat().st_size


async def test_reader_reads_a_record_whose_header_straddles_a_chunk_boundary(
    open_writer: OpenWriter, read_log: ReadLog, wal_dir: Path
) -> None:
    frames = straddling_frames()
    await open_writer().close()
    [segment] = list_segments(wal_dir)
    with segment.path.open("ab") as f:  # written directly, so no writer scan can cut it
        f.write(b"".join(frames))

    assert await read_log() == records_of(frames)


def test_scan_of_an_empty_segment_finds_no_records(wal_dir: Path, wal_id: uuid.UUID) -> None:
    segment = create_segment(wal_dir, wal_id, 9)

    scan = scan_segment(segment, wal_id)

    assert (scan.records, scan.end, scan.size, scan.stop) == (0, HEADER_SIZE, HEADER_SIZE, Stop.END)

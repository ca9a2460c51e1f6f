"""The WAL writer: group commit, the loop's own writes, rotation, torn tails, I/O faults."""

from __future__ import annotations

import asyncio
import os
import random
import uuid
from pathlib import Path

import pytest
from wal_records import OpenWriter, ReadLog, aligned_frames, records_of, straddling_frames, token

from llmsvc.errors import WalFatal
from llmsvc.wal import codec
from llmsvc.wal.reader import scan_segment
from llmsvc.wal.segment import HEADER_SIZE, check_header, list_segments, segment_name
from llmsvc.wal.writer import INLINE_MAX_BYTES, WalWriter

SYNC_MODES = ["write", "fsync"]
TOKEN_SIZE = len(token(0))


def _files(wal_dir: Path, pattern: str) -> dict[str, bytes]:
    return {path.name: path.read_bytes() for path in wal_dir.glob(pattern)}


def _append_bytes(path: Path, data: bytes) -> None:
    with path.open("ab") as f:
        f.write(data)


@pytest.mark.parametrize("sync", SYNC_MODES)
async def test_appends_from_many_tasks_are_read_back_in_append_order(
    sync: str, open_writer: OpenWriter, read_log: ReadLog
) -> None:
    writer = open_writer(sync=sync)
    appended: list[bytes] = []

    async def stream(n: int) -> None:
        attempt_id = uuid.UUID(int=n).bytes
        for seq in range(50):
            frame = codec.encode_token(attempt_id, seq, seq, f"stream {n} token {seq}")
            appended.append(frame)  # no await between this and append: same order
            lsn_of_frame = len(appended)
            batch_lsn = await asyncio.shield(writer.append(frame))
            assert batch_lsn >= lsn_of_frame  # resolved only once this record is journaled
            if seq % 7 == 0:
                await asyncio.sleep(0)

    await asyncio.gather(*(stream(n) for n in range(20)))
    await writer.close()

    assert await read_log() == records_of(appended)


async def test_appends_issued_before_awaiting_are_committed_in_few_batches_in_fsync_mode(
    open_writer: OpenWriter, read_log: ReadLog
) -> None:
    writer = open_writer(sync="fsync")
    frames = [token(lsn) for lsn in range(1, 1001)]

    futures = [writer.append(frame) for frame in frames]

    batches = list(dict.fromkeys(futures))  # one future per batch, in order
    assert len(batches) < 100
    last_lsn_of = {fut: lsn for lsn, fut in enumerate(futures, start=1)}
    assert [await fut for fut in batches] == [last_lsn_of[fut] for fut in batches]
    assert batches[-1].result() == 1000
    await writer.close()
    assert await read_log() == records_of(frames)


async def test_in_write_mode_an_idle_thread_leaves_each_append_to_the_loop_done_at_once(
    open_writer: OpenWriter, read_log: ReadLog
) -> None:
    writer = open_writer(sync="write")
    frames = [token(lsn) for lsn in range(1, 201)]

    futures = [writer.append(frame) for frame in frames]

    assert [fut.result() for fut in futures] == list(range(1, 201))  # done before any await
    assert writer.end.lsn == 201
    await writer.close()
    assert await read_log() == records_of(frames)


async def test_in_write_mode_an_append_behind_a_batch_for_the_thread_joins_it_in_order(
    open_writer: OpenWriter, read_log: ReadLog
) -> None:
    writer = open_writer(sync="write")
    queued = writer.queue(token(1))  # nobody waits: kept for the next batch
    large = codec.encode_token(uuid.UUID(int=2).bytes, 0, 0, "x" * (INLINE_MAX_BYTES + 1))

    big = writer.append(large)  # too large for the loop: the thread writes it
    small = writer.append(token(3))

    assert not big.done()
    assert small is big is queued  # written after it, in its batch
    assert await asyncio.wait_for(small, 5) == 3
    await writer.close()
    assert await read_log() == records_of([token(1), large, token(3)])


async def test_append_to_joins_a_gathering_batch_and_refuses_one_taken_to_be_written(
    open_writer: OpenWriter, read_log: ReadLog
) -> None:
    writer = open_writer(sync="write")
    gathering = writer.append_soon(token(1))  # written at the loop round's end

    assert writer.append_to(gathering, token(2), token(3))
    assert not gathering.done()
    assert await gathering == 3  # one write, all three
    assert not writer.append_to(gathering, token(4))  # written: nothing appended
    assert await writer.append(token(4)) == 4
    await writer.close()
    assert await read_log() == records_of([token(1), token(2), token(3), token(4)])


async def test_append_to_refuses_a_batch_asked_to_be_written_before_the_thread_takes_it(
    open_writer: OpenWriter, read_log: ReadLog
) -> None:
    writer = open_writer(sync="fsync", commit_delay=0.5)
    assert await writer.append(token(1)) == 1  # the thread now waits the delay before a batch
    asked = writer.append_soon(token(2))
    await asyncio.sleep(0)  # the round ends: the thread is asked to write it

    assert not writer.append_to(asked, token(3))
    assert not asked.done()
    assert await asyncio.wait_for(asked, 5) == 2
    await writer.close()
    assert await read_log() == records_of([token(1), token(2)])


async def test_in_fsync_mode_appends_under_load_wait_the_commit_delay_to_share_one_batch(
    open_writer: OpenWriter, read_log: ReadLog
) -> None:
    writer = open_writer(sync="fsync", commit_delay=0.5)
    assert await writer.append(token(1)) == 1  # an idle log: written at once

    # Right after a write the thread waits the delay: appends spread over it share a batch.
    second = writer.append(token(2))
    await asyncio.sleep(0.05)
    assert not second.done()
    assert writer.append(token(3)) is second
    assert await asyncio.wait_for(second, 5) == 3
    await writer.close()
    assert await read_log() == records_of([token(1), token(2), token(3)])


async def test_rotation_starts_segments_named_by_their_first_lsn_and_reads_across_them(
    open_writer: OpenWriter, read_log: ReadLog, wal_dir: Path, wal_id: uuid.UUID
) -> None:
    writer = open_writer(segment_max_bytes=HEADER_SIZE + 4 * TOKEN_SIZE)
    frames = [token(lsn) for lsn in range(1, 31)]

    for lsn, frame in enumerate(frames, start=1):
        assert await writer.append(frame) == lsn  # one batch each: rotate after every 4th
    await writer.close()

    segments = list_segments(wal_dir)
    assert [s.first_lsn for s in segments] == [1, 5, 9, 13, 17, 21, 25, 29]
    for segment in segments:
        assert segment.path.name == segment_name(segment.first_lsn)
        check_header(segment, segment.path.read_bytes(), wal_id)
    assert [scan_segment(s, wal_id).records for s in segments] == [4] * 7 + [2]
    assert _files(wal_dir, "*.tmp") == {}
    assert await read_log() == records_of(frames)


async def test_an_asked_rotation_seals_what_was_written_before_a_batch_appended_meanwhile(
    open_writer: OpenWriter, read_log: ReadLog, wal_dir: Path
) -> None:
    writer = open_writer(sync="fsync", commit_delay=0.5)
    assert await writer.append(token(1)) == 1

    writer.rotate()  # the thread wakes, then waits the commit delay after that write
    late = writer.append(token(2))  # arrives before the thread takes the batch
    assert await asyncio.wait_for(late, 5) == 2
    await writer.close()

    assert [s.first_lsn for s in list_segments(wal_dir)] == [1, 2]
    assert await read_log() == records_of([token(1), token(2)])


async def test_a_segment_file_left_unfinished_by_a_crash_is_removed_at_open(
    open_writer: OpenWriter, read_log: ReadLog, wal_dir: Path
) -> None:
    first = open_writer()
    assert await first.append(token(1)) == 1
    await first.close()
    unfinished = (wal_dir / segment_name(2)).with_suffix(".tmp")
    unfinished.write_bytes(b"")  # a crash between creating a segment and renaming it
    unrelated = wal_dir / "notes.tmp"
    unrelated.write_bytes(b"kept")

    second = open_writer()

    assert not unfinished.exists()
    assert unrelated.read_bytes() == b"kept"
    assert await second.append(token(2)) == 2
    await second.close()
    assert await read_log() == records_of([token(1), token(2)])


@pytest.mark.parametrize(
    "segment_max_bytes",
    [1 << 20, HEADER_SIZE + 1],
    ids=["newest segment holds records", "newest segment is empty after rotation"],
)
async def test_reopened_writer_continues_lsns_where_the_log_ended(
    segment_max_bytes: int, open_writer: OpenWriter, read_log: ReadLog, wal_dir: Path
) -> None:
    first = open_writer(segment_max_bytes=segment_max_bytes)
    for lsn in range(1, 6):
        assert await first.append(token(lsn)) == lsn
    await first.close()

    second = open_writer(segment_max_bytes=segment_max_bytes)

    assert second.end.lsn == 6
    assert await second.append(token(6)) == 6
    await second.close()
    assert await read_log() == records_of([token(lsn) for lsn in range(1, 7)])
    assert _files(wal_dir, "*.broken*") == {}


TORN_TAILS = {
    "garbage": random.Random(7).randbytes(100),
    "partial frame": token(99)[:20],
    "partial header": token(99)[:5],
    "zeros": bytes(4096),
    "partial frame then zeros": token(99)[:13] + bytes(500),
}


@pytest.mark.parametrize("tail", TORN_TAILS.values(), ids=list(TORN_TAILS))
async def test_torn_tail_is_kept_aside_and_cut_off_at_open(
    tail: bytes, open_writer: OpenWriter, read_log: ReadLog, wal_dir: Path
) -> None:
    first = open_writer()
    for lsn in range(1, 4):
        await first.append(token(lsn))
    await first.close()
    [segment] = list_segments(wal_dir)
    good_size = segment.path.stat().st_size
    _append_bytes(segment.path, tail)

    second = open_writer()

    assert segment.path.stat().st_size == good_size
    assert _files(wal_dir, "*.broken*") == {f"{segment.path.name}.broken": tail}
    assert await second.append(token(4)) == 4
    await second.close()
    assert await read_log() == records_of([token(lsn) for lsn in range(1, 5)])


async def test_each_repair_keeps_its_cut_bytes_in_a_new_broken_file(
    open_writer: OpenWriter, wal_dir: Path
) -> None:
    await open_writer().close()
    [segment] = list_segments(wal_dir)
    for tail in (b"\x01first", b"\x02second"):
        _append_bytes(segment.path, tail)
        await open_writer().close()

    assert _files(wal_dir, "*.broken*") == {
        f"{segment.path.name}.broken": b"\x01first",
        f"{segment.path.name}.broken.1": b"\x02second",
    }


async def test_reopen_keeps_a_record_whose_header_straddles_the_scan_chunk_boundary(
    open_writer: OpenWriter, read_log: ReadLog, wal_dir: Path
) -> None:
    frames = straddling_frames()
    first = open_writer()
    for lsn, frame in enumerate(frames, start=1):
        assert await first.append(frame) == lsn
    await first.close()

    second = open_writer()

    # Records 2 and 3 were acknowledged: they must not be cut, nor their LSNs reused.
    assert _files(wal_dir, "*.broken*") == {}
    assert await second.append(token(4)) == 4
    await second.close()
    assert await read_log() == records_of([*frames, token(4)])


async def test_reopen_continues_after_every_record_when_a_scan_chunk_ends_on_a_frame(
    open_writer: OpenWriter, read_log: ReadLog, wal_dir: Path
) -> None:
    frames = aligned_frames()
    first = open_writer()
    for lsn, frame in enumerate(frames, start=1):
        assert await first.append(frame) == lsn
    await first.close()

    second = open_writer()

    # The scan must not stop at the chunk's end: records 2 and 3 keep their LSNs.
    assert await second.append(token(4)) == 4
    await second.close()
    assert await read_log() == records_of([*frames, token(4)])


async def _wait(fut: asyncio.Future[int]) -> int:
    return await fut


async def test_cancelling_one_waiter_does_not_cancel_the_others_of_its_batch(
    open_writer: OpenWriter, read_log: ReadLog
) -> None:
    writer = open_writer(sync="fsync")
    # Holding the writer's condition (an RLock) keeps its thread from taking the
    # batch, so both waiters are still pending when one of them is cancelled.
    with writer._cond:
        batch = writer.append(token(1))
        assert writer.append(token(2)) is batch
        victim = asyncio.create_task(_wait(batch))
        other = asyncio.create_task(_wait(batch))
        await asyncio.sleep(0)
        assert not batch.done()
        victim.cancel()
        assert not batch.cancel()
        await asyncio.sleep(0)
        assert not batch.done()

    with pytest.raises(asyncio.CancelledError):  # woken, cancelled, once its batch is written
        await asyncio.wait_for(victim, 5)
    assert await asyncio.wait_for(other, 5) == 2
    assert not batch.cancelled()
    await writer.close()
    assert await read_log() == records_of([token(1), token(2)])


def _replace_fd(writer: WalWriter, path: str | Path, flags: int) -> None:
    """Point the writer's fd at another file, so the next write or fsync fails for real."""
    fd = os.open(path, flags)
    try:
        os.dup2(fd, writer._fd)
    finally:
        os.close(fd)


@pytest.mark.parametrize("rotation", [False, True], ids=["batch", "sealing-an-asked-rotation"])
async def test_failed_fsync_is_fatal_for_the_batch_and_every_later_append(
    open_writer: OpenWriter, rotation: bool
) -> None:
    fatals: list[WalFatal] = []
    writer = open_writer(sync="fsync", commit_delay=0.5, on_fatal=fatals.append)
    assert await writer.append(token(1)) == 1
    _replace_fd(writer, os.devnull, os.O_WRONLY)  # write(2) works, fdatasync(2) gives EINVAL

    if rotation:  # the thread waits the commit delay: the append below joins the seal's batch
        writer.rotate()
    batch = writer.append(token(2))

    with pytest.raises(WalFatal, match=segment_name(1)):
        await asyncio.wait_for(batch, 5)
    assert fatals == [batch.exception()]
    with pytest.raises(WalFatal):
        writer.append(token(3))


async def test_failed_write_is_fatal_and_acknowledged_records_survive_a_restart(
    open_writer: OpenWriter, read_log: ReadLog, wal_dir: Path
) -> None:
    fatals: list[WalFatal] = []
    writer = open_writer(sync="write", on_fatal=fatals.append)
    assert await writer.append(token(1)) == 1
    _replace_fd(writer, list_segments(wal_dir)[-1].path, os.O_RDONLY)  # write(2): EBADF

    batch = writer.append(token(2))

    with pytest.raises(WalFatal):
        await asyncio.wait_for(batch, 5)
    assert fatals == [batch.exception()]
    with pytest.raises(WalFatal):
        writer.append(token(3))
    await writer.close()

    restarted = open_writer()
    assert await restarted.append(token(2)) == 2
    await restarted.close()
    assert await read_log() == records_of([token(1), token(2)])


async def test_failed_background_fsync_in_write_mode_is_fatal(open_writer: OpenWriter) -> None:
    failed = asyncio.Event()
    fatals: list[WalFatal] = []

    def on_fatal(exc: WalFatal) -> None:
        fatals.append(exc)
        failed.set()

    writer = open_writer(sync="write", fsync_interval=0.01, on_fatal=on_fatal)
    _replace_fd(writer, os.devnull, os.O_WRONLY)

    assert await writer.append(token(1)) == 1  # acknowledged after write(2) ...
    await asyncio.wait_for(failed.wait(), 5)  # ... the syncer's fdatasync then fails

    assert len(fatals) == 1
    with pytest.raises(WalFatal):
        writer.append(token(2))

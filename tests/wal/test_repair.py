"""Repair at open, one kind of damage at a time, on real segment files.

Each test damages a real log the way a crash, a disk or an operator would,
opens it, and checks exactly what repair found and did: the findings, the
bytes kept aside (moved or copied, never deleted), the LSNs reported lost
above the checkpoint, what a reader returns afterwards, where the writer
appends, and the log lines an operator reads.

The log is 11 token records in segments of 4: segment 1 holds LSNs 1-4,
segment 5 holds 5-8 and segment 9, the newest, holds 9-11.
"""

from __future__ import annotations

import asyncio
import logging
import os
import uuid
from collections.abc import AsyncIterator, Callable
from pathlib import Path

import pytest
from policies import wal_policy
from wal_records import OpenWriter, ReadLog, records_of, token

from llmsvc.errors import WalFatal
from llmsvc.wal.codec import FRAME
from llmsvc.wal.repair import Finding, Repairs, quarantined
from llmsvc.wal.segment import HEADER_SIZE, create_segment, list_segments, segment_name
from llmsvc.wal.writer import WalWriter

TOKEN_SIZE = len(token(0))
RECORDS = 11
SEGMENT_MAX = HEADER_SIZE + 4 * TOKEN_SIZE
FRAMES = [token(lsn) for lsn in range(1, RECORDS + 1)]
SUMMARY = "wal repaired torn_tail={} corrupt={} quarantined={} lost_records={}"

Reopen = Callable[[int], tuple[WalWriter, Repairs]]


def at(index: int) -> int:
    """Where the `index`-th record of a segment starts (every token frame has one size)."""
    return HEADER_SIZE + index * TOKEN_SIZE


def seg(wal_dir: Path, first_lsn: int) -> Path:
    return wal_dir / segment_name(first_lsn)


def flip(path: Path, offset: int) -> bytes:
    """Invert one byte of the file in place; return the file as it is now."""
    data = bytearray(path.read_bytes())
    data[offset] ^= 0xFF
    path.write_bytes(data)
    return bytes(data)


def tree(wal_dir: Path) -> dict[str, object]:
    """Everything under the WAL directory: file bytes, symlink targets, directories."""
    found: dict[str, object] = {}
    for path in sorted(wal_dir.rglob("*")):
        name = str(path.relative_to(wal_dir))
        if path.is_symlink():
            found[name] = f"-> {os.readlink(path)}"
        elif path.is_dir():
            found[name] = "dir"
        else:
            found[name] = path.read_bytes()
    return found


def lines(caplog: pytest.LogCaptureFixture, logger: str) -> list[tuple[str, str]]:
    return [(r.levelname, r.getMessage()) for r in caplog.records if r.name == logger]


def repair_lines(caplog: pytest.LogCaptureFixture) -> list[tuple[str, str]]:
    return lines(caplog, "llmsvc.wal.repair")


def lost_line(first: int, last: int, before: int) -> tuple[str, str]:
    return (
        "ERROR",
        f"wal records lost lsn={first}..{last}: missing before {segment_name(before)} "
        "and not in the database",
    )


def quarantine_line(name: str, kind: str, reason: str) -> tuple[str, str]:
    return (
        "ERROR",
        f"wal segment quarantined segment={name} kind={kind} reason={reason} "
        f"kept=quarantine/{name}",
    )


def after(checkpoint: int, lsns: list[int]) -> list[tuple[int, bytes]]:
    """The records the log was written with (and appends made) at `lsns` above the checkpoint."""
    return records_of([token(lsn) for lsn in lsns if lsn > checkpoint])


@pytest.fixture
async def log(open_writer: OpenWriter, wal_dir: Path) -> list[bytes]:
    """The 11-record log of three segments, written and closed by a real writer."""
    writer = open_writer(segment_max_bytes=SEGMENT_MAX)
    for lsn, frame in enumerate(FRAMES, start=1):
        assert await writer.append(frame) == lsn  # one batch each: rotate after every 4th
    await writer.close()
    assert [s.first_lsn for s in list_segments(wal_dir)] == [1, 5, 9]
    assert seg(wal_dir, 9).stat().st_size == at(3)
    return FRAMES


@pytest.fixture
async def reopen(
    wal_dir: Path, wal_id: uuid.UUID, caplog: pytest.LogCaptureFixture
) -> AsyncIterator[Reopen]:
    """Open a writer on the damaged log with a database checkpoint, as the daemon does."""
    caplog.set_level(logging.INFO)
    writers: list[WalWriter] = []
    fatals: list[WalFatal] = []

    def _open(checkpoint: int) -> tuple[WalWriter, Repairs]:
        caplog.clear()
        writer = WalWriter(wal_dir, wal_id, wal_policy(segment_max_bytes=SEGMENT_MAX))
        repairs = writer.open(asyncio.get_running_loop(), fatals.append, checkpoint)
        writers.append(writer)
        return writer, repairs

    yield _open
    for writer in writers:
        await writer.close()
    assert not fatals


@pytest.mark.parametrize(
    ("checkpoint", "next_lsn"),
    [(0, 11), (11, 12)],
    ids=["database behind", "database already holds the torn record"],
)
async def test_a_truncated_last_record_is_kept_in_broken_and_cut_off(
    log: list[bytes],
    reopen: Reopen,
    read_log: ReadLog,
    wal_dir: Path,
    caplog: pytest.LogCaptureFixture,
    checkpoint: int,
    next_lsn: int,
) -> None:
    newest = seg(wal_dir, 9)
    whole = newest.read_bytes()
    newest.write_bytes(whole[:-5])  # the last 5 bytes of LSN 11 never reached the disk

    writer, repairs = reopen(checkpoint)

    kept = f"{newest.name}.broken"
    cut = TOKEN_SIZE - 5
    assert repairs.findings == [
        Finding(newest.name, "torn_tail", "partial", "cut", kept, at(2), cut)
    ]
    assert (wal_dir / kept).read_bytes() == whole[at(2) : -5]
    assert newest.read_bytes() == whole[: at(2)]
    assert repairs.lost == []
    assert quarantined(wal_dir) == []
    assert repair_lines(caplog) == [
        (
            "WARNING",
            f"wal tail repaired segment={newest.name} offset={at(2)} cut_bytes={cut} "
            f"reason=partial kept={kept}",
        ),
        ("WARNING", SUMMARY.format(1, 0, 0, 0)),
    ]
    # LSN 11 never became a whole record, so the writer may reuse it, unless the
    # database holds it: then the log goes on after it, in a new segment.
    assert await writer.append(token(next_lsn)) == next_lsn
    await writer.close()
    firsts = [1, 5, 9] if next_lsn == 11 else [1, 5, 9, 12]
    assert [s.first_lsn for s in list_segments(wal_dir)] == firsts
    assert await read_log(checkpoint + 1) == after(checkpoint, list(range(1, 11))) + records_of(
        [token(next_lsn)]
    )


@pytest.mark.parametrize(
    ("checkpoint", "lost"),
    [(0, [(6, 8)]), (6, [(7, 8)]), (8, [])],
    ids=["none of it flushed", "part of it flushed", "all of it flushed"],
)
async def test_a_flipped_byte_in_an_older_segment_quarantines_the_rest_of_that_segment(
    log: list[bytes],
    reopen: Reopen,
    read_log: ReadLog,
    wal_dir: Path,
    caplog: pytest.LogCaptureFixture,
    checkpoint: int,
    lost: list[tuple[int, int]],
) -> None:
    older = seg(wal_dir, 5)
    original = older.read_bytes()
    damaged = flip(older, at(1) + FRAME.size + 3)  # inside the payload of LSN 6

    writer, repairs = reopen(checkpoint)

    kept = f"quarantine/{older.name}.from-{at(1)}"
    assert repairs.findings == [
        Finding(older.name, "corrupt", "corrupt", "cut", kept, at(1), 3 * TOKEN_SIZE)
    ]
    assert (wal_dir / kept).read_bytes() == damaged[at(1) :]
    assert older.read_bytes() == original[: at(1)]
    assert quarantined(wal_dir) == [Path(kept).name]
    assert repairs.lost == lost
    lost_count = sum(b - a + 1 for a, b in lost)
    assert repair_lines(caplog) == [
        (
            "ERROR",
            f"wal corruption cut off segment={older.name} offset={at(1)} "
            f"cut_bytes={3 * TOKEN_SIZE} reason=corrupt kept={kept}",
        ),
        *[lost_line(a, b, 9) for a, b in lost],
        ("WARNING", SUMMARY.format(0, 1, 0, lost_count)),
    ]
    # The later segment is still read; the appends go on after the log's end.
    assert await writer.append(token(12)) == 12
    await writer.close()
    caplog.clear()
    assert await read_log(checkpoint + 1) == after(checkpoint, [1, 2, 3, 4, 5, 9, 10, 11, 12])
    skipped = [("WARNING", f"wal records missing lsn={a}..{b}: skipped") for a, b in lost]
    assert lines(caplog, "llmsvc.wal.reader") == skipped


@pytest.mark.parametrize(
    ("checkpoint", "next_lsn"),
    [(0, 10), (11, 12)],
    ids=["database behind", "database holds the whole log"],
)
async def test_a_flipped_byte_in_the_newest_segment_is_cut_off_into_broken(
    log: list[bytes],
    reopen: Reopen,
    read_log: ReadLog,
    wal_dir: Path,
    caplog: pytest.LogCaptureFixture,
    checkpoint: int,
    next_lsn: int,
) -> None:
    newest = seg(wal_dir, 9)
    original = newest.read_bytes()
    damaged = flip(newest, at(1) + 4)  # the CRC of LSN 10

    writer, repairs = reopen(checkpoint)

    kept = f"{newest.name}.broken"
    assert repairs.findings == [
        Finding(newest.name, "corrupt", "corrupt", "cut", kept, at(1), 2 * TOKEN_SIZE)
    ]
    assert (wal_dir / kept).read_bytes() == damaged[at(1) :]
    assert newest.read_bytes() == original[: at(1)]
    assert quarantined(wal_dir) == []
    assert repair_lines(caplog) == [
        (
            "ERROR",  # a checksum failure is not what a crash leaves: an error, not a warning
            f"wal tail repaired segment={newest.name} offset={at(1)} "
            f"cut_bytes={2 * TOKEN_SIZE} reason=corrupt kept={kept}",
        ),
        ("WARNING", SUMMARY.format(0, 1, 0, 0)),
    ]
    assert await writer.append(token(next_lsn)) == next_lsn
    await writer.close()
    assert await read_log(checkpoint + 1) == after(checkpoint, list(range(1, 10))) + records_of(
        [token(next_lsn)]
    )


@pytest.mark.parametrize(
    ("zeroed_from", "zeros", "next_lsn"),
    [(at(3), 4096, 12), (at(2), TOKEN_SIZE + 512, 11)],
    ids=["zeros after the last record", "the last record zeroed and beyond"],
)
async def test_a_zero_filled_tail_is_cut_off_as_a_torn_write(
    log: list[bytes],
    reopen: Reopen,
    read_log: ReadLog,
    wal_dir: Path,
    caplog: pytest.LogCaptureFixture,
    zeroed_from: int,
    zeros: int,
    next_lsn: int,
) -> None:
    newest = seg(wal_dir, 9)
    original = newest.read_bytes()
    newest.write_bytes(original[:zeroed_from] + bytes(zeros))  # blocks allocated, never written

    writer, repairs = reopen(0)

    kept = f"{newest.name}.broken"
    assert repairs.findings == [
        Finding(newest.name, "torn_tail", "zeros", "cut", kept, zeroed_from, zeros)
    ]
    assert (wal_dir / kept).read_bytes() == bytes(zeros)
    assert newest.read_bytes() == original[:zeroed_from]
    assert repairs.lost == []
    assert repair_lines(caplog) == [
        (
            "WARNING",
            f"wal tail repaired segment={newest.name} offset={zeroed_from} cut_bytes={zeros} "
            f"reason=zeros kept={kept}",
        ),
        ("WARNING", SUMMARY.format(1, 0, 0, 0)),
    ]
    assert await writer.append(token(next_lsn)) == next_lsn
    await writer.close()
    assert await read_log() == records_of([*FRAMES[: next_lsn - 1], token(next_lsn)])


@pytest.mark.parametrize(
    ("checkpoint", "lost"),
    [(0, [(5, 8)]), (6, [(7, 8)]), (8, [])],
    ids=["none of it flushed", "part of it flushed", "all of it flushed"],
)
async def test_a_missing_middle_segment_reports_the_lsns_the_database_lacks(
    log: list[bytes],
    reopen: Reopen,
    read_log: ReadLog,
    wal_dir: Path,
    tmp_path: Path,
    caplog: pytest.LogCaptureFixture,
    checkpoint: int,
    lost: list[tuple[int, int]],
) -> None:
    before = tree(wal_dir)
    seg(wal_dir, 5).rename(tmp_path / "gone.wal")
    before.pop(segment_name(5))

    writer, repairs = reopen(checkpoint)

    assert repairs.findings == []  # nothing there to move or cut
    assert repairs.lost == lost
    assert tree(wal_dir) == before
    lost_count = sum(b - a + 1 for a, b in lost)
    summary = [("WARNING", SUMMARY.format(0, 0, 0, lost_count))] if lost else []
    assert repair_lines(caplog) == [*[lost_line(a, b, 9) for a, b in lost], *summary]
    assert await writer.append(token(12)) == 12
    await writer.close()
    caplog.clear()
    assert await read_log(checkpoint + 1) == after(checkpoint, [1, 2, 3, 4, 9, 10, 11, 12])
    skipped = [("WARNING", f"wal records missing lsn={a}..{b}: skipped") for a, b in lost]
    assert lines(caplog, "llmsvc.wal.reader") == skipped


@pytest.fixture
async def foreign(tmp_path: Path) -> tuple[uuid.UUID, bytes]:
    """A segment another daemon wrote: its own instance id, records of its own."""
    other_dir = tmp_path / "other"
    other_dir.mkdir()
    other_id = uuid.uuid4()
    writer = WalWriter(other_dir, other_id, wal_policy())
    writer.open(asyncio.get_running_loop(), lambda exc: None)
    for seq in range(1, 8):
        await writer.append(token(seq, "foreign"))
    await writer.close()
    [segment] = list_segments(other_dir)
    return other_id, segment.path.read_bytes()


@pytest.mark.parametrize(
    ("name_lsn", "missing", "lost"),
    [(6, None, []), (12, None, []), (5, 5, [(5, 8)])],
    ids=["inside the log", "where the log goes on", "in place of a missing segment"],
)
async def test_a_segment_from_another_instance_is_quarantined_whole_and_never_read(
    log: list[bytes],
    foreign: tuple[uuid.UUID, bytes],
    reopen: Reopen,
    read_log: ReadLog,
    wal_dir: Path,
    tmp_path: Path,
    caplog: pytest.LogCaptureFixture,
    name_lsn: int,
    missing: int | None,
    lost: list[tuple[int, int]],
) -> None:
    other_id, data = foreign
    if missing is not None:
        seg(wal_dir, missing).rename(tmp_path / "gone.wal")
    name = segment_name(name_lsn)
    (wal_dir / name).write_bytes(data)  # copied in under a name no segment has

    writer, repairs = reopen(0)

    reason = f"belongs to instance {other_id}"
    kept = f"quarantine/{name}"
    assert repairs.findings == [
        Finding(name, "bad_header", reason, "quarantined", kept, 0, len(data))
    ]
    assert (wal_dir / kept).read_bytes() == data
    assert not (wal_dir / name).exists()
    assert quarantined(wal_dir) == [name]
    assert repairs.lost == lost
    assert repair_lines(caplog) == [
        quarantine_line(name, "bad_header", reason),
        *[lost_line(a, b, 9) for a, b in lost],
        ("WARNING", SUMMARY.format(0, 0, 1, sum(b - a + 1 for a, b in lost))),
    ]
    assert await writer.append(token(12)) == 12
    await writer.close()
    kept_lsns = [1, 2, 3, 4, 9, 10, 11, 12] if missing else list(range(1, 13))
    assert await read_log() == after(0, kept_lsns)


def make_directory(path: Path) -> Callable[[Path], None]:
    path.mkdir()
    (path / "inside").write_bytes(b"an operator's file")

    def moved(kept: Path) -> None:
        assert kept.is_dir()
        assert (kept / "inside").read_bytes() == b"an operator's file"

    return moved


def make_dangling_symlink(path: Path) -> Callable[[Path], None]:
    target = str(path.parent / "nowhere" / "segment.wal")
    path.symlink_to(target)

    def moved(kept: Path) -> None:
        assert kept.is_symlink()
        assert os.readlink(kept) == target

    return moved


@pytest.mark.parametrize(
    ("make", "reason"),
    [(make_directory, "Is a directory"), (make_dangling_symlink, "No such file or directory")],
    ids=["a directory", "a dangling symlink"],
)
async def test_an_unreadable_file_named_like_a_segment_is_quarantined(
    log: list[bytes],
    reopen: Reopen,
    read_log: ReadLog,
    wal_dir: Path,
    caplog: pytest.LogCaptureFixture,
    make: Callable[[Path], Callable[[Path], None]],
    reason: str,
) -> None:
    name = segment_name(6)
    check_moved = make(wal_dir / name)
    size = os.lstat(wal_dir / name).st_size

    writer, repairs = reopen(0)

    kept = f"quarantine/{name}"
    assert repairs.findings == [Finding(name, "unreadable", reason, "quarantined", kept, 0, size)]
    check_moved(wal_dir / kept)
    assert name not in os.listdir(wal_dir)
    assert quarantined(wal_dir) == [name]
    assert repairs.lost == []
    assert repair_lines(caplog) == [
        quarantine_line(name, "unreadable", reason),
        ("WARNING", SUMMARY.format(0, 0, 1, 0)),
    ]
    assert await writer.append(token(12)) == 12
    await writer.close()
    assert await read_log() == after(0, list(range(1, 13)))


@pytest.mark.parametrize(
    ("first_lsn", "inside"), [(3, 1), (10, 9)], ids=["an older segment", "the newest segment"]
)
async def test_a_segment_whose_first_lsn_overlaps_the_previous_one_is_quarantined(
    log: list[bytes],
    reopen: Reopen,
    read_log: ReadLog,
    wal_dir: Path,
    wal_id: uuid.UUID,
    caplog: pytest.LogCaptureFixture,
    first_lsn: int,
    inside: int,
) -> None:
    overlapping = create_segment(wal_dir, wal_id, first_lsn)  # this instance's, valid header
    with overlapping.path.open("ab") as f:
        f.write(b"".join(token(100 + i, "again") for i in range(3)))
    data = overlapping.path.read_bytes()

    writer, repairs = reopen(0)

    name = overlapping.path.name
    reason = f"its first LSN {first_lsn} is inside {segment_name(inside)}"
    kept = f"quarantine/{name}"
    assert repairs.findings == [Finding(name, "overlap", reason, "quarantined", kept, 0, len(data))]
    assert (wal_dir / kept).read_bytes() == data
    assert [s.first_lsn for s in list_segments(wal_dir)] == [1, 5, 9]
    assert repairs.lost == []
    assert repair_lines(caplog) == [
        quarantine_line(name, "overlap", reason),
        ("WARNING", SUMMARY.format(0, 0, 1, 0)),
    ]
    assert await writer.append(token(12)) == 12
    await writer.close()
    assert await read_log() == after(0, list(range(1, 13)))


async def test_a_log_ending_below_the_checkpoint_goes_on_after_the_checkpoint(
    log: list[bytes],
    reopen: Reopen,
    read_log: ReadLog,
    wal_dir: Path,
    caplog: pytest.LogCaptureFixture,
) -> None:
    # The database holds up to LSN 15, the log only up to 11 (its unsynced end
    # was lost with the page cache): LSNs 12-15 are taken, whatever the log says.
    writer, repairs = reopen(15)

    assert repairs.clean
    assert repair_lines(caplog) == []
    assert writer.end.lsn == 16
    assert lines(caplog, "llmsvc.wal.writer") == [
        ("INFO", f"wal opened dir={wal_dir} segment={segment_name(16)} next_lsn=16")
    ]
    assert await writer.append(token(16)) == 16
    await writer.close()
    assert [s.first_lsn for s in list_segments(wal_dir)] == [1, 5, 9, 16]
    assert await read_log(16) == records_of([token(16)])
    assert await read_log() == records_of([*FRAMES, token(16)])


async def test_a_torn_tail_stays_beside_its_segment_when_a_stray_file_sorts_after_it(
    log: list[bytes],
    foreign: tuple[uuid.UUID, bytes],
    reopen: Reopen,
    read_log: ReadLog,
    wal_dir: Path,
    caplog: pytest.LogCaptureFixture,
) -> None:
    # A crash tore the newest segment's end, and someone left another daemon's
    # segment here under a later name: it is not part of this log, so the torn
    # tail is still the ordinary crash damage of the newest segment.
    newest = seg(wal_dir, 9)
    whole = newest.read_bytes()
    newest.write_bytes(whole[:-5])
    _other_id, data = foreign
    (wal_dir / segment_name(0x40)).write_bytes(data)

    writer, repairs = reopen(0)

    assert [(f.segment, f.kind, f.action, f.kept) for f in repairs.findings] == [
        (newest.name, "torn_tail", "cut", f"{newest.name}.broken"),
        (segment_name(0x40), "bad_header", "quarantined", f"quarantine/{segment_name(0x40)}"),
    ]
    assert (wal_dir / f"{newest.name}.broken").read_bytes() == whole[at(2) : -5]
    assert quarantined(wal_dir) == [segment_name(0x40)]
    assert repair_lines(caplog)[0][1].startswith(f"wal tail repaired segment={newest.name} ")
    assert await writer.append(token(11)) == 11
    await writer.close()
    assert await read_log() == after(0, list(range(1, 12)))


async def test_repair_is_idempotent_a_second_open_finds_and_moves_nothing(
    log: list[bytes],
    foreign: tuple[uuid.UUID, bytes],
    reopen: Reopen,
    read_log: ReadLog,
    wal_dir: Path,
    tmp_path: Path,
    caplog: pytest.LogCaptureFixture,
) -> None:
    # Every kind of damage at once: LSN 2 corrupt in the oldest segment, segment 5
    # gone, a foreign segment and a directory under free names, a torn newest tail.
    flip(seg(wal_dir, 1), at(1) + FRAME.size)
    seg(wal_dir, 5).rename(tmp_path / "gone.wal")
    (wal_dir / segment_name(7)).write_bytes(foreign[1])
    (wal_dir / segment_name(6)).mkdir()
    newest = seg(wal_dir, 9)
    newest.write_bytes(newest.read_bytes()[:-1])

    first_writer, first = reopen(0)
    await first_writer.close()

    assert [(f.segment, f.kind, f.action) for f in first.findings] == [
        (segment_name(1), "corrupt", "cut"),
        (segment_name(6), "unreadable", "quarantined"),
        (segment_name(7), "bad_header", "quarantined"),
        (segment_name(9), "torn_tail", "cut"),
    ]
    assert first.lost == [(2, 8)]
    assert repair_lines(caplog)[-1] == ("WARNING", SUMMARY.format(1, 1, 2, 7))
    repaired = tree(wal_dir)
    assert sorted(quarantined(wal_dir)) == sorted(
        [f"{segment_name(1)}.from-{at(1)}", segment_name(6), segment_name(7)]
    )

    second_writer, second = reopen(0)
    await second_writer.close()

    assert second.findings == []
    assert second.lost == first.lost  # still missing, still not in the database: said again
    assert tree(wal_dir) == repaired
    assert repair_lines(caplog) == [lost_line(2, 8, 9), ("WARNING", SUMMARY.format(0, 0, 0, 7))]

    # Once the database has moved past the hole, the log is clean.
    third_writer, third = reopen(10)
    await third_writer.close()
    assert third.clean
    assert repair_lines(caplog) == []
    assert tree(wal_dir) == repaired
    assert await read_log() == after(0, [1, 9, 10])

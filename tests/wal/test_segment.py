"""Segment headers, the directory's identity, and its lock."""

from __future__ import annotations

import asyncio
import os
import shutil
import struct
import subprocess
import sys
import uuid
from pathlib import Path

import pytest
from crc32c import crc32c
from policies import wal_policy
from wal_records import token

from llmsvc.errors import WalLocked
from llmsvc.wal.errors import Corruption
from llmsvc.wal.reader import WalReader, scan_segment
from llmsvc.wal.segment import (
    HEADER_SIZE,
    LOCK_FILE,
    MAGIC,
    Segment,
    WalLock,
    check_header,
    create_segment,
    encode_header,
    instance_id,
    list_segments,
    segment_name,
)
from llmsvc.wal.writer import WalWriter


def test_instance_id_is_created_once_and_stable_across_calls(tmp_path: Path) -> None:
    first = instance_id(tmp_path)

    assert instance_id(tmp_path) == first
    assert (tmp_path / "instance_id").read_text() == f"{first}\n"
    assert [p.name for p in tmp_path.iterdir()] == ["instance_id"]  # no temp file left


def test_each_wal_directory_gets_its_own_instance_id(tmp_path: Path) -> None:
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    assert instance_id(tmp_path / "a") != instance_id(tmp_path / "b")


def test_created_segment_is_named_by_its_first_lsn_and_carries_a_valid_header(
    wal_dir: Path, wal_id: uuid.UUID
) -> None:
    segment = create_segment(wal_dir, wal_id, 0x2A)

    assert segment == Segment(wal_dir / "000000000000002a.wal", 0x2A)
    assert segment.path.read_bytes() == encode_header(wal_id, 0x2A)
    assert len(encode_header(wal_id, 0x2A)) == HEADER_SIZE
    check_header(segment, segment.path.read_bytes(), wal_id)
    assert not list(wal_dir.glob("*.tmp"))


def test_header_of_another_instances_segment_is_rejected(wal_dir: Path, wal_id: uuid.UUID) -> None:
    segment = create_segment(wal_dir, wal_id, 1)

    with pytest.raises(Corruption, match=f"belongs to instance {wal_id}") as exc:
        check_header(segment, segment.path.read_bytes(), uuid.uuid4())
    assert (exc.value.segment, exc.value.offset) == (segment.path, 0)


def test_header_of_a_renamed_segment_is_rejected_for_its_wrong_first_lsn(
    wal_dir: Path, wal_id: uuid.UUID
) -> None:
    original = create_segment(wal_dir, wal_id, 1)
    renamed = Segment(original.path.rename(wal_dir / segment_name(7)), 7)

    with pytest.raises(Corruption, match="header says first LSN 1") as exc:
        check_header(renamed, renamed.path.read_bytes(), wal_id)
    assert exc.value.segment == renamed.path


@pytest.mark.parametrize("length", [0, 1, HEADER_SIZE - 1])
def test_truncated_header_is_rejected(wal_dir: Path, wal_id: uuid.UUID, length: int) -> None:
    segment = create_segment(wal_dir, wal_id, 1)

    with pytest.raises(Corruption, match="header is truncated"):
        check_header(segment, segment.path.read_bytes()[:length], wal_id)


@pytest.mark.parametrize("at", [0, 4, 6, 8, 23, 24, 31, 32, 35])
def test_header_with_any_flipped_byte_is_rejected(
    wal_dir: Path, wal_id: uuid.UUID, at: int
) -> None:
    segment = create_segment(wal_dir, wal_id, 1)
    data = bytearray(segment.path.read_bytes())
    data[at] ^= 0x01

    with pytest.raises(Corruption, match="header checksum mismatch"):
        check_header(segment, bytes(data), wal_id)


def test_header_with_a_valid_checksum_but_another_format_is_rejected(wal_id: uuid.UUID) -> None:
    head = struct.pack("<4sHH16sQ", MAGIC, 2, 0, wal_id.bytes, 1)
    data = head + struct.pack("<I", crc32c(head))

    with pytest.raises(Corruption, match="not a version 1 llmsvc WAL segment"):
        check_header(Segment(Path("0000000000000001.wal"), 1), data, wal_id)


async def test_a_segment_copied_from_another_instance_is_never_replayed(
    tmp_path: Path, wal_dir: Path, wal_id: uuid.UUID
) -> None:
    other = tmp_path / "other"
    other.mkdir()
    foreign = create_segment(other, instance_id(other), 1)
    with foreign.path.open("ab") as f:
        f.write(token(1))
    copied = Path(shutil.copy(foreign.path, wal_dir / foreign.path.name))

    with pytest.raises(Corruption, match="belongs to instance"):
        scan_segment(Segment(copied, 1), wal_id)
    reader = WalReader(wal_dir, wal_id)
    with pytest.raises(Corruption, match="belongs to instance"):
        await reader.seek(1)
    await reader.close()
    writer = WalWriter(wal_dir, wal_id, wal_policy())
    repairs = writer.open(asyncio.get_running_loop(), lambda exc: None)
    await writer.close()

    # Opening the log moves it aside whole; the log starts afresh without it.
    [finding] = repairs.findings
    assert (finding.kind, finding.action) == ("bad_header", "quarantined")
    assert (wal_dir / finding.kept).read_bytes() == foreign.path.read_bytes()
    assert writer.end.lsn == 1
    reader = WalReader(wal_dir, wal_id)
    await reader.seek(1)
    assert await reader.read(None, 100) == []
    await reader.close()


def test_list_segments_orders_by_lsn_and_ignores_other_files(wal_dir: Path) -> None:
    for name in [
        "0000000000000010.wal",
        "0000000000000009.wal",
        "0000000000000001.wal",
        "0000000000000001.wal.broken",
        "0000000000000002.tmp",
        "1.wal",
        "zzzzzzzzzzzzzzzz.wal",
        "LOCK",
        "instance_id",
    ]:
        (wal_dir / name).touch()

    assert [s.first_lsn for s in list_segments(wal_dir)] == [1, 9, 16]


def test_second_lock_on_the_same_directory_raises_naming_the_holder_pid(wal_dir: Path) -> None:
    holder = WalLock(wal_dir)
    holder.acquire()
    try:
        with pytest.raises(WalLocked, match=rf"\(pid {os.getpid()}\)"):
            WalLock(wal_dir).acquire()
    finally:
        holder.release()


def test_released_lock_can_be_taken_again(wal_dir: Path) -> None:
    first = WalLock(wal_dir)
    first.acquire()
    first.release()

    second = WalLock(wal_dir)
    second.acquire()
    second.release()


HOLD_LOCK = """
import sys
from pathlib import Path
from llmsvc.wal.segment import WalLock

WalLock(Path(sys.argv[1])).acquire()
print("locked", flush=True)
sys.stdin.read()
"""


def test_lock_held_by_another_process_raises_naming_its_pid(wal_dir: Path) -> None:
    with subprocess.Popen(
        [sys.executable, "-c", HOLD_LOCK, str(wal_dir)],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    ) as holder:
        try:
            assert holder.stdout is not None
            assert holder.stdout.readline() == "locked\n"

            with pytest.raises(WalLocked, match=rf"\(pid {holder.pid}\)"):
                WalLock(wal_dir).acquire()
        finally:
            holder.kill()  # like kill -9: the kernel drops the flock with the process
            holder.wait(timeout=10)

    lock = WalLock(wal_dir)
    lock.acquire()  # a crashed holder leaves no stale lock
    assert (wal_dir / LOCK_FILE).read_text() == f"{os.getpid()}\n"
    lock.release()

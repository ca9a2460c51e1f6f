"""The WAL writer on a really full disk: a tmpfs of a few hundred KiB, filled for real.

Needs root to mount the tmpfs; `LLMSVC_TEST_TMPFS=skip` skips these tests, visibly.
"""

from __future__ import annotations

import asyncio
import logging
import os
import subprocess
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
from policies import wal_policy
from wal_records import OpenWriter, records_of, token

from llmsvc.errors import WalFull
from llmsvc.wal.reader import WalReader
from llmsvc.wal.segment import instance_id, list_segments
from llmsvc.wal.writer import WalWriter

DISK_BYTES = 512 * 1024
FRAME = token(0, "x" * 200)


@pytest.fixture
def small_disk(tmp_path: Path) -> Iterator[Path]:
    """A tmpfs of DISK_BYTES, unmounted at teardown whatever happened."""
    if os.environ.get("LLMSVC_TEST_TMPFS") == "skip":
        pytest.skip("LLMSVC_TEST_TMPFS=skip: the disk-full tests need a tmpfs")
    mount = tmp_path / "disk"
    mount.mkdir()
    done = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", f"size={DISK_BYTES}", "tmpfs", str(mount)],
        capture_output=True,
        text=True,
    )
    if done.returncode != 0:
        pytest.fail(
            f"cannot mount a tmpfs for the disk-full tests ({done.stderr.strip()}): run the "
            "tests as root, or set LLMSVC_TEST_TMPFS=skip to skip them"
        )
    try:
        yield mount
    finally:
        subprocess.run(["umount", "-l", str(mount)], check=False)


def _fill(disk: Path, leave: int) -> Path:
    """A file taking all but about `leave` bytes of the disk."""
    filler = disk / "filler"
    stat = os.statvfs(disk)
    size = stat.f_bavail * stat.f_frsize - leave
    with filler.open("wb") as f:
        f.write(b"\1" * size)
    return filler


async def _until_full(writer: WalWriter) -> list[bytes]:
    """Append one frame at a time until the disk refuses one; return those acknowledged."""
    acknowledged: list[bytes] = []
    for seq in range(10_000):
        frame = token(seq, "x" * 200)
        try:
            await asyncio.shield(writer.append(frame))
        except WalFull:
            return acknowledged
        acknowledged.append(frame)
    raise AssertionError("the disk never filled up")


async def _read_all(wal_dir: Path, wal_id: uuid.UUID) -> list[tuple[int, bytes]]:
    reader = WalReader(wal_dir, wal_id)
    try:
        await reader.seek(1)
        records: list[tuple[int, bytes]] = []
        while batch := await reader.read(None, 1000):
            records += batch
        return records
    finally:
        await reader.close()


async def _writable(writer: WalWriter, within: float = 10.0) -> None:
    for _ in range(int(within / 0.05)):
        if writer.full is None:
            return
        await asyncio.sleep(0.05)
    raise AssertionError("the writer did not notice the space that returned")


@pytest.mark.parametrize("sync", ["write", "fsync"])
async def test_a_full_disk_refuses_appends_cuts_nothing_journaled_and_recovers_by_itself(
    sync: str, small_disk: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="llmsvc.wal.writer")
    wal_dir = small_disk / "wal"
    wal_dir.mkdir()
    wal_id = instance_id(wal_dir)
    writer = WalWriter(wal_dir, wal_id, wal_policy(sync=sync))
    writer.open(asyncio.get_running_loop(), lambda exc: pytest.fail(f"fatal: {exc}"))
    filler = _fill(small_disk, leave=64 * 1024)

    acknowledged = await _until_full(writer)

    [segment] = list_segments(wal_dir)
    assert writer.full is not None
    assert "no space left on device" in str(writer.full).lower()
    assert "wal full" in caplog.text
    # Nothing after the last acknowledged batch is on disk: the partial write was cut off.
    assert segment.path.stat().st_size == writer.end.offset
    assert await _read_all(wal_dir, wal_id) == records_of(acknowledged)
    with pytest.raises(WalFull):
        writer.append(FRAME)
    with pytest.raises(WalFull):
        writer.queue(FRAME)
    held = token(99_999, "held end")
    writer.hold(held)

    filler.unlink()
    await _writable(writer)
    after = token(100_000, "after")
    await asyncio.shield(writer.append(after))
    await writer.close()

    assert "wal writable again held_records_written=1" in caplog.text
    assert await _read_all(wal_dir, wal_id) == records_of([*acknowledged, held, after])


async def test_hold_is_a_plain_append_while_the_disk_has_room(
    open_writer: OpenWriter, wal_dir: Path, wal_id: uuid.UUID
) -> None:
    writer = open_writer()
    writer.hold(token(1))
    await asyncio.shield(writer.append(token(2)))
    await writer.close()

    assert await _read_all(wal_dir, wal_id) == records_of([token(1), token(2)])


async def test_closing_while_full_logs_the_held_records_it_could_not_write(
    small_disk: Path, caplog: pytest.LogCaptureFixture
) -> None:
    wal_dir = small_disk / "wal"
    wal_dir.mkdir()
    writer = WalWriter(wal_dir, instance_id(wal_dir), wal_policy())
    writer.open(asyncio.get_running_loop(), lambda exc: pytest.fail(f"fatal: {exc}"))
    _fill(small_disk, leave=16 * 1024)
    await _until_full(writer)
    writer.hold(token(1), token(2))

    await writer.close()

    assert "held records not written count=2" in caplog.text


async def test_a_rotation_postponed_by_a_full_disk_leaves_no_temp_file(
    small_disk: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="llmsvc.wal.writer")
    wal_dir = small_disk / "wal"
    wal_dir.mkdir()
    wal_id = instance_id(wal_dir)
    writer = WalWriter(wal_dir, wal_id, wal_policy())
    writer.open(asyncio.get_running_loop(), lambda exc: pytest.fail(f"fatal: {exc}"))
    first = token(1)
    await asyncio.shield(writer.append(first))
    _fill(small_disk, leave=0)  # the live segment's page still has room; a new file has none

    second = token(2)
    writer.rotate()
    await asyncio.shield(writer.append(second))  # written, then the rotation finds no room

    assert "wal rotation postponed" in caplog.text
    assert [s.first_lsn for s in list_segments(wal_dir)] == [1]
    assert list(wal_dir.glob("*.tmp")) == []
    await writer.close()
    assert await _read_all(wal_dir, wal_id) == records_of([first, second])

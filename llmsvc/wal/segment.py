"""Segment files: names, headers, creation, and the directory's lock and identity.

A segment is named by the LSN of its first record, 16 hex digits, `.wal`.
Its 36-byte header is `magic | version u16 | flags u16 | instance id (16) |
first lsn u64 | crc32c u32` so a segment copied from another daemon or
renamed by hand is recognised, not replayed.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import struct
import uuid
from dataclasses import dataclass
from pathlib import Path

from crc32c import crc32c

from llmsvc import private
from llmsvc.errors import WalLocked
from llmsvc.wal.errors import Corruption

MAGIC = b"LWAL"
VERSION = 1
HEADER = struct.Struct("<4sHH16sQ")
HEADER_SIZE = HEADER.size + 4
SUFFIX = ".wal"
TEMP_SUFFIX = ".tmp"  # a segment being created, renamed to SUFFIX once its header is synced
LOCK_FILE = "LOCK"
INSTANCE_FILE = "instance_id"


@dataclass(frozen=True, slots=True)
class Segment:
    path: Path
    first_lsn: int


def segment_name(first_lsn: int) -> str:
    return f"{first_lsn:016x}{SUFFIX}"


def list_segments(wal_dir: Path) -> list[Segment]:
    """Every segment in the directory, oldest first; stray files are ignored."""
    segments = []
    for path in wal_dir.glob(f"*{SUFFIX}"):
        try:
            first_lsn = int(path.stem, 16)
        except ValueError:
            continue
        if len(path.stem) == 16:
            segments.append(Segment(path, first_lsn))
    return sorted(segments, key=lambda s: s.first_lsn)


def encode_header(instance_id: uuid.UUID, first_lsn: int) -> bytes:
    head = HEADER.pack(MAGIC, VERSION, 0, instance_id.bytes, first_lsn)
    return head + struct.pack("<I", crc32c(head))


def check_header(segment: Segment, data: bytes, instance_id: uuid.UUID) -> None:
    """Raise Corruption unless `data` starts with this instance's header for this segment."""
    if len(data) < HEADER_SIZE:
        raise Corruption(segment.path, 0, "header is truncated")
    head = data[: HEADER.size]
    (crc,) = struct.unpack_from("<I", data, HEADER.size)
    if crc32c(head) != crc:
        raise Corruption(segment.path, 0, "header checksum mismatch")
    magic, version, _flags, instance, first_lsn = HEADER.unpack(head)
    if magic != MAGIC or version != VERSION:
        raise Corruption(segment.path, 0, f"not a version {VERSION} llmsvc WAL segment")
    if instance != instance_id.bytes:
        raise Corruption(segment.path, 0, f"belongs to instance {uuid.UUID(bytes=instance)}")
    if first_lsn != segment.first_lsn:
        raise Corruption(segment.path, 0, f"header says first LSN {first_lsn}")


def create_segment(wal_dir: Path, instance_id: uuid.UUID, first_lsn: int) -> Segment:
    """Create a segment atomically: temp file, fsync, rename, fsync the directory.

    After a crash the segment either exists whole with its header, or not at all.
    """
    path = wal_dir / segment_name(first_lsn)
    tmp = path.with_suffix(TEMP_SUFFIX)
    fd = private.open_file(tmp, os.O_WRONLY | os.O_TRUNC)
    try:
        try:
            os.write(fd, encode_header(instance_id, first_lsn))
            os.fsync(fd)
        finally:
            os.close(fd)
    except OSError:
        with contextlib.suppress(OSError):  # a rotation postponed by a full disk leaves nothing
            tmp.unlink()
        raise
    os.rename(tmp, path)
    fsync_dir(wal_dir)
    return Segment(path, first_lsn)


def remove_unfinished_segments(wal_dir: Path) -> list[Path]:
    """Remove segment files whose creation a crash cut short (`<lsn>.tmp`, never renamed).

    Nothing was ever journaled in one: records go to a segment only after its rename.
    """
    removed = []
    for path in wal_dir.glob(f"*{TEMP_SUFFIX}"):
        if len(path.stem) == 16 and all(c in "0123456789abcdef" for c in path.stem):
            path.unlink(missing_ok=True)
            removed.append(path)
    return removed


def fsync_dir(path: Path) -> None:
    """Make creations and renames in a directory durable."""
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def instance_id(wal_dir: Path) -> uuid.UUID:
    """This WAL directory's instance id, created once and kept for its lifetime.

    The database keys the checkpoint by it, so a restarted daemon resumes its
    own log and several daemons can share one database.
    """
    found = read_instance_id(wal_dir)
    if found is not None:
        return found
    path = wal_dir / INSTANCE_FILE
    new = uuid.uuid4()
    tmp = path.with_suffix(".tmp")
    fd = private.open_file(tmp, os.O_WRONLY | os.O_TRUNC)
    try:
        os.write(fd, f"{new}\n".encode())
        os.fsync(fd)
    finally:
        os.close(fd)
    os.rename(tmp, path)
    fsync_dir(wal_dir)
    return new


def read_instance_id(wal_dir: Path) -> uuid.UUID | None:
    """The directory's instance id, or None if it has none (read, never created): the one
    place the file is parsed, so readers (`llmsvc wal`, `llmsvc check`) make no log."""
    try:
        return uuid.UUID((wal_dir / INSTANCE_FILE).read_text().strip())
    except FileNotFoundError:
        return None


def lock_holder(wal_dir: Path) -> int | None:
    """The pid that holds the directory's lock (0 if it wrote none), or None if it is free."""
    try:
        fd = os.open(wal_dir / LOCK_FILE, os.O_RDONLY)
    except FileNotFoundError:
        return None
    try:
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)  # released by the close below
    except BlockingIOError:
        text = os.read(fd, 32).decode(errors="replace").strip()
        return int(text) if text.isdigit() else 0
    finally:
        os.close(fd)
    return None


class WalLock:
    """An exclusive flock on the WAL directory, so two daemons never share one log."""

    def __init__(self, wal_dir: Path) -> None:
        self.path = wal_dir / LOCK_FILE
        self._fd: int | None = None

    def acquire(self) -> None:
        private.make_dirs(self.path.parent)
        fd = private.open_file(self.path, os.O_RDWR)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.read(fd, 32).decode(errors="replace").strip() or "unknown"
            os.close(fd)
            raise WalLocked(
                f"the WAL directory {self.path.parent} is in use by another llmsvc "
                f"(pid {holder}); each daemon needs its own wal_dir"
            ) from None
        os.ftruncate(fd, 0)
        os.write(fd, f"{os.getpid()}\n".encode())
        self._fd = fd

    def release(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None

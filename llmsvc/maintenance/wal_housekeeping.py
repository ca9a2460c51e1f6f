"""WAL housekeeping: seal an old live segment, remove the segments nothing needs any more.

A segment is needed while any of its records is above the database
checkpoint (not yet flushed) or above the checkpoint of the newest verified
backup (a restore of it replays them). With no verified backup, flushed is
enough. The newest segment is never removed: the writer appends to it.
"""

from __future__ import annotations

import asyncio
import itertools
import time
import uuid
from pathlib import Path

from sqlalchemy.ext.asyncio import AsyncEngine

from llmsvc.logs import logger
from llmsvc.maintenance.backup import newest_verified
from llmsvc.maintenance.runs import JobResult
from llmsvc.store.flusher import load_checkpoint
from llmsvc.wal import HEADER_SIZE, Segment, WalWriter, list_segments

log = logger(__name__)


async def housekeep(
    engine: AsyncEngine,
    wal_dir: Path,
    instance_id: uuid.UUID,
    backup_dir: Path,
    writer: WalWriter | None = None,
    max_segment_age: float | None = None,
) -> JobResult:
    """Rotate the live segment past `max_segment_age` seconds; remove segments not needed."""
    rotated = False
    if writer is not None and max_segment_age is not None:
        old = time.monotonic() - writer.segment_opened > max_segment_age
        if old and writer.end.offset > HEADER_SIZE:
            writer.rotate()
            rotated = True
    checkpoint = await load_checkpoint(engine, instance_id)
    backup = await asyncio.to_thread(newest_verified, backup_dir)
    keep_above = checkpoint if backup is None else min(checkpoint, backup.checkpoint(instance_id))
    removable = await asyncio.to_thread(removable_segments, wal_dir, keep_above)
    if removable and engine.dialect.name == "sqlite":
        # synchronous=NORMAL commits are not power-safe until SQLite's own WAL is
        # checkpointed; do that before dropping our copy of the records.
        async with engine.connect() as conn:
            await conn.exec_driver_sql("PRAGMA wal_checkpoint(FULL)")
    freed = await asyncio.to_thread(_remove, removable)
    found: dict[str, object] = {
        "checkpoint": checkpoint,
        "kept_above_lsn": keep_above,
        "rotated": rotated,
    }
    if backup is not None:
        found["newest_verified_backup"] = backup.name
    return JobResult(
        rows=len(removable),
        bytes=freed,
        found=found,
        repaired={"removed": [s.path.name for s in removable]},
        idle=not (removable or rotated),
    )


def removable_segments(wal_dir: Path, keep_above: int) -> list[Segment]:
    """Segments whose every record is at or below `keep_above`; never the newest."""
    segments = list_segments(wal_dir)
    return [s for s, nxt in itertools.pairwise(segments) if nxt.first_lsn - 1 <= keep_above]


def _remove(segments: list[Segment]) -> int:
    freed = 0
    for segment in segments:
        freed += segment.path.stat().st_size
        segment.path.unlink()
        log.info("wal segment removed", segment=segment.path.name)
    return freed

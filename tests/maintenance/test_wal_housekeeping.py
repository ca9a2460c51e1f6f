"""WAL housekeeping on real segments: what it removes, what a backup keeps, when it rotates."""

from __future__ import annotations

import itertools
import uuid
from pathlib import Path
from typing import Any

from policies import flush_policy
from sqlalchemy.ext.asyncio import AsyncEngine
from store_steps import flush, journal_attempt

from llmsvc.maintenance.backup import backup
from llmsvc.maintenance.wal_housekeeping import housekeep
from llmsvc.store.flusher import Flusher
from llmsvc.wal.segment import list_segments


def names(wal_dir: Path) -> list[str]:
    return [s.path.name for s in list_segments(wal_dir)]


async def test_segments_wholly_below_the_checkpoint_are_removed_but_never_the_newest(
    engine: AsyncEngine, wal_dir: Path, wal_id: uuid.UUID, open_writer: Any, tmp_path: Path
) -> None:
    writer = open_writer(segment_max_bytes=1024)
    for _ in range(6):
        await journal_attempt(writer, 40)  # one write each: a rotation after each
    segments = list_segments(wal_dir)
    assert len(segments) >= 5
    last_of = {s.path.name: nxt.first_lsn - 1 for s, nxt in itertools.pairwise(segments)}
    newest = segments[-1].path.name

    flusher = Flusher(engine, wal_dir, wal_id, lambda: writer.end, flush_policy(batch_records=20))
    await flusher.start()
    removed: list[str] = []
    while not flusher.caught_up:
        assert await flusher.flush_once() > 0
        result = await housekeep(engine, wal_dir, wal_id, tmp_path / "no-backups")
        removed += result.repaired["removed"]
        assert set(names(wal_dir)) == {newest} | {
            name for name, last in last_of.items() if last > flusher.checkpoint
        }
    await flusher.close()

    assert names(wal_dir) == [newest]
    assert sorted(removed) == sorted(last_of)
    assert result.status == "ok"


async def test_segments_after_the_newest_verified_backup_are_kept_for_a_restore(
    engine: AsyncEngine, wal_dir: Path, wal_id: uuid.UUID, open_writer: Any, tmp_path: Path
) -> None:
    backups = tmp_path / "backups"
    writer = open_writer(segment_max_bytes=1024)
    for _ in range(3):
        await journal_attempt(writer, 40)
    await flush(engine, wal_dir, wal_id, writer)
    first = await backup(engine, backups)
    assert first.found["checkpoints"] == {str(wal_id): writer.end.lsn - 1}
    covered = writer.end.lsn - 1
    for _ in range(3):
        await journal_attempt(writer, 40)
    await flush(engine, wal_dir, wal_id, writer)

    await housekeep(engine, wal_dir, wal_id, backups)

    # Everything is flushed, but a restore of the backup replays what came after it.
    left = list_segments(wal_dir)
    assert left[0].first_lsn <= covered + 1 < left[1].first_lsn
    assert len(left) == 4

    await backup(engine, backups)
    result = await housekeep(engine, wal_dir, wal_id, backups)

    assert len(list_segments(wal_dir)) == 1
    assert result.rows == 3
    assert result.found["newest_verified_backup"] != first.found["file"]


async def test_a_live_segment_older_than_the_limit_is_sealed_if_it_holds_records(
    engine: AsyncEngine, wal_dir: Path, wal_id: uuid.UUID, open_writer: Any, tmp_path: Path
) -> None:
    writer = open_writer()
    empty = await housekeep(engine, wal_dir, wal_id, tmp_path, writer, max_segment_age=0)
    assert not empty.found["rotated"]  # nothing in it: nothing to seal
    assert empty.idle  # nothing done: its run is logged at DEBUG
    await journal_attempt(writer, 5)
    sealed_at = writer.end.lsn

    young = await housekeep(engine, wal_dir, wal_id, tmp_path, writer, max_segment_age=3600)
    old = await housekeep(engine, wal_dir, wal_id, tmp_path, writer, max_segment_age=0)
    await journal_attempt(writer, 5)  # the rotation happens in the writer's next batch at latest

    assert (young.found["rotated"], old.found["rotated"]) == (False, True)
    assert (young.idle, old.idle) == (True, False)
    first, second = list_segments(wal_dir)
    assert (first.first_lsn, second.first_lsn) == (1, sealed_at)
    await flush(engine, wal_dir, wal_id, writer)
    done = await housekeep(engine, wal_dir, wal_id, tmp_path, writer, max_segment_age=3600)
    assert done.repaired["removed"] == [first.path.name]
    assert not done.idle

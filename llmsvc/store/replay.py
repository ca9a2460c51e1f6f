"""Replaying a WAL into the store: the one path of boot, restore and the supervisor.

A boot replays its own WAL from the store's checkpoint before it takes new
records; a restore rewinds the checkpoint to the backup's and replays from
there; the supervisor replays the WALs no worker owns. All of them start a
flusher at the checkpoint and drain the WAL with it, and all report the
same: how much was replayed, and the LSNs the WAL no longer holds.
"""

from __future__ import annotations

import asyncio
from dataclasses import replace
from pathlib import Path
from typing import Any

from sqlalchemy.ext.asyncio import AsyncEngine

from llmsvc.config import FlushPolicy, WalPolicy
from llmsvc.logs import logger
from llmsvc.store.flusher import Flusher, load_checkpoint
from llmsvc.wal import WalWriter, instance_id, list_segments, read_instance_id

log = logger(__name__)


async def replay_wal(
    engine: AsyncEngine, wal_dir: Path, phase: str, wal: WalPolicy, flush: FlushPolicy
) -> dict[str, Any]:
    """Replay the WAL in `wal_dir`, held by no daemon, from the store's checkpoint.

    Each flush waits for the database as long as it takes (no `timeout`): nothing is
    served meanwhile, and a bound would only cut a slow batch off to read it again.
    """
    if read_instance_id(wal_dir) is None:
        return {"replayed": 0, "checkpoint": 0}
    instance = instance_id(wal_dir)
    checkpoint = await load_checkpoint(engine, instance)
    writer = WalWriter(wal_dir, instance, wal)
    repairs = writer.open(asyncio.get_running_loop(), lambda exc: None, checkpoint)
    flusher = Flusher(engine, wal_dir, instance, lambda: writer.end, replace(flush, timeout=None))
    try:
        result = await replay(flusher, phase)
    finally:
        await flusher.close()
        await writer.close()
    if not repairs.clean:
        result["wal_repairs"] = repairs.as_dict()
    return result


async def replay(flusher: Flusher, phase: str, checkpoint: int | None = None) -> dict[str, Any]:
    """Start `flusher` at `checkpoint` (default: the store's) and drain the WAL into the store.

    Returns what was replayed and, if the WAL no longer reaches back to the
    checkpoint (an older backup restored), the LSNs that are gone. `phase`
    (boot, restore, …) heads the log lines.
    """
    segments = list_segments(flusher.wal_dir)
    await flusher.start(checkpoint)
    checkpoint = flusher.checkpoint
    first = segments[0].first_lsn if segments else checkpoint + 1
    await flusher.drain(within=float("inf"))
    result: dict[str, Any] = {
        "replayed": flusher.checkpoint - checkpoint,
        "checkpoint": flusher.checkpoint,
    }
    if first > checkpoint + 1:
        result["missing"] = [checkpoint + 1, first - 1]
        log.error(
            "%s: WAL records %d..%d are gone (removed before this backup was the newest): "
            "the store holds the backup and what the WAL kept after them",
            phase,
            checkpoint + 1,
            first - 1,
        )
    log.info("%s: wal replayed", phase, records=result["replayed"], checkpoint=flusher.checkpoint)
    return result

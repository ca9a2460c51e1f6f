"""WAL fixtures: a real directory, its instance id, writers that are always closed."""

from __future__ import annotations

import uuid
from pathlib import Path

import pytest
from wal_records import ReadLog

from llmsvc.wal.reader import Position, WalReader


@pytest.fixture
def read_log(wal_dir: Path, wal_id: uuid.UUID) -> ReadLog:
    """Every record from `start` on, read with a fresh WalReader as the flusher would."""

    async def _read(start: int = 1, end: Position | None = None) -> list[tuple[int, bytes]]:
        reader = WalReader(wal_dir, wal_id)
        try:
            await reader.seek(start)
            records: list[tuple[int, bytes]] = []
            while batch := await reader.read(end, 1000):
                records += batch
            return records
        finally:
            await reader.close()

    return _read

"""WAL fixtures: a real directory, its instance id, writers that are always closed."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import pytest
from wal_records import OpenWriter, ReadLog

from llmsvc.errors import WalFatal
from llmsvc.wal.reader import Position, WalReader
from llmsvc.wal.segment import instance_id
from llmsvc.wal.writer import WalWriter


@pytest.fixture
def wal_dir(tmp_path: Path) -> Path:
    path = tmp_path / "wal"
    path.mkdir()
    return path


@pytest.fixture
def wal_id(wal_dir: Path) -> uuid.UUID:
    return instance_id(wal_dir)


@pytest.fixture
async def open_writer(wal_dir: Path, wal_id: uuid.UUID) -> AsyncIterator[OpenWriter]:
    """Opens writers on `wal_dir`; a fatal error nobody asked for fails the test."""
    writers: list[WalWriter] = []
    unexpected: list[WalFatal] = []

    def _open(*, on_fatal: Callable[[WalFatal], None] | None = None, **settings: Any) -> WalWriter:
        writer = WalWriter(wal_dir, wal_id, **settings)
        writer.open(asyncio.get_running_loop(), on_fatal or unexpected.append)
        writers.append(writer)
        return writer

    yield _open
    for writer in writers:
        await writer.close()  # closing twice is harmless
    assert not unexpected


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

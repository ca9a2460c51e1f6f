"""Store fixtures: a migrated engine per backend, a real WAL, writers and flushers that close."""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
from policies import flush_policy
from sqlalchemy.ext.asyncio import AsyncEngine
from store_streams import MakeFlusher, OpenWriter

from llmsvc.gateway.journal import Journal
from llmsvc.store.flusher import Flusher
from llmsvc.wal.writer import WalWriter


@pytest.fixture
def writer_settings() -> dict[str, Any]:
    """WalWriter settings for `writer`; a test overrides them with parametrize."""
    return {}


@pytest.fixture
async def writer(open_writer: OpenWriter, writer_settings: dict[str, Any]) -> WalWriter:
    return open_writer(**writer_settings)


@pytest.fixture
def journal(writer: WalWriter) -> Journal:
    return Journal(writer)


@pytest.fixture
async def make_flusher(
    engine: AsyncEngine, wal_dir: Path, wal_id: uuid.UUID, writer: WalWriter
) -> AsyncIterator[MakeFlusher]:
    """Flushers following `writer` into `engine`; started by the test, closed at teardown."""
    flushers: list[Flusher] = []

    def _make(**changes: Any) -> Flusher:
        changes.setdefault("interval", 0.01)
        flusher = Flusher(engine, wal_dir, wal_id, lambda: writer.end, flush_policy(**changes))
        flushers.append(flusher)
        return flusher

    yield _make
    for flusher in flushers:
        await flusher.close()

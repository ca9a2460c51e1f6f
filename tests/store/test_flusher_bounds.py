"""The flusher's bounds: a flush given up, or cancelled, at any point loses no record."""

from __future__ import annotations

import time
import uuid
from datetime import UTC, datetime
from typing import Any

import pytest
from sqlalchemy.ext.asyncio import AsyncEngine
from store_streams import EPOCH, MakeFlusher, Stream, assert_stored, dump, texts

from llmsvc.gateway.journal import Journal
from llmsvc.store import flusher as flusher_module


async def test_a_flush_cut_off_while_it_builds_its_batch_loses_no_record(
    engine: AsyncEngine,
    journal: Journal,
    make_flusher: MakeFlusher,
    wal_id: uuid.UUID,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The records were read from the WAL, not yet held as a batch: the next flush reads them."""
    stream = Stream(texts(6, "cut"))
    await stream.journal_whole(journal)
    flusher = make_flusher(timeout=10)
    await flusher.start()
    real = flusher_module.build_batch

    def slow(*args: Any) -> Any:
        time.sleep(0.5)  # a big batch on a busy host
        return real(*args)

    monkeypatch.setattr(flusher_module, "build_batch", slow)
    with pytest.raises(TimeoutError):
        await flusher._flush(0.1)
    monkeypatch.setattr(flusher_module, "build_batch", real)

    assert await flusher.drain(10)
    assert_stored(await dump(engine), stream, wal_id, EPOCH, datetime.now(UTC))

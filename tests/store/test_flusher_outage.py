"""A PostgreSQL outage while the flusher runs: records wait in the WAL, then arrive once.

Uses a cluster of its own, so stopping it disturbs no other test.
"""

from __future__ import annotations

import asyncio
from datetime import UTC, datetime
from pathlib import Path

import pytest
from policies import flush_policy, wal_policy
from postgres import PostgresCluster, sqlalchemy_url
from store_streams import (
    EPOCH,
    Stream,
    assert_stored,
    dump,
    stored_checkpoint,
    texts,
    token_keys,
    wait_for,
)

from llmsvc.gateway.journal import Journal
from llmsvc.store.engine import create_engine, upgrade_to_head
from llmsvc.store.flusher import Flusher
from llmsvc.wal.segment import instance_id
from llmsvc.wal.writer import WalWriter


@pytest.mark.timeout(60)
async def test_records_journaled_during_a_postgres_outage_arrive_once_after_it(
    own_cluster: PostgresCluster, tmp_path: Path
) -> None:
    engine = create_engine(sqlalchemy_url(await own_cluster.create_database("llmsvc")))
    wal_dir = tmp_path / "wal"
    wal_dir.mkdir()
    wal_id = instance_id(wal_dir)
    writer = WalWriter(wal_dir, wal_id, wal_policy())
    fatal: list[BaseException] = []
    writer.open(asyncio.get_running_loop(), fatal.append)
    journal = Journal(writer)
    flusher = Flusher(engine, wal_dir, wal_id, lambda: writer.end, flush_policy(interval=0.02))
    task: asyncio.Task[None] | None = None
    try:
        await upgrade_to_head(engine)
        await flusher.start()
        task = asyncio.create_task(flusher.run())

        before = Stream(texts(10, "before"))
        await before.journal_whole(journal)
        await wait_for(lambda: flusher.caught_up, 5, "caught up before the outage")

        await asyncio.to_thread(own_cluster.stop, "immediate")
        during = Stream(texts(30, "during"))
        during.start(journal)
        await asyncio.shield(during.tokens(journal, 0, 10))
        await wait_for(lambda: not flusher.database_ok, 5, "reporting the outage")
        await asyncio.shield(during.tokens(journal, 10))
        await asyncio.shield(during.end(journal))
        after = Stream(texts(7, "after"))
        await after.journal_whole(journal)
        await asyncio.sleep(0.3)  # the flusher keeps retrying meanwhile
        assert not task.done()
        assert not flusher.caught_up

        await asyncio.to_thread(own_cluster.start)
        await wait_for(lambda: flusher.caught_up, 10, "caught up after the outage")
        assert flusher.database_ok
        flusher.stop()
        await asyncio.wait_for(task, 5)

        keys = await token_keys(engine)
        assert len(keys) == len(set(keys)) == 47
        rows = await dump(engine)
        for stream in (before, during, after):
            assert_stored(rows, stream, wal_id, EPOCH, datetime.now(UTC))
        assert await stored_checkpoint(engine, wal_id) == writer.end.lsn - 1
    finally:
        flusher.stop()
        if task is not None and not task.done():
            task.cancel()
        await flusher.close()
        await writer.close()
        await engine.dispose()
    assert not fatal

"""The PostgreSQL test fixtures themselves: real connections, fresh databases, outages.

If these fail, every storage test's result is suspect, so they check the plumbing directly.
"""

from __future__ import annotations

import aiosqlite
import asyncpg
import pytest
from postgres import PostgresCluster, asyncpg_url

_seen_databases: list[str] = []


async def _connect(url: str) -> asyncpg.Connection:
    return await asyncpg.connect(asyncpg_url(url), timeout=10)


async def _check_fresh_database(postgres_url: str) -> None:
    """The database is reachable, empty, and different from every earlier test's."""
    conn = await _connect(postgres_url)
    try:
        assert await conn.fetchval("SELECT 1") == 1
        name = await conn.fetchval("SELECT current_database()")
        tables = await conn.fetchval(
            "SELECT count(*) FROM information_schema.tables WHERE table_schema = 'public'"
        )
        assert tables == 0
        assert name not in _seen_databases
        _seen_databases.append(name)
        # Leave a table behind: the next test must not see it.
        await conn.execute("CREATE TABLE leftover (id int)")
    finally:
        await conn.close()


async def test_fresh_database_accepts_connection(postgres_url: str) -> None:
    assert postgres_url.startswith("postgresql+asyncpg://")
    await _check_fresh_database(postgres_url)


async def test_each_test_gets_its_own_empty_database(postgres_url: str) -> None:
    await _check_fresh_database(postgres_url)
    assert len(_seen_databases) >= 1


async def test_database_url_covers_both_backends(database_url: str) -> None:
    if database_url.startswith("sqlite+aiosqlite:///"):
        async with aiosqlite.connect(database_url.removeprefix("sqlite+aiosqlite:///")) as db:
            assert list(await db.execute_fetchall("SELECT 1")) == [(1,)]
    else:
        assert database_url.startswith("postgresql+asyncpg://")
        conn = await _connect(database_url)
        try:
            assert await conn.fetchval("SELECT 1") == 1
        finally:
            await conn.close()


async def test_cluster_can_be_stopped_and_started_again(pg_cluster: object) -> None:
    """Outage tests rely on this: same URL, refused while down, data back after restart.

    Requests ``pg_cluster`` only so that the explicit opt-out skips this test too.
    """
    with PostgresCluster() as cluster:
        url = await cluster.create_database("outage")
        conn = await _connect(url)
        await conn.execute("CREATE TABLE kept (id int); INSERT INTO kept VALUES (7)")
        await conn.close()

        cluster.stop("immediate")
        with pytest.raises((OSError, asyncpg.PostgresError)):
            await _connect(url)

        cluster.start()
        conn = await _connect(url)
        try:
            assert await conn.fetchval("SELECT id FROM kept") == 7
        finally:
            await conn.close()
    assert cluster.base_dir is None

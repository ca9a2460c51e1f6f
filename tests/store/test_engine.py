"""The daemon's connections: bounded on both ends, and migrations one process at a time."""

from __future__ import annotations

import asyncio
import socket
import threading
from pathlib import Path
from typing import Any

import pytest
import sqlalchemy as sa
from alembic import command

from llmsvc.store.engine import create_engine, schema_revision, upgrade_to_head
from llmsvc.store.schema import wal_checkpoints


async def test_a_bounded_session_has_keepalives_and_timeouts_on_both_ends(
    postgres_url: str,
) -> None:
    """TCP keepalives are set on asyncpg's socket through a private name: an upgrade fails here.

    The server's statement_timeout is just under the client's bound, so it ends a statement first.
    """
    bounded = create_engine(postgres_url, timeout=4, per_command=True)
    maintenance = create_engine(postgres_url, timeout=4)
    try:
        async with bounded.connect() as conn:
            raw = (await conn.get_raw_connection()).driver_connection
            sock = raw._transport.get_extra_info("socket")  # type: ignore[union-attr]
            options = [
                sock.getsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE),
                sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPIDLE),
                sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_USER_TIMEOUT),
            ]
            server = [
                await conn.scalar(sa.text(f"SHOW {name}"))
                for name in ("statement_timeout", "tcp_keepalives_idle", "tcp_keepalives_count")
            ]
            with pytest.raises(sa.exc.DBAPIError, match="statement timeout"):
                await conn.execute(sa.text("SELECT pg_sleep(10)"))  # the server gives up first
        async with maintenance.connect() as conn:
            unbounded = await conn.scalar(sa.text("SHOW statement_timeout"))
    finally:
        await bounded.dispose()
        await maintenance.dispose()
    assert options[0] != 0
    assert options[1:] == [2, 4000]
    assert server == ["3600ms", "2", "3"]
    assert unbounded == "0"


async def test_migrations_started_together_run_one_after_the_other(database_url: str) -> None:
    """Workers migrate at once when they boot together: the lock makes the second find head."""
    engines = [create_engine(database_url) for _ in range(3)]
    try:
        await asyncio.gather(*(upgrade_to_head(engine) for engine in engines))
        current, head = await schema_revision(engines[0])
    finally:
        for engine in engines:
            await engine.dispose()
    assert current == head


async def test_a_migration_cut_off_half_way_leaves_nothing_and_the_next_one_runs(
    database_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A worker killed while it migrates must not leave half a schema behind (SQLite too)."""
    real = command.upgrade

    def half_then_die(config: Any, revision: str) -> None:
        real(config, "0001")
        raise RuntimeError("killed half-way")

    engine = create_engine(database_url)
    try:
        monkeypatch.setattr(command, "upgrade", half_then_die)
        with pytest.raises(RuntimeError, match="half-way"):
            await upgrade_to_head(engine)
        async with engine.connect() as conn:
            left = await conn.run_sync(lambda sync: sa.inspect(sync).get_table_names())
        monkeypatch.setattr(command, "upgrade", real)
        await upgrade_to_head(engine)
        current, head = await schema_revision(engine)
    finally:
        await engine.dispose()
    assert left == []
    assert current == head


async def test_a_reading_engine_changes_nothing(database_url: str) -> None:
    """The CLI's read-only commands open the store so that a bug in one cannot write."""
    engine = create_engine(database_url)
    reader = create_engine(database_url, access="read")
    try:
        await upgrade_to_head(engine)
        assert (await schema_revision(reader))[0] is not None
        with pytest.raises(sa.exc.DBAPIError, match=r"read-?only"):
            async with reader.begin() as conn:
                await conn.execute(sa.delete(wal_checkpoints))
    finally:
        await engine.dispose()
        await reader.dispose()


async def test_only_create_makes_a_sqlite_store(tmp_path: Path) -> None:
    """A command pointed at the wrong path must not leave an empty database (or folder) there."""
    missing = tmp_path / "elsewhere" / "llmsvc.db"
    before = set(threading.enumerate())
    for access in ("read", "write"):
        absent = create_engine(f"sqlite+aiosqlite:///{missing}", access=access)
        try:
            with pytest.raises(sa.exc.OperationalError, match="unable to open database file"):
                async with absent.connect():
                    pass
        finally:
            await absent.dispose()
    # aiosqlite's thread of a connection that failed to open outlives it: let it end while
    # this loop runs, or it posts to a closed loop and fails the next test.
    for thread in set(threading.enumerate()) - before:
        await asyncio.to_thread(thread.join, 10)
    assert not missing.parent.exists()

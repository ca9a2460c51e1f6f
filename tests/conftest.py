"""Shared fixtures: a real PostgreSQL (see tests/postgres.py) and a throwaway SQLite file.

Logic lives in tests/postgres.py; this file only wires it into pytest.
"""

from __future__ import annotations

import asyncio
import os
import uuid
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path
from typing import Any

import daemon_process
import pytest
from policies import wal_policy
from postgres import (
    SKIP_REASON,
    PostgresCluster,
    PostgresServer,
    describe_source,
    opted_out,
    session_server,
    sqlalchemy_url,
    unique_dbname,
)
from sqlalchemy.ext.asyncio import AsyncEngine

from llmsvc.errors import WalFatal
from llmsvc.store.engine import create_engine, upgrade_to_head
from llmsvc.wal.segment import instance_id
from llmsvc.wal.writer import WalWriter

OpenWriter = Callable[..., WalWriter]


def pytest_report_header() -> str:
    """Say up front which PostgreSQL the run uses, so a skip or an error is never a surprise."""
    return f"postgres: {describe_source()}"


@pytest.fixture(scope="session")
def pg_cluster() -> Iterator[PostgresServer]:
    """The session's PostgreSQL server; skipped only on the explicit opt-out."""
    if opted_out():
        pytest.skip(SKIP_REASON)
    server = session_server()
    try:
        yield server
    finally:
        if isinstance(server, PostgresCluster):
            server.cleanup()


@pytest.fixture
async def postgres_url(pg_cluster: PostgresServer) -> AsyncIterator[str]:
    """A fresh, empty database per test (``postgresql+asyncpg://``), dropped afterwards."""
    name = unique_dbname()
    url = await pg_cluster.create_database(name)
    try:
        yield sqlalchemy_url(url)
    finally:
        await pg_cluster.drop_database(name)


@pytest.fixture
def sqlite_url(tmp_path: Path) -> str:
    """A fresh SQLite file per test (``sqlite+aiosqlite:///``)."""
    return f"sqlite+aiosqlite:///{tmp_path / 'llmsvc.db'}"


@pytest.fixture(params=["sqlite", "postgresql"])
def database_url(request: pytest.FixtureRequest) -> str:
    """Runs a test once per supported backend, each with a fresh database."""
    fixture = "sqlite_url" if request.param == "sqlite" else "postgres_url"
    return str(request.getfixturevalue(fixture))


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

    def _open(*, on_fatal: Callable[[WalFatal], None] | None = None, **changes: Any) -> WalWriter:
        writer = WalWriter(wal_dir, wal_id, wal_policy(**changes))
        writer.open(asyncio.get_running_loop(), on_fatal or unexpected.append)
        writers.append(writer)
        return writer

    yield _open
    for writer in writers:
        await writer.close()  # closing twice is harmless
    assert not unexpected


@pytest.fixture
def own_cluster() -> Iterator[PostgresCluster]:
    """A cluster of the test's own, to stop and start (outages) without touching others."""
    if opted_out():
        pytest.skip(SKIP_REASON)
    cluster = PostgresCluster()
    cluster.start()
    try:
        yield cluster
    finally:
        cluster.cleanup()


@pytest.fixture
def flush_process(monkeypatch: pytest.MonkeyPatch) -> None:
    """The test's daemons write their batches through the flush process (`daemon_env`)."""
    monkeypatch.setattr(daemon_process, "FLUSH_PROCESS", True)


@pytest.fixture
def umask_022() -> Iterator[None]:
    """The usual umask (group and others may read), so privacy cannot come from the caller's.

    Child processes started meanwhile inherit it.
    """
    previous = os.umask(0o022)
    try:
        yield
    finally:
        os.umask(previous)


@pytest.hookimpl(wrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo[None]) -> Any:
    """Each phase's report on its test item (`item.outcome_call`), for fixtures that keep
    evidence of a failure (the browser tests' screenshots)."""
    report = yield
    setattr(item, f"outcome_{report.when}", report)
    return report


@pytest.fixture
async def engine(database_url: str) -> AsyncIterator[AsyncEngine]:
    """A store migrated to head, on SQLite and on PostgreSQL."""
    engine = create_engine(database_url)
    try:
        await upgrade_to_head(engine)
        yield engine
    finally:
        await engine.dispose()

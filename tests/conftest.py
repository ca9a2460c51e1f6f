"""Shared fixtures: a real PostgreSQL (see tests/postgres.py) and a throwaway SQLite file.

Logic lives in tests/postgres.py; this file only wires it into pytest.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest
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

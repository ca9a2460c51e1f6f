"""Rows written through the driver, on SQLite and PostgreSQL: the values SQLAlchemy itself
would store."""

from __future__ import annotations

import contextlib
import random
import uuid
from collections.abc import AsyncIterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import orjson
import pytest
import sqlalchemy as sa
from postgres import sqlalchemy_url, unique_dbname
from sqlalchemy.dialects import sqlite
from sqlalchemy.ext.asyncio import AsyncEngine

from llmsvc.store.batch import _sqlite_rows, build_batch
from llmsvc.store.engine import create_engine, upgrade_to_head
from llmsvc.store.flusher import END_COLUMNS, KEPT_IF_NONE, write_batch
from llmsvc.store.schema import Timestamp, llm_attempts, llm_requests
from llmsvc.wal import RecordType


def test_each_tokens_time_is_the_text_sqlalchemy_stores_for_it() -> None:
    dialect = sqlite.dialect()
    as_stored = Timestamp.dialect_impl(dialect).bind_processor(dialect)
    assert as_stored is not None
    us = 1_700_000_000_999_998
    tokens = [(bytes(16), seq, "t", us + seq) for seq in range(3)]  # .999998 to the next second
    rng = random.Random(7)
    for seq in range(3, 5_000):  # same read, next µs, across seconds, a paced gap, a long wait
        us += rng.choice([0, 1, 1, 999_999, 20_000, 3_600_000_000])
        tokens.append((bytes(16), seq, "t", us))

    rows = _sqlite_rows(tokens)

    expected = [as_stored(datetime.fromtimestamp(t[3] / 1e6, UTC)) for t in tokens]
    assert [row[3] for row in rows] == expected
    assert [row[3][-7:] for row in rows[:3]] == [".999998", ".999999", ".000000"]


@pytest.fixture(params=["sqlite", "postgresql"])
def dialect(request: pytest.FixtureRequest) -> str:
    if request.param == "postgresql":
        request.getfixturevalue("pg_cluster")  # started here, outside the test's event loop
    return str(request.param)


async def test_requests_attempts_and_their_ends_are_stored_as_sqlalchemy_stores_them(
    dialect: str, tmp_path: Path, request: pytest.FixtureRequest
) -> None:
    """The flusher writes these rows through the driver, formed as SQLAlchemy binds them:
    every value of every column is stored as SQLAlchemy itself would store it."""
    instance = uuid.uuid4()
    whole, later, stand_in = (str(uuid.uuid4()) for _ in range(3))
    attempts = {r: str(uuid.uuid4()) for r in (whole, later, stand_in)}
    ts = 1_700_000_000_000_000
    first = [
        _start(whole, ts, key_id=str(uuid.uuid4()), team_id=str(uuid.uuid4()), user="ü",
               metadata={"a": [1, None, "é\u2028"]}, session_id="s", environment="prod",
               version="v1", api="responses"),
        _attempt(attempts[whole], whole, ts + 1),
        _attempt_end(attempts[whole], ts + 999_999, status="completed", first_token_ts=ts + 2),
        _request_end(whole, ts + 1_000_000, status="completed", cost=0.25, prompt_tokens=3),
        _start(later, ts + 5),
        _attempt(attempts[later], later, ts + 6),
        _attempt(attempts[stand_in], stand_in, ts + 7),  # its request's start is lost
    ]  # fmt: skip
    second = [
        _attempt_end(attempts[later], ts + 2_000_000, status="failed", http_status=502),
        _request_end(later, ts + 2_000_001, status="failed", error="upstream said 502"),
        _request_end(stand_in, ts + 2_000_002, status="completed"),  # keeps the stand-in's error
    ]
    batches = [
        build_batch(first, 7, instance, dialect),
        build_batch(second, 10, instance, dialect),
    ]

    async with _stores(dialect, tmp_path, request) as (via_driver, by_sqlalchemy):
        for batch in batches:
            await write_batch(via_driver, batch, instance)
            async with by_sqlalchemy.begin() as conn:  # what write_batch did through SQLAlchemy
                for table, rows in (
                    (llm_requests, batch.requests),
                    (llm_requests, batch.stand_ins),
                    (llm_attempts, batch.attempts),
                ):
                    if rows:
                        await conn.execute(sa.insert(table), list(rows.values()))
                for table, ends in (
                    (llm_attempts, batch.attempt_ends),
                    (llm_requests, batch.request_ends),
                ):
                    if ends:
                        await conn.execute(_update_by_key(table), ends)
        for table in (llm_requests, llm_attempts):
            stored = await _stored(via_driver, table)
            assert len(stored) == 3
            assert stored == await _stored(by_sqlalchemy, table)
        errors = [str(row) for row in await _stored(via_driver, llm_requests)]
        assert any("upstream said 502" in e for e in errors)
        assert any("start record was lost" in e for e in errors)


def _update_by_key(table: sa.Table) -> Any:
    """The ends' UPDATE as SQLAlchemy Core writes it: the reference the driver's must match."""
    kept = KEPT_IF_NONE.get(table.name)
    return (
        sa.update(table)
        .where(table.c.id == sa.bindparam("key"))
        .values(
            {
                name: sa.func.coalesce(sa.bindparam(name), table.c[name])
                if name == kept
                else sa.bindparam(name)
                for name in END_COLUMNS[table.name]
            }
        )
    )


@contextlib.asynccontextmanager
async def _stores(
    dialect: str, tmp_path: Path, request: pytest.FixtureRequest
) -> AsyncIterator[tuple[AsyncEngine, AsyncEngine]]:
    """Two empty stores of the dialect, migrated to head."""
    names = ("driver", "sqlalchemy")
    if dialect == "sqlite":
        urls = [f"sqlite+aiosqlite:///{tmp_path / name}.db" for name in names]
    else:
        cluster = request.getfixturevalue("pg_cluster")
        dbs = [unique_dbname() for _ in names]
        urls = [sqlalchemy_url(await cluster.create_database(db)) for db in dbs]
    engines = [create_engine(url, access="create") for url in urls]
    try:
        for engine in engines:
            await upgrade_to_head(engine)
        yield engines[0], engines[1]
    finally:
        for engine in engines:
            await engine.dispose()
        if dialect != "sqlite":
            for db in dbs:
                await cluster.drop_database(db)


def _start(request_id: str, ts: int, **fields: Any) -> tuple[int, bytes]:
    body = {"id": request_id, "correlation_id": "c-1", "model": "m", "stream": True, "ts": ts}
    body |= {"messages": [{"role": "user", "content": "Grüß \x00 🗼"}], "params": {"n": None}}
    return RecordType.REQUEST_START, orjson.dumps(body | fields)


def _attempt(attempt_id: str, request_id: str, ts: int) -> tuple[int, bytes]:
    body = {"id": attempt_id, "request_id": request_id, "attempt_no": 1, "provider": "p",
            "model": "m", "ts": ts}  # fmt: skip
    return RecordType.ATTEMPT_START, orjson.dumps(body)


def _attempt_end(attempt_id: str, ts: int, **fields: Any) -> tuple[int, bytes]:
    return RecordType.ATTEMPT_END, orjson.dumps({"id": attempt_id, "ts": ts, **fields})


def _request_end(request_id: str, ts: int, **fields: Any) -> tuple[int, bytes]:
    return RecordType.REQUEST_END, orjson.dumps({"id": request_id, "ts": ts, **fields})


async def _stored(engine: AsyncEngine, table: sa.Table) -> list[Any]:
    """Every row's values as the database writes them as text: SQLite's quote() of each
    column (type and bytes), PostgreSQL's row_to_json of the row."""
    if engine.dialect.name == "sqlite":
        select = ", ".join(f'quote("{column.name}")' for column in table.c)
        query = f'SELECT {select} FROM "{table.name}" ORDER BY id'
    else:
        query = f'SELECT row_to_json(t)::text FROM "{table.name}" t ORDER BY id'
    async with engine.connect() as conn:
        return [tuple(row) for row in await conn.exec_driver_sql(query)]

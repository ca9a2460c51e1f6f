"""Rows on SQLite, written through the driver: the values SQLAlchemy itself would store."""

from __future__ import annotations

import random
import sqlite3
import uuid
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import orjson
import sqlalchemy as sa
from sqlalchemy.dialects import sqlite
from sqlalchemy.ext.asyncio import AsyncEngine

from llmsvc.store.batch import _sqlite_rows, build_batch
from llmsvc.store.engine import create_engine, upgrade_to_head
from llmsvc.store.flusher import _END_UPDATES, write_batch
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


async def test_requests_attempts_and_their_ends_are_stored_on_sqlite_as_sqlalchemy_stores_them(
    tmp_path: Path,
) -> None:
    """The flusher writes these rows through the driver on SQLite, formed as SQLAlchemy binds
    them: every value of every column is stored as SQLAlchemy itself would store it."""
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
        build_batch(first, 7, instance, "sqlite"),
        build_batch(second, 10, instance, "sqlite"),
    ]

    via_driver = await _sqlite_engine(tmp_path / "driver.db")
    by_sqlalchemy = await _sqlite_engine(tmp_path / "sqlalchemy.db")
    try:
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
                        await conn.execute(_END_UPDATES[table.name], ends)
    finally:
        await via_driver.dispose()
        await by_sqlalchemy.dispose()

    for table in (llm_requests, llm_attempts):
        stored = _quoted(tmp_path / "driver.db", table)
        assert len(stored) == 3
        assert stored == _quoted(tmp_path / "sqlalchemy.db", table)
    error = _quoted(tmp_path / "driver.db", llm_requests, "error")
    assert "'upstream said 502'" in error
    assert any("start record was lost" in e for e in error)


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


async def _sqlite_engine(path: Path) -> AsyncEngine:
    engine = create_engine(f"sqlite+aiosqlite:///{path}", access="create")
    await upgrade_to_head(engine)
    return engine


def _quoted(path: Path, table: sa.Table, *columns: str) -> list[tuple[str, ...]] | list[str]:
    """Every row's values (or one column's) as SQLite's quote() gives them: type and bytes."""
    names = columns or tuple(table.c.keys())
    select = ", ".join(f'quote("{name}")' for name in names)
    with sqlite3.connect(path) as db:
        rows = db.execute(f'SELECT {select} FROM "{table.name}" ORDER BY id').fetchall()
    return [row[0] for row in rows] if columns else rows

"""The limiter reads nothing from the store while no caller it has seen has a rate or a budget.

On a real SQLite store; the reads are counted by wrapping the query the limiter shares through.
"""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
from sqlalchemy.ext.asyncio import AsyncEngine

from llmsvc import limits
from llmsvc.callers import Caller, Limits
from llmsvc.limits import Limiter
from llmsvc.store.engine import create_engine, upgrade_to_head


@pytest.fixture
async def engine(sqlite_url: str) -> AsyncIterator[AsyncEngine]:
    """A store migrated to head, disposed after the test."""
    engine = create_engine(sqlite_url)
    await upgrade_to_head(engine)
    try:
        yield engine
    finally:
        await engine.dispose()


@pytest.fixture
def reads(monkeypatch: pytest.MonkeyPatch) -> list[datetime]:
    """The `since` of every sharing query the limiter issues (the real query still runs)."""
    seen: list[datetime] = []
    real = limits.usage_since

    async def counted(engine: Any, instance_id: uuid.UUID, since: datetime) -> Any:
        seen.append(since)
        return await real(engine, instance_id, since)

    monkeypatch.setattr(limits, "usage_since", counted)
    return seen


async def test_no_sharing_query_while_no_caller_is_limited_and_one_once_a_limited_key_comes(
    engine: AsyncEngine, reads: list[datetime]
) -> None:
    limiter = Limiter(engine, uuid.uuid4())
    for _ in range(3):  # as with auth = "none": no caller at all
        await limiter.share()
    limiter.admit(Caller(uuid.uuid4(), "free"))  # a key without limits
    for _ in range(3):
        await limiter.share()
    assert reads == []
    limiter.admit(Caller(uuid.uuid4(), "limited", key_limits=Limits(rpm=600)))
    await limiter.share()
    assert len(reads) == 1


async def test_a_limited_key_in_the_key_table_is_shared_before_it_sends_a_request_here(
    engine: AsyncEngine, reads: list[datetime]
) -> None:
    # its first request here must find a bucket less what the other instances admitted
    limiter = Limiter(engine, uuid.uuid4(), known=lambda: True)
    await limiter.share()
    assert len(reads) == 1


async def test_a_limited_key_after_an_idle_spell_reads_the_last_minute_not_since_the_start(
    engine: AsyncEngine, reads: list[datetime]
) -> None:
    limiter = Limiter(engine, uuid.uuid4())
    await asyncio.sleep(1.5)
    await limiter.share()  # idle
    limiter.admit(Caller(uuid.uuid4(), "limited", key_limits=Limits(rpm=600)))
    before = datetime.now(UTC)
    await limiter.share()
    # From the start, the others' use since construction - 60 s would be read: the idle
    # spell's too, taken from a bucket that was full a minute before the read.
    assert reads
    assert reads[0] >= before - timedelta(seconds=60.5)

"""Retention on both databases, and PostgreSQL's daily token partitions."""

from __future__ import annotations

import uuid
from datetime import UTC, date, datetime, timedelta

import pytest
import sqlalchemy as sa
from sqlalchemy.ext.asyncio import AsyncEngine

from llmsvc.maintenance.retention import (
    create_partition,
    ensure_partitions,
    partition_days,
    partition_name,
    prune,
)
from llmsvc.store.schema import llm_attempts, llm_requests, llm_token_log

NOW = datetime.now(UTC)


def ago(days: float) -> datetime:
    return datetime.now(UTC) - timedelta(days=days)


async def add_request(
    engine: AsyncEngine, age_days: float, tokens: int, status: str = "completed"
) -> uuid.UUID:
    """A request created `age_days` ago with one attempt of `tokens` tokens; its id."""
    created = NOW - timedelta(days=age_days)
    request_id, attempt_id = uuid.uuid4(), uuid.uuid4()
    async with engine.begin() as conn:
        await conn.execute(
            sa.insert(llm_requests).values(
                id=request_id,
                instance_id=uuid.uuid4(),
                correlation_id="c-1",
                model="m",
                stream=True,
                status=status,
                messages=[],
                params={},
                created_at=created,
            )
        )
        await conn.execute(
            sa.insert(llm_attempts).values(
                id=attempt_id,
                request_id=request_id,
                attempt_no=1,
                provider="p",
                model="m",
                status=status,
                started_at=created,
            )
        )
        if tokens:
            await conn.execute(
                sa.insert(llm_token_log),
                [
                    {
                        "attempt_id": attempt_id,
                        "seq": seq,
                        "text": f"t{seq}",
                        "created_at": created + timedelta(seconds=seq),
                    }
                    for seq in range(tokens)
                ],
            )
    return request_id


async def contents(engine: AsyncEngine) -> tuple[set[uuid.UUID], int, int]:
    """Request ids, attempt count and token count left."""
    async with engine.connect() as conn:
        requests = set((await conn.scalars(sa.select(llm_requests.c.id))).all())
        attempts = await conn.scalar(sa.select(sa.func.count()).select_from(llm_attempts))
        tokens = await conn.scalar(sa.select(sa.func.count()).select_from(llm_token_log))
    return requests, int(attempts or 0), int(tokens or 0)


async def test_prune_removes_old_requests_with_their_attempts_and_tokens_in_batches(
    engine: AsyncEngine,
) -> None:
    old = [await add_request(engine, 200 + n, 5) for n in range(5)]
    never_ended = await add_request(engine, 300, 3, status="streaming")  # its daemon is gone
    recent = [await add_request(engine, 10, 4), await add_request(engine, 179, 2)]

    dry = await prune(engine, ago(180), ago(180), batch_requests=2, dry_run=True)

    assert (dry.found["requests"], dry.found["attempts"], dry.found["tokens"]) == (6, 6, 28)
    assert await contents(engine) == ({*old, never_ended, *recent}, 8, 34)

    result = await prune(engine, ago(180), ago(180), batch_requests=2)

    assert result.status == "ok"
    assert await contents(engine) == (set(recent), 2, 6)
    assert (result.repaired["requests"], result.repaired["attempts"]) == (6, 6)
    assert result.rows == 6 + 6 + 28
    again = await prune(engine, ago(180), ago(180), batch_requests=2)
    assert again.rows == 0


async def test_a_shorter_cut_off_removes_more(engine: AsyncEngine) -> None:
    recent = await add_request(engine, 1, 2)
    week_old = await add_request(engine, 8, 2)

    await prune(engine, ago(7), ago(180), batch_requests=100)

    assert (await contents(engine))[0] == {recent}
    assert week_old not in (await contents(engine))[0]


async def test_a_cut_off_of_now_removes_every_request_that_ended_and_none_still_open(
    engine: AsyncEngine,
) -> None:
    """`--older-than 0`: all that has ended goes; a stream in flight keeps its rows."""
    ended = [
        await add_request(engine, 0.0001, 2),
        await add_request(engine, 0.1, 2, status="failed"),
        await add_request(engine, 0.2, 0, status="interrupted"),
    ]
    in_flight = await add_request(engine, 0.0001, 3, status="streaming")
    abandoned = await add_request(engine, 200, 3, status="streaming")  # past retention_days

    dry = await prune(engine, ago(0), ago(180), batch_requests=2, dry_run=True)
    result = await prune(engine, ago(0), ago(180), batch_requests=2)

    assert (dry.found["requests"], dry.found["still_open"]) == (4, 1)
    assert await contents(engine) == ({in_flight}, 1, 3)
    assert {*ended, abandoned}.isdisjoint((await contents(engine))[0])
    assert result.repaired["requests"] == 4


def _days_ago(n: int) -> date:
    return (NOW - timedelta(days=n)).date()


@pytest.mark.parametrize("database_url", ["postgresql"], indirect=True)
async def test_partitions_are_created_ahead_and_dropped_whole_past_the_cut_off(
    engine: AsyncEngine,
) -> None:
    async with engine.begin() as conn:
        for n in (200, 190, 181, 180, 179):  # days a daemon running then created ahead
            await create_partition(conn, _days_ago(n))
    old = await add_request(engine, 200, 3)
    straddling = await add_request(engine, 180.5, 3)  # tokens in the cut-off day's partition
    recent = await add_request(engine, 179, 3)
    async with engine.begin() as conn:  # a token that fell into the default partition
        await conn.exec_driver_sql("DROP TABLE " + partition_name(_days_ago(190)))
    lonely = await add_request(engine, 190, 2)
    # Days are counted from NOW, as the partitions and requests above were; the migration's
    # today is the clock's, a day later if midnight passed since NOW (seen in CI).
    async with engine.connect() as conn:
        made = max(await partition_days(conn))  # by the migration: its today's and 14 more
    cutoff = NOW - timedelta(days=180)

    created = await ensure_partitions(engine, 20)
    result = await prune(engine, cutoff, cutoff, batch_requests=10)

    assert created == [partition_name(made + timedelta(days=n)) for n in range(1, 7)]
    assert await ensure_partitions(engine, 20) == []
    async with engine.connect() as conn:
        days = await partition_days(conn)
        default_rows = await conn.scalar(sa.text("SELECT count(*) FROM llm_token_log_default"))
    cut_day = (NOW - timedelta(days=180)).date()
    assert [d for d in days if d < cut_day] == []  # whole days before the cut-off: dropped
    assert cut_day in days
    assert _days_ago(179) in days
    assert result.repaired["partitions_dropped"] == [
        partition_name(_days_ago(n)) for n in (200, 181)
    ]
    assert default_rows == 0
    assert await contents(engine) == ({recent}, 1, 3)
    assert {old, straddling, lonely}.isdisjoint((await contents(engine))[0])


@pytest.mark.parametrize("database_url", ["sqlite"], indirect=True)
async def test_sqlite_has_no_partitions_to_create(engine: AsyncEngine) -> None:
    assert await ensure_partitions(engine, 14) == []


@pytest.mark.parametrize("database_url", ["postgresql"], indirect=True)
async def test_a_partition_holding_tokens_of_a_request_still_open_is_not_dropped(
    engine: AsyncEngine,
) -> None:
    async with engine.begin() as conn:
        for n in (5, 3):
            await create_partition(conn, _days_ago(n))
    ended = await add_request(engine, 5, 3)
    still_open = await add_request(engine, 3, 4, status="streaming")  # not yet past retention

    result = await prune(engine, ago(0), ago(180), batch_requests=10)

    assert result.repaired["partitions_dropped"] == [partition_name(_days_ago(5))]
    async with engine.connect() as conn:
        assert _days_ago(3) in await partition_days(conn)
    assert await contents(engine) == ({still_open}, 1, 4)
    assert ended not in (await contents(engine))[0]

"""The consistency check's SQL: token holes, counts that disagree, open requests, the refill.

What the rows mean, and what is a problem, is `maintenance.consistency`'s.
"""

from __future__ import annotations

import uuid

import sqlalchemy as sa
from sqlalchemy.ext.asyncio import AsyncEngine

from llmsvc.store.batch import TOKEN_ROWS, Token
from llmsvc.store.flusher import TOKEN_WRITERS
from llmsvc.store.schema import llm_attempts, llm_requests, llm_token_log


async def seq_holes(engine: AsyncEngine) -> list[tuple[uuid.UUID, int | None, int]]:
    """(attempt, seq before, seq) wherever a seq does not follow the one before it (LAG);
    the seq before is None when an attempt's first stored seq is not 0."""
    seq = llm_token_log.c.seq
    ordered = sa.select(
        llm_token_log.c.attempt_id,
        seq,
        sa.func.lag(seq).over(partition_by=llm_token_log.c.attempt_id, order_by=seq).label("prev"),
    ).subquery()
    holes = sa.select(ordered.c.attempt_id, ordered.c.prev, ordered.c.seq).where(
        sa.or_(
            sa.and_(ordered.c.prev.is_(None), ordered.c.seq > 0),
            ordered.c.seq - ordered.c.prev > 1,
        )
    )
    async with engine.connect() as conn:
        return [(attempt_id, prev, after) for attempt_id, prev, after in await conn.execute(holes)]


async def count_mismatches(
    engine: AsyncEngine,
) -> list[tuple[uuid.UUID, int, int, int | None]]:
    """(attempt, recorded count, stored rows, last stored seq) of each ended attempt whose
    stored token rows differ from the count it recorded."""
    stored = sa.func.count(llm_token_log.c.seq)
    query = (
        sa.select(
            llm_attempts.c.id, llm_attempts.c.token_count, stored, sa.func.max(llm_token_log.c.seq)
        )
        .outerjoin(llm_token_log, llm_token_log.c.attempt_id == llm_attempts.c.id)
        .where(llm_attempts.c.token_count.is_not(None))
        .group_by(llm_attempts.c.id, llm_attempts.c.token_count)
        .having(stored != llm_attempts.c.token_count)
    )
    async with engine.connect() as conn:
        return [(aid, recorded, n, last) for aid, recorded, n, last in await conn.execute(query)]


async def open_requests(engine: AsyncEngine) -> int:
    """Requests still streaming."""
    async with engine.connect() as conn:
        return int(
            await conn.scalar(
                sa.select(sa.func.count()).where(llm_requests.c.status == "streaming")
            )
            or 0
        )


async def insert_tokens(engine: AsyncEngine, tokens: list[Token]) -> dict[str, int]:
    """Insert journaled tokens in one transaction, as the flusher would; rows added per attempt.

    The insert ignores rows that exist, so a refill is idempotent and safe
    beside a running flusher.
    """
    dialect = engine.dialect.name
    ids = sorted({uuid.UUID(bytes=token[0]) for token in tokens})
    count = (
        sa.select(llm_token_log.c.attempt_id, sa.func.count())
        .where(llm_token_log.c.attempt_id.in_(ids))
        .group_by(llm_token_log.c.attempt_id)
    )
    async with engine.begin() as conn:
        # Counting first also opens the driver-level transaction the raw insert joins.
        before = {aid: int(n) for aid, n in await conn.execute(count)}
        await TOKEN_WRITERS[dialect](conn, TOKEN_ROWS[dialect](tokens))
        after = {aid: int(n) for aid, n in await conn.execute(count)}
    return {str(aid): after.get(aid, 0) - before.get(aid, 0) for aid in ids}

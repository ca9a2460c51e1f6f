"""Retention: remove requests older than the cut-off, with their attempts and tokens.

The unit is the request: one that was created before the cut-off and has
ended goes, tokens first, then attempts, then the request, a bounded batch of
requests per transaction so no lock is held for long. A request still open
goes only past `open_cutoff` (the retention period): only a daemon that never
came back leaves one open that long, and one in flight must keep its rows. On
PostgreSQL the token log is partitioned by day: partitions wholly before the
cut-off, and before every request kept, are dropped whole (a token is never
older than its request, so they only hold tokens of requests being removed),
which leaves few token rows to delete one by one.
"""

from __future__ import annotations

import re
from datetime import UTC, date, datetime, time, timedelta

import sqlalchemy as sa
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine

from llmsvc.logs import logger
from llmsvc.maintenance.runs import JobResult
from llmsvc.store.attribution import parse_since
from llmsvc.store.keys import utc
from llmsvc.store.schema import llm_attempts, llm_requests, llm_token_log

log = logger(__name__)

MAX_DAYS = 100_000  # the longest cut-off given in days: a longer one is no date
PARTITION = re.compile(r"llm_token_log_p(\d{8})")
_PARTITIONS = sa.text(
    """
    SELECT c.relname FROM pg_inherits i
    JOIN pg_class c ON c.oid = i.inhrelid
    JOIN pg_class p ON p.oid = i.inhparent
    WHERE p.relname = 'llm_token_log'
    """
)


def partition_name(day: date) -> str:
    return f"llm_token_log_p{day:%Y%m%d}"


async def partition_days(conn: AsyncConnection) -> list[date]:
    """The days that have a partition of their own, oldest first (PostgreSQL only)."""
    days = []
    for (name,) in await conn.execute(_PARTITIONS):
        if found := PARTITION.fullmatch(name):
            days.append(datetime.strptime(found.group(1), "%Y%m%d").replace(tzinfo=UTC).date())
    return sorted(days)


async def create_partition(conn: AsyncConnection, day: date) -> None:
    """The token log's partition for one UTC day."""
    start, end = day.isoformat(), (day + timedelta(days=1)).isoformat()
    await conn.exec_driver_sql(
        f"CREATE TABLE IF NOT EXISTS {partition_name(day)} PARTITION OF llm_token_log "
        f"FOR VALUES FROM ('{start} 00:00:00+00') TO ('{end} 00:00:00+00')"
    )


async def ensure_partitions(engine: AsyncEngine, ahead_days: int) -> list[str]:
    """Create the daily partitions from today to `ahead_days` on; return those created.

    A day whose rows already sit in the default partition cannot get a
    partition of its own; it is logged and its rows stay where they are.
    """
    if engine.dialect.name != "postgresql":
        return []
    created = []
    today = datetime.now(UTC).date()
    async with engine.connect() as conn:
        have = set(await partition_days(conn))
        await conn.commit()
        for n in range(ahead_days + 1):
            day = today + timedelta(days=n)
            if day in have:
                continue
            try:
                await create_partition(conn, day)
                await conn.commit()
            except sa.exc.DBAPIError as exc:
                await conn.rollback()
                log.warning("token partition not created", day=day, error=exc.orig)
                continue
            created.append(partition_name(day))
    if created:
        log.info("token partitions created", count=len(created), last=created[-1])
    return created


def parse_before(text: str) -> datetime:
    """A cut-off given by hand, read as `status --since` reads one (`7d`, or an ISO 8601
    date or time, UTC when it names no zone).

    One in the future is refused: it would remove everything that has ended,
    which `--older-than 0` says on purpose and a mistyped year does not.
    """
    at = parse_since(text)
    if at > datetime.now(UTC):
        raise ValueError(f"{text!r} is in the future (--older-than 0 prunes all that has ended)")
    return at


def _old_requests(cutoff: datetime, open_cutoff: datetime) -> sa.Select[tuple[object]]:
    """Every request created before the cut-off that has ended, or open and before `open_cutoff`.

    A request still `streaming` that old is one whose daemon never came back
    to end it (a decommissioned instance): its tokens are past the cut-off too.
    """
    r = llm_requests.c
    ended_or_abandoned = sa.or_(r.status != "streaming", r.created_at < open_cutoff)
    return sa.select(r.id).where(r.created_at < cutoff, ended_or_abandoned)


async def prune(
    engine: AsyncEngine,
    cutoff: datetime,
    open_cutoff: datetime,
    batch_requests: int,
    dry_run: bool = False,
    partitions: bool = True,
) -> JobResult:
    """Remove the requests before `cutoff` (open ones: before `open_cutoff`); `dry_run` counts.

    On PostgreSQL the rows go first and the partitions after, so a prune cut
    short never leaves an attempt without its tokens (the gap check would
    report it); tokens in partitions about to be dropped are not deleted one
    by one. `partitions=False` deletes every token row, as on SQLite (the
    benchmark compares the two).
    """
    open_cutoff = min(cutoff, open_cutoff)
    counts = await _count(engine, cutoff, open_cutoff)
    open_kept, oldest_open = await _open_kept(engine, cutoff, open_cutoff)
    found: dict[str, object] = {**counts, "cutoff": cutoff.isoformat(), "still_open": open_kept}
    if dry_run:
        return JobResult(rows=0, found=found, repaired={"dry_run": True})
    by_partition = partitions and engine.dialect.name == "postgresql"
    # Tokens before `boundary` sit in partitions that are dropped whole: none of them is a
    # token of a request kept, and a kept one's tokens are no older than it.
    keep_from = min(cutoff, oldest_open or cutoff)
    boundary = datetime.combine(keep_from.date(), time(), UTC) if by_partition else None
    requests, attempts, tokens = await _delete_rows(
        engine, _old_requests(cutoff, open_cutoff), batch_requests, boundary
    )
    dropped: list[str] = []
    if boundary is not None:
        dropped = await _drop_partitions_before(engine, boundary)
        tokens += await _delete_default_before(engine, boundary, batch_requests * 100)
    repaired = {
        "requests": requests,
        "attempts": attempts,
        "token_rows_deleted": tokens,
        "partitions_dropped": dropped,
    }
    rows = requests + attempts + counts["tokens"]
    return JobResult(rows=rows, found=found, repaired=repaired)


async def _delete_rows(
    engine: AsyncEngine,
    old: sa.Select[tuple[object]],
    batch_requests: int,
    boundary: datetime | None,
) -> tuple[int, int, int]:
    """Delete `old` requests batch by batch: their tokens (from `boundary` on), attempts, them."""
    requests = attempts = tokens = 0
    while True:
        async with engine.begin() as conn:
            ids = list((await conn.scalars(old.limit(batch_requests))).all())
            if not ids:
                return requests, attempts, tokens
            attempt_ids = sa.select(llm_attempts.c.id).where(llm_attempts.c.request_id.in_(ids))
            delete_tokens = sa.delete(llm_token_log).where(
                llm_token_log.c.attempt_id.in_(attempt_ids)
            )
            if boundary is not None:
                delete_tokens = delete_tokens.where(llm_token_log.c.created_at >= boundary)
            tokens += (await conn.execute(delete_tokens)).rowcount
            delete_attempts = sa.delete(llm_attempts).where(llm_attempts.c.request_id.in_(ids))
            attempts += (await conn.execute(delete_attempts)).rowcount
            delete_requests = sa.delete(llm_requests).where(llm_requests.c.id.in_(ids))
            requests += (await conn.execute(delete_requests)).rowcount


async def _delete_default_before(engine: AsyncEngine, boundary: datetime, batch: int) -> int:
    """Tokens before `boundary` that fell into the default partition: none, normally."""
    stmt = sa.text(
        "DELETE FROM llm_token_log_default WHERE ctid IN "
        "(SELECT ctid FROM llm_token_log_default WHERE created_at < :boundary LIMIT :batch)"
    )
    deleted = 0
    while True:
        async with engine.begin() as conn:
            n = (await conn.execute(stmt, {"boundary": boundary, "batch": batch})).rowcount
        deleted += n
        if n < batch:
            return deleted


async def _open_kept(
    engine: AsyncEngine, cutoff: datetime, open_cutoff: datetime
) -> tuple[int, datetime | None]:
    """The requests before `cutoff` still open, so kept: how many, and the oldest one's time."""
    r = llm_requests.c
    query = sa.select(sa.func.count(), sa.func.min(r.created_at)).where(
        r.created_at < cutoff, r.created_at >= open_cutoff, r.status == "streaming"
    )
    async with engine.connect() as conn:
        count, oldest = (await conn.execute(query)).one()
    return int(count), utc(oldest)


async def _count(engine: AsyncEngine, cutoff: datetime, open_cutoff: datetime) -> dict[str, int]:
    """What a prune at `cutoff` removes: requests, attempts and token rows."""
    old = _old_requests(cutoff, open_cutoff).subquery()
    old_attempts = sa.select(llm_attempts.c.id).where(llm_attempts.c.request_id.in_(sa.select(old)))
    async with engine.connect() as conn:
        requests = await conn.scalar(sa.select(sa.func.count()).select_from(old))
        attempts = await conn.scalar(
            sa.select(sa.func.count()).select_from(old_attempts.subquery())
        )
        tokens = await conn.scalar(
            sa.select(sa.func.count()).where(llm_token_log.c.attempt_id.in_(old_attempts))
        )
    return {
        "requests": int(requests or 0),
        "attempts": int(attempts or 0),
        "tokens": int(tokens or 0),
    }


async def _drop_partitions_before(engine: AsyncEngine, boundary: datetime) -> list[str]:
    """Drop every daily partition that ends at or before `boundary` (a midnight, UTC).

    Dropping takes a brief exclusive lock on the token log; `lock_timeout`
    keeps it from queueing behind a long query (and every insert behind it):
    a partition that cannot be dropped now is left to the row deletes.
    """
    dropped = []
    async with engine.connect() as conn:
        days = [d for d in await partition_days(conn) if d < boundary.date()]
        await conn.commit()
        for day in days:
            name = partition_name(day)
            try:
                async with conn.begin():
                    await conn.exec_driver_sql("SET LOCAL lock_timeout = '5s'")
                    await conn.exec_driver_sql(f"DROP TABLE {name}")
            except sa.exc.DBAPIError as exc:
                log.warning("token partition not dropped", partition=name, error=exc.orig)
                continue
            dropped.append(name)
    if dropped:
        log.info("token partitions dropped", count=len(dropped), last=dropped[-1])
    return dropped

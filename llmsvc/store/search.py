"""Requests by the text of their reply: a bounded search, since no column holds a reply.

A reply is an attempt's tokens in seq order, so matching means reading them: a search
reads the replies of at most `SCAN` requests (the newest that the other filters let
through) and says how far it read, so an empty answer is never taken for "nowhere".
"""

from __future__ import annotations

import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta
from itertools import groupby

import sqlalchemy as sa
from sqlalchemy.dialects import postgresql
from sqlalchemy.ext.asyncio import AsyncConnection

from llmsvc.store.keys import utc
from llmsvc.store.schema import llm_attempts, llm_requests, llm_token_log

SCAN = 2000  # requests whose replies one search reads: bounds a page's time on any store
FIRST = 250  # of them read first: a common text fills its page there, sparing the rest
# A token's row is written after its request's, on the same daemon; the slack covers a
# clock stepped back, and lets PostgreSQL skip the token log's older daily partitions.
CLOCK_SLACK = timedelta(days=1)


@dataclass(frozen=True)
class Searched:
    """How far a search read: the replies of `requests` requests created from `newest` down
    to `oldest`; `resume` is where a search of older ones starts (None: none older left)."""

    requests: int
    newest: datetime | None
    oldest: datetime | None
    resume: tuple[datetime, uuid.UUID] | None


async def search_replies(
    conn: AsyncConnection, text: str, conditions: Sequence[sa.ColumnElement[bool]], limit: int
) -> tuple[list[uuid.UUID], Searched]:
    """The newest `limit` requests (of those `conditions` let through, among the newest
    `SCAN`) with an attempt whose reply holds `text`, ignoring case, and how far it read."""
    r = llm_requests.c
    candidates = (
        await conn.execute(
            sa.select(r.created_at, r.id)
            .where(*conditions)
            .order_by(r.created_at.desc(), r.id.desc())
            .limit(SCAN)
        )
    ).all()
    if not candidates:
        return [], Searched(0, None, None, None)
    found: list[uuid.UUID] = []
    read = 0
    for part in (candidates[:FIRST], candidates[FIRST:]):
        if not part or (found and len(found) >= limit):  # the first part filled the page
            break
        since = utc(part[-1].created_at) - CLOCK_SLACK
        matching = await _matching(conn, text, [c.id for c in part], since)
        for _, request_id in part:
            read += 1
            if request_id in matching:
                found.append(request_id)
                if len(found) == limit:
                    break
    last = candidates[read - 1]
    older_left = read < len(candidates) or len(candidates) == SCAN
    resume = (utc(last.created_at), last.id) if older_left else None
    newest = utc(candidates[0].created_at)
    return found, Searched(read, newest, utc(last.created_at), resume)


async def _matching(
    conn: AsyncConnection, text: str, request_ids: list[uuid.UUID], since: datetime
) -> set[uuid.UUID]:
    """Which of the requests have an attempt whose tokens, joined in seq order, hold `text`
    (lower-cased on both sides). PostgreSQL joins them in the database; SQLite's
    group_concat promises no order, so there they are joined here."""
    t, a = llm_token_log.c, llm_attempts.c
    tokens = llm_token_log.join(llm_attempts, a.id == t.attempt_id)
    theirs = (a.request_id.in_(request_ids), t.created_at >= since)
    if conn.dialect.name == "postgresql":
        joined: postgresql.aggregate_order_by[str] = postgresql.aggregate_order_by(
            sa.literal_column("''"), t.seq
        )
        reply = sa.func.string_agg(t.text, joined)  # string_agg(text, '' ORDER BY seq)
        query = (
            sa.select(a.request_id)
            .select_from(tokens)
            .where(*theirs)
            .group_by(a.request_id, t.attempt_id)
            .having(sa.func.strpos(sa.func.lower(reply), sa.func.lower(text)) > 0)
        )
        return set(await conn.scalars(query))
    rows = await conn.execute(
        sa.select(a.request_id, t.attempt_id, t.text)
        .select_from(tokens)
        .where(*theirs)
        .order_by(t.attempt_id, t.seq)
    )
    wanted = text.lower()
    return {
        request_id
        for (request_id, _), parts in groupby(rows, key=lambda row: (row[0], row[1]))
        if wanted in "".join(part[2] for part in parts).lower()
    }

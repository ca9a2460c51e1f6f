"""Queries of the store: what operators ask (`status`, `show`, the admin API) and boot needs."""

from __future__ import annotations

import uuid
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

import sqlalchemy as sa
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.ext.asyncio import AsyncEngine

from llmsvc.store.attribution import RequestFilter, correlated, names, where
from llmsvc.store.keys import utc
from llmsvc.store.schema import (
    llm_attempts,
    llm_dead_letters,
    llm_requests,
    llm_token_log,
    llm_tool_calls,
    provider_status,
)
from llmsvc.store.search import Searched, search_replies


@dataclass
class Listing:
    """Requests, newest first, and how far a search of their replies read (None when `text`
    was not asked for: then the rows are all that match, up to the limit)."""

    rows: list[dict[str, Any]]
    searched: Searched | None = None


async def recent_requests(
    engine: AsyncEngine,
    limit: int,
    only: RequestFilter | None = None,
    before: tuple[datetime, uuid.UUID] | None = None,
) -> Listing:
    """The newest requests (of those `only` lets through, older than the (created_at, id)
    `before`: a page's keyset), newest first, with their total token counts, who sent
    them, how many attempts they took and when the first token arrived. With `only.text`
    the replies of a bounded number of them are read (`search.search_replies`).

    A request not ended yet (or ended without counts) still shows what is stored: the
    provider of its last attempt, and `deltas_stored`, the token and tool-call deltas the
    store holds (NULL for a request whose completion count is known).
    """
    joined, key_team_names = names()
    attempts = llm_attempts.c
    last_provider = (
        sa.select(attempts.provider)
        .where(attempts.request_id == llm_requests.c.id)
        .order_by(attempts.attempt_no.desc())
        .limit(1)
        .scalar_subquery()
    )
    stored = [
        sa.select(sa.func.count())
        .select_from(table.join(llm_attempts, attempts.id == table.c.attempt_id))
        .where(attempts.request_id == llm_requests.c.id)
        .scalar_subquery()
        for table in (llm_token_log, llm_tool_calls)
    ]
    attempt_count = (
        sa.select(sa.func.count())
        .where(attempts.request_id == llm_requests.c.id)
        .scalar_subquery()
        .label("attempts")
    )
    first_token_at = (
        sa.select(sa.func.min(attempts.first_token_at))
        .where(attempts.request_id == llm_requests.c.id)
        .scalar_subquery()
        .label("first_token_at")
    )
    query = (
        sa.select(
            llm_requests.c.id,
            llm_requests.c.created_at,
            llm_requests.c.model,
            sa.func.coalesce(llm_requests.c.provider, last_provider).label("provider"),
            llm_requests.c.stream,
            llm_requests.c.status,
            llm_requests.c.prompt_tokens,
            llm_requests.c.completion_tokens,
            llm_requests.c.prompt_tokens_source,
            llm_requests.c.completion_tokens_source,
            sa.case((llm_requests.c.completion_tokens.is_(None), stored[0] + stored[1])).label(
                "deltas_stored"
            ),
            llm_requests.c.cost,
            llm_requests.c.ended_at,
            llm_requests.c.key_id,
            llm_requests.c.team_id,
            *key_team_names,
            llm_requests.c.end_user,
            llm_requests.c.session_id,
            llm_requests.c["metadata"],
            attempt_count,
            first_token_at,
        )
        .select_from(joined)
        .order_by(llm_requests.c.created_at.desc(), llm_requests.c.id.desc())
        .limit(limit)
    )
    conditions: list[sa.ColumnElement[bool]] = []
    if before is not None:
        # A row comparison, so the (created_at, id) index starts at the cursor on PostgreSQL.
        created, request_id = llm_requests.c.created_at, llm_requests.c.id
        cursor = sa.tuple_(
            sa.literal(utc(before[0]), created.type), sa.literal(before[1], request_id.type)
        )
        conditions.append(sa.tuple_(created, request_id) < cursor)
    searched = None
    async with engine.connect() as conn:
        if only is not None:
            conditions += await where(conn, only)
        if only is not None and only.text is not None:
            found, searched = await search_replies(conn, only.text, conditions, limit)
            conditions = [llm_requests.c.id.in_(found)]
        rows = [dict(row._mapping) for row in await conn.execute(query.where(*conditions))]
    return Listing(rows, searched)


@dataclass
class RequestDetail:
    request: dict[str, Any]
    attempts: list[dict[str, Any]]
    texts: dict[uuid.UUID, str]  # each attempt's tokens, assembled in seq order
    tool_calls: dict[uuid.UUID, list[dict[str, Any]]]  # each attempt's calls, assembled
    refused: list[dict[str, Any]]  # its records the database refused (llm_dead_letters)


async def find_requests(engine: AsyncEngine, given: str) -> list[uuid.UUID]:
    """The request `given` names: the one with that id, else those sent with it as their
    correlation id (at most two, newest first: enough to tell one from several)."""
    async with engine.connect() as conn:
        try:
            request_id = uuid.UUID(given)
        except ValueError:
            pass
        else:
            found = await conn.scalar(
                sa.select(llm_requests.c.id).where(llm_requests.c.id == request_id)
            )
            if found is not None:
                return [found]
        return list(
            await conn.scalars(
                sa.select(llm_requests.c.id)
                .where(correlated(given))
                .order_by(llm_requests.c.created_at.desc())
                .limit(2)
            )
        )


async def request_detail(engine: AsyncEngine, request_id: uuid.UUID) -> RequestDetail | None:
    async with engine.connect() as conn:
        row = (
            await conn.execute(sa.select(llm_requests).where(llm_requests.c.id == request_id))
        ).first()
        if row is None:
            return None
        attempts = [
            dict(a._mapping)
            for a in await conn.execute(
                sa.select(llm_attempts)
                .where(llm_attempts.c.request_id == request_id)
                .order_by(llm_attempts.c.attempt_no)
            )
        ]
        texts: dict[uuid.UUID, str] = {}
        for attempt in attempts:
            tokens = await conn.scalars(
                sa.select(llm_token_log.c.text)
                .where(llm_token_log.c.attempt_id == attempt["id"])
                .order_by(llm_token_log.c.seq)
            )
            texts[attempt["id"]] = "".join(tokens)
        calls: dict[uuid.UUID, list[dict[str, Any]]] = {}
        for attempt in attempts:
            deltas = await conn.execute(
                sa.select(llm_tool_calls)
                .where(llm_tool_calls.c.attempt_id == attempt["id"])
                .order_by(llm_tool_calls.c.seq)
            )
            calls[attempt["id"]] = assemble_tool_calls([dict(d._mapping) for d in deltas])
        letters = llm_dead_letters.c
        refused = await conn.execute(
            sa.select(letters.lsn, letters.record_type, letters.outcome, letters.reason)
            .where(
                (letters.request_id == request_id)
                | letters.attempt_id.in_([a["id"] for a in attempts])
            )
            .order_by(letters.lsn)
        )
    return RequestDetail(
        dict(row._mapping), attempts, texts, calls, [dict(r._mapping) for r in refused]
    )


def stopped(attempt: dict[str, Any]) -> str:
    """Why an attempt stopped, as its client was told, and the upstream's own word after it
    when that differs (`content_filter (refusal)`); "" for one that got no reply."""
    told, own = attempt["finish_reason"], attempt["stop_reason"]
    return (told or "") + (f" ({own})" if own and own != told else "")


def assemble_tool_calls(deltas: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Stored deltas, in seq order, as whole calls: id and name as first given, arguments
    concatenated, by call index."""
    calls: dict[int, dict[str, Any]] = {}
    for d in deltas:
        call = calls.setdefault(d["call_index"], {"id": None, "name": None, "arguments": ""})
        call["id"] = call["id"] or d["call_id"]
        call["name"] = call["name"] or d["name"]
        call["arguments"] += d["arguments"]
    return [calls[index] for index in sorted(calls)]


@dataclass
class OpenWork:
    """A request (and its attempts) that a previous run started and never ended."""

    request_id: uuid.UUID
    attempts: dict[uuid.UUID, int]  # attempt id -> tokens stored


async def open_work(engine: AsyncEngine, instance_id: uuid.UUID) -> list[OpenWork]:
    """Requests of this instance still `streaming`, for marking `interrupted` at boot.

    Only this instance's: other daemons sharing the database own theirs.
    """
    async with engine.connect() as conn:
        request_ids = list(
            await conn.scalars(
                sa.select(llm_requests.c.id).where(
                    llm_requests.c.instance_id == instance_id,
                    llm_requests.c.status == "streaming",
                )
            )
        )
        found = []
        for request_id in request_ids:
            counts = await conn.execute(
                sa.select(llm_attempts.c.id, sa.func.count(llm_token_log.c.seq))
                .outerjoin(llm_token_log, llm_token_log.c.attempt_id == llm_attempts.c.id)
                .where(llm_attempts.c.request_id == request_id)
                .where(llm_attempts.c.status == "streaming")
                .group_by(llm_attempts.c.id)
            )
            found.append(OpenWork(request_id, {aid: int(n) for aid, n in counts}))
    return found


@dataclass
class StoredReply:
    """What the store holds of a request's reply, for counting the tokens of an unended one."""

    messages: list[Any]
    provider: str  # the last attempt's provider and its name for the model
    model: str
    texts: list[str]  # its tokens and tool-call names and arguments, in order
    deltas: int


async def stored_reply(engine: AsyncEngine, request_id: uuid.UUID) -> StoredReply | None:
    """The request's stored text over all attempts (only one received any), or None if no
    attempt of it is stored."""
    async with engine.connect() as conn:
        messages = await conn.scalar(
            sa.select(llm_requests.c.messages).where(llm_requests.c.id == request_id)
        )
        attempts = (
            await conn.execute(
                sa.select(llm_attempts.c.id, llm_attempts.c.provider, llm_attempts.c.model)
                .where(llm_attempts.c.request_id == request_id)
                .order_by(llm_attempts.c.attempt_no)
            )
        ).all()
        if not attempts:
            return None
        ids = [a.id for a in attempts]
        texts = list(
            await conn.scalars(
                sa.select(llm_token_log.c.text)
                .where(llm_token_log.c.attempt_id.in_(ids))
                .order_by(llm_token_log.c.attempt_id, llm_token_log.c.seq)
            )
        )
        calls = (
            await conn.execute(
                sa.select(llm_tool_calls.c.name, llm_tool_calls.c.arguments)
                .where(llm_tool_calls.c.attempt_id.in_(ids))
                .order_by(llm_tool_calls.c.attempt_id, llm_tool_calls.c.seq)
            )
        ).all()
    deltas = len(texts) + len(calls)
    texts += [(name or "") + arguments for name, arguments in calls]
    last = attempts[-1]
    return StoredReply(messages or [], last.provider, last.model, texts, deltas)


async def provider_states(engine: AsyncEngine) -> dict[str, dict[str, Any]]:
    """Every provider's stored row: enabled flag, circuit state, failures, last error."""
    async with engine.connect() as conn:
        rows = await conn.execute(sa.select(provider_status))
        return {row.provider: dict(row._mapping) for row in rows}


async def set_provider_enabled(engine: AsyncEngine, provider: str, enabled: bool) -> None:
    """Persist an operator's switch; a provider with no row yet gets one, circuit closed."""
    dialect = postgresql if engine.dialect.name == "postgresql" else sqlite
    now = datetime.now(UTC)
    stmt = dialect.insert(provider_status).values(
        provider=provider, enabled=enabled, circuit_state="closed", failure_count=0, updated_at=now
    )
    stmt = stmt.on_conflict_do_update(
        index_elements=["provider"], set_={"enabled": enabled, "updated_at": now}
    )
    async with engine.begin() as conn:
        await conn.execute(stmt)


async def set_provider_circuit(
    engine: AsyncEngine, provider: str, state: str, failures: int, last_error: str | None
) -> None:
    """Persist a circuit breaker's change of state, so a restart resumes it."""
    dialect = postgresql if engine.dialect.name == "postgresql" else sqlite
    now = datetime.now(UTC)
    values = {
        "circuit_state": state,
        "failure_count": failures,
        "last_error": last_error,
        "updated_at": now,
    }
    stmt = dialect.insert(provider_status).values(provider=provider, enabled=True, **values)
    stmt = stmt.on_conflict_do_update(index_elements=["provider"], set_=values)
    async with engine.begin() as conn:
        await conn.execute(stmt)


async def token_summary(engine: AsyncEngine, attempt_ids: list[uuid.UUID]) -> dict[uuid.UUID, Any]:
    """Per attempt: stored token rows, their seq range and first/last times (no text)."""
    t = llm_token_log.c
    query = (
        sa.select(
            t.attempt_id,
            sa.func.count(),
            sa.func.min(t.seq),
            sa.func.max(t.seq),
            sa.func.min(t.created_at),
            sa.func.max(t.created_at),
        )
        .where(t.attempt_id.in_(attempt_ids))
        .group_by(t.attempt_id)
    )
    async with engine.connect() as conn:
        return {
            row[0]: {
                "stored": row[1],
                "first_seq": row[2],
                "last_seq": row[3],
                "first_at": row[4],
                "last_at": row[5],
            }
            for row in await conn.execute(query)
        }


async def dead_letters(engine: AsyncEngine) -> list[dict[str, Any]]:
    """Records the database refused that no operator has acknowledged yet, oldest first."""
    columns = [c for c in llm_dead_letters.c if c.name not in ("payload", "acknowledged_at")]
    query = (
        sa.select(*columns)
        .where(llm_dead_letters.c.acknowledged_at.is_(None))
        .order_by(llm_dead_letters.c.created_at, llm_dead_letters.c.lsn)
    )
    async with engine.connect() as conn:
        return [dict(row._mapping) for row in await conn.execute(query)]


async def acknowledge_dead_letters(engine: AsyncEngine) -> int:
    """Mark every refused record seen, so `llmsvc check` stops reporting it; the rows stay."""
    async with engine.begin() as conn:
        done = await conn.execute(
            sa.update(llm_dead_letters)
            .where(llm_dead_letters.c.acknowledged_at.is_(None))
            .values(acknowledged_at=datetime.now(UTC))
        )
    return int(done.rowcount)


async def usage_since(
    engine: AsyncEngine, instance_id: uuid.UUID, since: datetime
) -> dict[tuple[str, uuid.UUID], tuple[int, int]]:
    """Per key and per team: the requests other instances stored since `since`, and their
    tokens (prompt + completion, as far as ended), for sharing rate limits."""
    r = llm_requests.c
    tokens = sa.func.coalesce(
        sa.func.sum(
            sa.func.coalesce(r.prompt_tokens, 0) + sa.func.coalesce(r.completion_tokens, 0)
        ),
        0,
    )
    used: dict[tuple[str, uuid.UUID], tuple[int, int]] = {}
    async with engine.connect() as conn:
        for scope, column in (("key", r.key_id), ("team", r.team_id)):
            rows = await conn.execute(
                sa.select(column, sa.func.count(), tokens)
                .where(column.is_not(None), r.created_at >= since, r.instance_id != instance_id)
                .group_by(column)
            )
            for owner, count, total in rows:
                used[(scope, owner)] = (int(count), int(total))
    return used


async def spend_since(engine: AsyncEngine, scope: str, owner: uuid.UUID, since: datetime) -> float:
    """What a key's or team's stored requests since `since` cost (requests without a cost: 0)."""
    column = llm_requests.c.key_id if scope == "key" else llm_requests.c.team_id
    query = sa.select(sa.func.coalesce(sa.func.sum(llm_requests.c.cost), 0.0)).where(
        column == owner, llm_requests.c.created_at >= since
    )
    async with engine.connect() as conn:
        return float(await conn.scalar(query) or 0.0)


async def token_times(
    engine: AsyncEngine, attempt_ids: list[uuid.UUID]
) -> dict[uuid.UUID, list[datetime]]:
    """Per attempt: when each stored token arrived (its row's time), in seq order."""
    t = llm_token_log.c
    query = (
        sa.select(t.attempt_id, t.created_at)
        .where(t.attempt_id.in_(attempt_ids))
        .order_by(t.attempt_id, t.seq)
    )
    times: dict[uuid.UUID, list[datetime]] = {a: [] for a in attempt_ids}
    async with engine.connect() as conn:
        for attempt_id, created_at in await conn.execute(query):
            times[attempt_id].append(created_at)
    return times

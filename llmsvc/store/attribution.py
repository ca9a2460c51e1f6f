"""Requests by who sent them: the filters of `status` and the admin API, and spend per group.

Keys and teams are named by id or by name; names come from `api_keys` and
`teams` (a key id with no row there is shown as its id). Times are UTC.
"""

from __future__ import annotations

import re
import uuid
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any, Literal

import sqlalchemy as sa
from sqlalchemy.dialects import postgresql
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine

from llmsvc.errors import NotFound
from llmsvc.store.keys import utc
from llmsvc.store.schema import api_keys, llm_attempts, llm_requests, teams

SpendBy = Literal["key", "team", "user", "model", "provider", "day"]
SPEND_BY: tuple[SpendBy, ...] = ("key", "team", "user", "model", "provider", "day")
Bucket = Literal["day", "hour"]  # the time buckets spend may split each group into
BUCKETS: tuple[Bucket, ...] = ("day", "hour")
_DURATION = re.compile(r"(\d+)([mhdw])")
_UNITS = {"m": "minutes", "h": "hours", "d": "days", "w": "weeks"}


@dataclass(frozen=True)
class RequestFilter:
    """Which requests: each field set narrows them; keys and teams by id or name."""

    key: str | None = None
    team: str | None = None
    user: str | None = None
    metadata: tuple[tuple[str, str], ...] = ()  # every pair must match
    since: datetime | None = None
    correlation_id: str | None = None  # as the client sent it in X-Correlation-ID
    until: datetime | None = None  # created before this time
    status: str | None = None
    model: str | None = None  # as the client asked for it
    provider: str | None = None  # any of its attempts went to this provider
    text: str | None = None  # in an attempt's reply, ignoring case: a bounded search (search.py)


def parse_since(text: str, now: datetime | None = None) -> datetime:
    """`24h`, `7d`, `30m`, `2w` back from now, or an ISO date or time (UTC when it names
    no zone). ValueError says what is accepted."""
    now = now or datetime.now(UTC)
    if found := _DURATION.fullmatch(text.strip()):
        return now - timedelta(**{_UNITS[found[2]]: int(found[1])})
    try:
        at = datetime.fromisoformat(text.strip())
    except ValueError:
        raise ValueError(
            f"{text!r} is neither a duration (30m, 24h, 7d, 2w) nor an ISO date or time"
        ) from None
    return utc(at)


async def where(conn: AsyncConnection, f: RequestFilter) -> list[sa.ColumnElement[bool]]:
    """The conditions on `llm_requests` for a filter, but `text` (no column holds a reply:
    `search.search_replies` reads them); NotFound for a key or team name that names nothing
    (an empty answer would hide the typo)."""
    r = llm_requests.c
    conditions: list[sa.ColumnElement[bool]] = []
    if f.key is not None:
        conditions.append(r.key_id.in_(await _ids(conn, api_keys, f.key, "key")))
    if f.team is not None:
        conditions.append(r.team_id.in_(await _ids(conn, teams, f.team, "team")))
    if f.user is not None:
        conditions.append(r.end_user == f.user)
    for name, value in f.metadata:
        conditions.append(_holds(conn.dialect.name, name, value))
    if f.since is not None:
        conditions.append(r.created_at >= f.since.astimezone(UTC))
    if f.correlation_id is not None:
        conditions.append(correlated(f.correlation_id))
    if f.until is not None:
        conditions.append(r.created_at < f.until.astimezone(UTC))
    if f.status is not None:
        conditions.append(r.status == f.status)
    if f.model is not None:
        conditions.append(r.model == f.model)
    if f.provider is not None:
        attempts = llm_attempts.c
        tried = sa.select(attempts.id).where(
            attempts.request_id == r.id, attempts.provider == f.provider
        )
        conditions.append(tried.exists())
    return conditions


def _holds(dialect: str, name: str, value: str) -> sa.ColumnElement[bool]:
    """Requests whose metadata holds `name: value`. Metadata values are strings, so on
    PostgreSQL JSONB containment says the same, and the GIN index answers it (0009)."""
    column = llm_requests.c["metadata"]
    holds: sa.ColumnElement[bool] = column[name].as_string() == value
    if dialect == "postgresql":
        holds = sa.type_coerce(column, postgresql.JSONB).contains({name: value})
    return holds


def correlated(correlation_id: str) -> sa.ColumnElement[bool]:
    """Requests sent with this X-Correlation-ID, an opaque string matched as sent."""
    return llm_requests.c.correlation_id == correlation_id


async def _ids(conn: AsyncConnection, table: sa.Table, given: str, what: str) -> list[uuid.UUID]:
    """A key's or team's ids: the id given, or every one of that name (a key's name may be
    shared, by its rotated predecessors for one)."""
    try:
        return [uuid.UUID(given)]
    except ValueError:
        pass
    ids = list(await conn.scalars(sa.select(table.c.id).where(table.c.name == given)))
    if not ids:
        raise NotFound(f"no {what} named {given!r}")
    return ids


def names() -> tuple[sa.Join, list[sa.ColumnElement[Any]]]:
    """`llm_requests` joined to its key's and team's rows, and the columns naming them."""
    joined = llm_requests.outerjoin(api_keys, api_keys.c.id == llm_requests.c.key_id).outerjoin(
        teams, teams.c.id == llm_requests.c.team_id
    )
    return joined, [api_keys.c.name.label("key_name"), teams.c.name.label("team_name")]


async def spend(
    engine: AsyncEngine, by: SpendBy, since: datetime | None = None, per: Bucket | None = None
) -> list[dict[str, Any]]:
    """Requests (and `errors`, those that did not complete), prompt and completion tokens and
    cost per group, the costliest first (by day: in date order). `group` is the key's or
    team's id, the user, the model, the provider that served it or the UTC date; `name` the
    key's or team's name where there is one. `per`: each group split per UTC day or hour
    (`day`: `YYYY-MM-DD` or `YYYY-MM-DD HH:00`), in time order."""
    r = llm_requests.c
    joined, (key_name, team_name) = names()
    group: sa.ColumnElement[Any] = {
        "key": r.key_id,
        "team": r.team_id,
        "user": r.end_user,
        "model": r.model,
        "provider": r.provider,
        "day": _utc_bucket(engine.dialect.name, "day"),
    }[by]
    name = {"key": key_name, "team": team_name}.get(by)
    bucket = None if per is None or (by == "day" and per == "day") else per
    when = [] if bucket is None else [_utc_bucket(engine.dialect.name, bucket)]
    cost = sa.func.sum(r.cost)
    query = (
        sa.select(
            *[w.label("day") for w in when],
            group.label("group"),
            (sa.null() if name is None else name).label("name"),
            sa.func.count().label("requests"),
            sa.func.sum(sa.case((r.status == "completed", 0), else_=1)).label("errors"),
            sa.func.coalesce(sa.func.sum(r.prompt_tokens), 0).label("prompt_tokens"),
            sa.func.coalesce(sa.func.sum(r.completion_tokens), 0).label("completion_tokens"),
            cost.label("cost"),
        )
        .select_from(joined if by in ("key", "team") else llm_requests)
        .group_by(*when, group, *([] if name is None else [name]))
    )
    if since is not None:
        query = query.where(r.created_at >= since.astimezone(UTC))
    if by == "day":
        query = query.order_by(*when, group)
    else:
        costliest = [sa.func.coalesce(cost, 0).desc(), sa.func.count().desc(), group]
        query = query.order_by(*when, *costliest)
    async with engine.connect() as conn:
        return [dict(row._mapping) for row in await conn.execute(query)]


def _utc_bucket(dialect: str, bucket: Bucket) -> sa.ColumnElement[Any]:
    """A request's UTC day (`YYYY-MM-DD`) or hour (`YYYY-MM-DD HH:00`) as text; SQLite holds
    times as UTC text already."""
    created = llm_requests.c.created_at
    if dialect == "postgresql":
        # Migration 0009's statistics on the day's expression make PostgreSQL group by hashing.
        # Literal constants: bound ones differ between SELECT and GROUP BY for PostgreSQL.
        utc: sa.ColumnElement[str] = sa.literal_column("'UTC'")
        shape = "'YYYY-MM-DD'" if bucket == "day" else "'YYYY-MM-DD HH24:00'"
        return sa.func.to_char(sa.func.timezone(utc, created), sa.literal_column(shape))
    if bucket == "day":
        return sa.func.date(created)
    return sa.func.strftime(sa.literal_column("'%Y-%m-%d %H:00'"), created)

"""Callers' keys and teams in the store: created, listed, shown, revoked, rotated, updated.

A secret is `sk-llmsvc-` and 192 random bits; only its SHA-256 is stored, and
the secret is returned once, by `create_key` and `rotate_key`. Every change
moves the row's `updated_at`, which is how every instance follows it
(`llmsvc.keytable`). The CLI and the admin API validate their input with the
same models (`KeySpec`, `TeamSpec`).
"""

from __future__ import annotations

import hashlib
import secrets
import uuid
from datetime import UTC, date, datetime
from typing import Any, overload

import sqlalchemy as sa
from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine

from llmsvc.callers import BudgetPeriod
from llmsvc.errors import ClientError, Conflict, NotFound
from llmsvc.store.schema import api_keys, teams

SECRET_PREFIX = "sk-llmsvc-"
SHOWN_CHARS = len(SECRET_PREFIX) + 4  # the `prefix` column: enough to tell keys apart
NAME = r"^[A-Za-z0-9_.-]+$"
LIMITS = ("rpm", "rpm_burst", "tpm", "tpm_burst", "budget", "budget_period")


def new_secret() -> str:
    """192 random bits from the OS's CSPRNG, URL-safe, behind a prefix a scanner recognises."""
    return SECRET_PREFIX + secrets.token_urlsafe(24)


def secret_hash(secret: str) -> str:
    """SHA-256 hex: a secret of 128+ random bits needs no slow hash to resist guessing."""
    return hashlib.sha256(secret.encode()).hexdigest()


class LimitsSpec(BaseModel):
    """A key's or team's limits as a caller gives them; null or absent: no limit."""

    model_config = ConfigDict(extra="forbid", strict=True)

    rpm: int | None = Field(default=None, ge=1, le=10_000_000)
    rpm_burst: int | None = Field(default=None, ge=1, le=10_000_000)
    tpm: int | None = Field(default=None, ge=1, le=10_000_000_000)
    tpm_burst: int | None = Field(default=None, ge=1, le=10_000_000_000)
    budget: float | None = Field(default=None, ge=0, le=1e12, allow_inf_nan=False)
    budget_period: BudgetPeriod | None = None


class TeamSpec(LimitsSpec):
    name: str = Field(min_length=1, max_length=100, pattern=NAME)


class TeamUpdate(LimitsSpec):
    """Only the fields given are changed; null removes that limit."""


class KeySpec(LimitsSpec):
    name: str = Field(min_length=1, max_length=100, pattern=NAME)
    team: str | None = Field(default=None, min_length=1, max_length=100, pattern=NAME)
    models: list[str] | None = Field(default=None, min_length=1, max_length=1000)
    expires_at: str | None = Field(
        default=None, max_length=40, description="ISO 8601 date or time; a date means its start"
    )

    @field_validator("models")
    @classmethod
    def _models(cls, models: list[str] | None) -> list[str] | None:
        if models is not None and not all(0 < len(m) <= 200 for m in models):
            raise ValueError("each model name must have 1 to 200 characters")
        return models

    @field_validator("expires_at")
    @classmethod
    def _expires(cls, value: str | None) -> str | None:
        if value is not None:
            expiry(value)  # raises ValueError naming the problem
        return value

    @model_validator(mode="after")
    def _budget(self) -> KeySpec:
        budget_needs_period(self.budget, self.budget_period)
        return self


def budget_needs_period(budget: float | None, period: str | None) -> None:
    if (budget is None) != (period is None):
        raise ValueError("budget and budget_period go together: give both or neither")


def expiry(value: str) -> datetime:
    """An expiry from ISO 8601 (a date: its midnight UTC); naive times are UTC; past: refused."""
    try:
        when = datetime.fromisoformat(value)
    except ValueError:
        raise ValueError(f"{value!r} is not an ISO 8601 date or time (2026-12-31)") from None
    if len(value) <= 10:  # a date alone
        when = datetime.combine(date.fromisoformat(value), datetime.min.time())
    when = utc(when)
    if when <= datetime.now(UTC):
        raise ValueError(f"{value!r} is in the past")
    return when


# -- teams ------------------------------------------------------------------------------


async def create_team(engine: AsyncEngine, spec: TeamSpec) -> dict[str, Any]:
    budget_needs_period_or_400(spec.budget, spec.budget_period)
    now = datetime.now(UTC)
    row = {"id": uuid.uuid4(), **spec.model_dump(), "created_at": now, "updated_at": now}
    async with engine.begin() as conn:
        if await _team_id(conn, spec.name) is not None:
            raise Conflict(f"a team {spec.name!r} exists already")
        await conn.execute(sa.insert(teams).values(row))
    return await show_team(engine, spec.name)


async def update_team(engine: AsyncEngine, name: str, update: TeamUpdate) -> dict[str, Any]:
    """Change the limits given; every key of the team sees them within the refresh interval."""
    changes = {field: getattr(update, field) for field in update.model_fields_set}
    async with engine.begin() as conn:
        row = (await conn.execute(sa.select(teams).where(_named(teams, name)))).first()
        if row is None:
            raise NotFound(f"no team {name!r}")
        merged = {**row._mapping, **changes}
        budget_needs_period_or_400(merged["budget"], merged["budget_period"])
        changes["updated_at"] = datetime.now(UTC)
        await conn.execute(sa.update(teams).where(teams.c.id == row.id).values(changes))
    return await show_team(engine, str(row.id))


async def list_teams(engine: AsyncEngine) -> list[dict[str, Any]]:
    counts = (
        sa.select(api_keys.c.team_id, sa.func.count().label("keys"))
        .group_by(api_keys.c.team_id)
        .subquery()
    )
    query = (
        sa.select(teams, sa.func.coalesce(counts.c["keys"], 0).label("keys"))
        .outerjoin(counts, counts.c.team_id == teams.c.id)
        .order_by(teams.c.name)
    )
    async with engine.connect() as conn:
        return [_team(row._mapping) for row in await conn.execute(query)]


async def show_team(engine: AsyncEngine, name: str) -> dict[str, Any]:
    """A team by name or id."""
    async with engine.connect() as conn:
        row = (await conn.execute(sa.select(teams).where(_named(teams, name)))).first()
        if row is None:
            raise NotFound(f"no team {name!r}")
        keys = await conn.scalars(
            sa.select(api_keys.c.name).where(api_keys.c.team_id == row.id).order_by("name")
        )
        return {**_team(row._mapping), "keys": list(keys)}


# -- keys -------------------------------------------------------------------------------


async def create_key(engine: AsyncEngine, spec: KeySpec) -> tuple[dict[str, Any], str]:
    """The new key's row and its secret, which is never stored and never shown again."""
    secret, now = new_secret(), datetime.now(UTC)
    async with engine.begin() as conn:
        if await _key_row(conn, spec.name) is not None:
            raise Conflict(f"a key {spec.name!r} exists already; names are unique")
        team_id = None
        if spec.team is not None:
            team_id = await _team_id(conn, spec.team)
            if team_id is None:
                raise ClientError(
                    f"no team {spec.team!r}: create it first (llmsvc teams create)", param="team"
                )
        row = {
            "id": uuid.uuid4(),
            "name": spec.name,
            "team_id": team_id,
            "secret_hash": secret_hash(secret),
            "prefix": secret[:SHOWN_CHARS],
            **{field: getattr(spec, field) for field in LIMITS},
            "models": spec.models,
            "expires_at": expiry(spec.expires_at) if spec.expires_at else None,
            "created_at": now,
            "updated_at": now,
        }
        await conn.execute(sa.insert(api_keys).values(row))
    return await show_key(engine, spec.name), secret


async def list_keys(engine: AsyncEngine) -> list[dict[str, Any]]:
    async with engine.connect() as conn:
        rows = await conn.execute(_keys_query().order_by(api_keys.c.name))
        return [_key(row._mapping) for row in rows]


async def show_key(engine: AsyncEngine, name: str) -> dict[str, Any]:
    """A key by name or id; never its secret or hash."""
    async with engine.connect() as conn:
        row = (await conn.execute(_keys_query().where(_named(api_keys, name)))).first()
    if row is None:
        raise NotFound(f"no key {name!r}")
    return _key(row._mapping)


async def revoke_key(engine: AsyncEngine, name: str) -> dict[str, Any]:
    """Revoked for good; revoking again changes nothing."""
    async with engine.begin() as conn:
        row = await _key_row(conn, name)
        if row is None:
            raise NotFound(f"no key {name!r}")
        if row.revoked_at is None:
            now = datetime.now(UTC)
            await conn.execute(
                sa.update(api_keys)
                .where(api_keys.c.id == row.id)
                .values(revoked_at=now, updated_at=now)
            )
    return await show_key(engine, str(row.id))


async def rotate_key(engine: AsyncEngine, name: str) -> tuple[dict[str, Any], str]:
    """A new secret for the key (same id, name, team and limits); the old one stops working."""
    secret = new_secret()
    async with engine.begin() as conn:
        row = await _key_row(conn, name)
        if row is None:
            raise NotFound(f"no key {name!r}")
        if row.revoked_at is not None:
            raise Conflict(f"the key {row.name!r} is revoked; create a new one")
        await conn.execute(
            sa.update(api_keys)
            .where(api_keys.c.id == row.id)
            .values(
                secret_hash=secret_hash(secret),
                prefix=secret[:SHOWN_CHARS],
                updated_at=datetime.now(UTC),
            )
        )
    return await show_key(engine, str(row.id)), secret


async def changed_since(
    engine: AsyncEngine, since: datetime | None
) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """(teams, keys) whose `updated_at` is at or after `since` (None: all), with key hashes."""
    team_query, key_query = sa.select(teams), sa.select(api_keys)
    if since is not None:
        team_query = team_query.where(teams.c.updated_at >= since)
        key_query = key_query.where(api_keys.c.updated_at >= since)
    async with engine.connect() as conn:
        found_teams = [dict(row._mapping) for row in await conn.execute(team_query)]
        found_keys = [dict(row._mapping) for row in await conn.execute(key_query)]
    return found_teams, found_keys


def budget_needs_period_or_400(budget: float | None, period: str | None) -> None:
    try:
        budget_needs_period(budget, period)
    except ValueError as exc:
        raise ClientError(str(exc), param="budget_period") from None


@overload
def utc(value: datetime) -> datetime: ...
@overload
def utc(value: None) -> None: ...
def utc(value: datetime | None) -> datetime | None:
    """A time in UTC. Naive ones are UTC already: SQLite gives back stored times naive, and
    llmsvc reads a time given without a zone as UTC; PostgreSQL's come in the session's zone."""
    if value is None:
        return None
    return value.replace(tzinfo=UTC) if value.tzinfo is None else value.astimezone(UTC)


def _named(table: sa.Table, name: str) -> sa.ColumnElement[bool]:
    """Rows named `name`, or with the id `name` when it is one."""
    try:
        return table.c.id == uuid.UUID(name)
    except ValueError:
        return table.c.name == name


async def _team_id(conn: AsyncConnection, name: str) -> uuid.UUID | None:
    found: uuid.UUID | None = await conn.scalar(sa.select(teams.c.id).where(_named(teams, name)))
    return found


async def _key_row(conn: AsyncConnection, name: str) -> sa.Row[Any] | None:
    return (await conn.execute(sa.select(api_keys).where(_named(api_keys, name)))).first()


def _keys_query() -> sa.Select[Any]:
    return sa.select(
        *(c for c in api_keys.c if c.name != "secret_hash"), teams.c.name.label("team")
    ).outerjoin(teams, teams.c.id == api_keys.c.team_id)


def _key(row: Any) -> dict[str, Any]:
    key = dict(row)
    for name in ("expires_at", "revoked_at", "created_at", "updated_at"):
        key[name] = utc(key[name])
    key["state"] = _state(key["revoked_at"], key["expires_at"])
    return key


def _state(revoked_at: datetime | None, expires_at: datetime | None) -> str:
    if revoked_at is not None:
        return "revoked"
    if expires_at is not None and expires_at <= datetime.now(UTC):
        return "expired"
    return "active"


def _team(row: Any) -> dict[str, Any]:
    team = dict(row)
    for name in ("created_at", "updated_at"):
        team[name] = utc(team[name])
    return team

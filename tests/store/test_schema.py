"""Migrations: what they create, that they can run twice, and that they match schema.py."""

from __future__ import annotations

import re
import uuid
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
import sqlalchemy as sa
from alembic import command
from sqlalchemy.engine import Connection
from sqlalchemy.ext.asyncio import AsyncEngine

from llmsvc.maintenance.retention import partition_days, partition_name
from llmsvc.store.engine import (
    _alembic_config,
    create_engine,
    migrations_dir,
    schema_revision,
    upgrade_to_head,
)
from llmsvc.store.schema import Json, llm_token_log, metadata, wal_checkpoints

STORE_TABLES = {
    "llm_requests",
    "llm_attempts",
    "llm_token_log",
    "llm_tool_calls",
    "provider_status",
}
PARTITION = re.compile(r"llm_token_log_(p\d{8}|default)")  # PostgreSQL's daily partitions

# The newest revision, read from the migration files' names (NNNN_what.py), not from Alembic.
NEWEST = max(
    p.name.split("_")[0] for p in migrations_dir().joinpath("versions").glob("[0-9]*_*.py")
)


def _describe_database(conn: Connection) -> dict[str, dict[str, Any]]:
    """Table -> its columns (name -> nullable), primary key, indexes and foreign keys."""
    inspector = sa.inspect(conn)
    tables: dict[str, dict[str, Any]] = {}
    for name in inspector.get_table_names():
        if name == "alembic_version" or PARTITION.fullmatch(name):
            continue
        tables[name] = {
            "columns": {c["name"]: c["nullable"] for c in inspector.get_columns(name)},
            "primary_key": set(inspector.get_pk_constraint(name)["constrained_columns"]),
            "indexes": {
                i["name"]: tuple(i["column_names"])
                for i in inspector.get_indexes(name)
                if "duplicates_constraint" not in i  # PostgreSQL's index of a UNIQUE constraint
            },
            "unique": {tuple(u["column_names"]) for u in inspector.get_unique_constraints(name)},
            "foreign_keys": {
                (tuple(fk["constrained_columns"]), fk["referred_table"])
                for fk in inspector.get_foreign_keys(name)
            },
        }
    return tables


def _describe_metadata() -> dict[str, dict[str, Any]]:
    return {
        table.name: {
            "columns": {c.name: c.nullable for c in table.columns},
            "primary_key": {c.name for c in table.primary_key.columns},
            "indexes": {i.name: tuple(c.name for c in i.columns) for i in table.indexes},
            "unique": {
                tuple(c.name for c in u.columns)
                for u in table.constraints
                if isinstance(u, sa.UniqueConstraint)
            },
            "foreign_keys": {
                (tuple(c.name for c in fk.columns), fk.referred_table.name)
                for fk in table.foreign_key_constraints
            },
        }
        for table in metadata.sorted_tables
    }


async def _table_names(engine: AsyncEngine) -> set[str]:
    async with engine.connect() as conn:
        names = await conn.run_sync(lambda sync: sa.inspect(sync).get_table_names())
    return {name for name in names if not PARTITION.fullmatch(name)}


async def test_a_fresh_database_reports_no_revision_and_the_head_it_needs(
    database_url: str,
) -> None:
    engine = create_engine(database_url)
    try:
        current, head = await schema_revision(engine)
    finally:
        await engine.dispose()
    assert current is None
    assert head == NEWEST


async def test_upgrade_to_head_creates_the_store_tables_and_checkpoints(
    database_url: str,
) -> None:
    engine = create_engine(database_url)
    try:
        await upgrade_to_head(engine)
        tables = await _table_names(engine)
        current, head = await schema_revision(engine)
    finally:
        await engine.dispose()
    assert tables == STORE_TABLES | {
        "wal_checkpoints",
        "maintenance_runs",
        "maintenance_slots",
        "llm_dead_letters",
        "teams",
        "api_keys",
        "llm_sessions",
        "console_logouts",
        "alembic_version",
    }
    assert current == head == NEWEST


async def test_upgrade_to_head_twice_changes_nothing_and_keeps_rows(database_url: str) -> None:
    engine = create_engine(database_url)
    instance = uuid.uuid4()
    try:
        await upgrade_to_head(engine)
        async with engine.begin() as conn:
            await conn.execute(
                wal_checkpoints.insert().values(
                    instance_id=instance, lsn=42, updated_at=datetime.now(UTC)
                )
            )
        before = await _table_names(engine)
        await upgrade_to_head(engine)
        after = await _table_names(engine)
        current, head = await schema_revision(engine)
        async with engine.connect() as conn:
            kept = list(
                await conn.execute(sa.select(wal_checkpoints.c.instance_id, wal_checkpoints.c.lsn))
            )
    finally:
        await engine.dispose()
    assert after == before
    assert (current, head) == (NEWEST, NEWEST)
    assert kept == [(instance, 42)]


async def test_a_store_at_head_is_not_upgraded_again_and_an_older_one_is(
    database_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Each boot of each worker migrates: at head, alembic's upgrade is not run at all."""
    upgrades: list[str] = []
    real = command.upgrade

    def counted(config: Any, revision: str) -> None:
        upgrades.append(revision)
        real(config, revision)

    monkeypatch.setattr(command, "upgrade", counted)
    engine = create_engine(database_url)
    try:
        await upgrade_to_head(engine)
        await upgrade_to_head(engine)
        assert upgrades == ["head"]
        async with engine.begin() as conn:
            await conn.run_sync(lambda sync: command.downgrade(_alembic_config(sync), "0010"))
        await upgrade_to_head(engine)
        assert upgrades == ["head", "head"]
        assert await schema_revision(engine) == (NEWEST, NEWEST)
    finally:
        await engine.dispose()


async def test_migrated_schema_matches_the_tables_the_code_uses(database_url: str) -> None:
    """schema.py (what queries and the flusher use) and the migrations must not drift apart."""
    engine = create_engine(database_url)
    try:
        await upgrade_to_head(engine)
        async with engine.connect() as conn:
            migrated = await conn.run_sync(_describe_database)
    finally:
        await engine.dispose()
    expected = _describe_metadata()
    if database_url.startswith("postgresql"):  # partitioning puts the partition key in the key
        expected["llm_token_log"]["primary_key"].add("created_at")
    else:  # a GIN index, PostgreSQL's only
        del expected["llm_requests"]["indexes"]["ix_llm_requests_metadata"]
    assert set(migrated) == set(expected)
    for name, table in expected.items():
        assert migrated[name] == table, name


@pytest.mark.parametrize("database_url", ["postgresql"], indirect=True)
async def test_partitioning_the_token_log_keeps_every_row_in_its_days_partition(
    database_url: str,
) -> None:
    engine = create_engine(database_url)
    today = datetime.now(UTC)
    rows = [
        (uuid.uuid4(), seq, f"t{seq}", today - timedelta(days=age, seconds=seq))
        for age in (30, 1, 0)
        for seq in range(3)
    ]
    try:
        async with engine.begin() as conn:
            await conn.run_sync(lambda sync: command.upgrade(_alembic_config(sync), "0002"))
            await conn.execute(
                llm_token_log.insert(),
                [
                    dict(zip(("attempt_id", "seq", "text", "created_at"), r, strict=True))
                    for r in rows
                ],
            )
        await upgrade_to_head(engine)
        async with engine.connect() as conn:
            stored = await conn.execute(
                sa.text(
                    "SELECT attempt_id, seq, text, created_at, tableoid::regclass::text "
                    "FROM llm_token_log ORDER BY created_at"
                )
            )
            found = [tuple(r) for r in stored]
            days = await partition_days(conn)
    finally:
        await engine.dispose()
    assert [r[:4] for r in found] == sorted(rows, key=lambda r: r[3])
    assert all(r[4] == partition_name(r[3].astimezone(UTC).date()) for r in found)
    oldest = (today - timedelta(days=30, seconds=2)).date()
    assert days[0] == oldest
    assert days[-1] == today.date() + timedelta(days=14)


def _requests_before_0007(uuid_type: bool) -> sa.Table:
    """The columns of llm_requests a row needs, correlation_id a UUID as before 0007 or not."""
    return sa.Table(
        "llm_requests",
        sa.MetaData(),
        sa.Column("id", sa.Uuid, primary_key=True),
        sa.Column("instance_id", sa.Uuid),
        sa.Column("correlation_id", sa.Uuid if uuid_type else sa.String(128)),
        sa.Column("model", sa.String(200)),
        sa.Column("stream", sa.Boolean),
        sa.Column("status", sa.String(16)),
        sa.Column("messages", Json),
        sa.Column("params", Json),
        sa.Column("created_at", sa.DateTime(timezone=True)),
    )


async def test_correlation_ids_stored_as_uuids_are_kept_as_their_text(database_url: str) -> None:
    """Migration 0007: the UUID column becomes text; stored ids read back as the gateway
    echoed them; any id fits after it; a downgrade refuses while an id is no UUID."""
    engine = create_engine(database_url)
    before, after = uuid.uuid4(), "req_01HZX3K9Q7"
    as_uuids, as_text = _requests_before_0007(True), _requests_before_0007(False)

    def row(correlation: Any) -> dict[str, Any]:
        return {
            "id": uuid.uuid4(),
            "instance_id": uuid.uuid4(),
            "correlation_id": correlation,
            "model": "m",
            "stream": True,
            "status": "completed",
            "messages": [],
            "params": {},
            "created_at": datetime.now(UTC),
        }

    async def alembic(step: Any, revision: str) -> None:
        async with engine.begin() as conn:
            await conn.run_sync(lambda sync: step(_alembic_config(sync), revision))

    async def correlations(table: sa.Table) -> list[Any]:
        async with engine.connect() as conn:
            query = sa.select(table.c.correlation_id).order_by(table.c.created_at)
            return list((await conn.execute(query)).scalars())

    try:
        await alembic(command.upgrade, "0006")
        async with engine.begin() as conn:
            await conn.execute(sa.insert(as_uuids).values(row(before)))
        await upgrade_to_head(engine)
        migrated = await correlations(as_text)
        async with engine.begin() as conn:
            await conn.execute(sa.insert(as_text).values(row(after)))
        both = await correlations(as_text)
        await alembic(command.downgrade, "0007")  # the later revisions first
        with pytest.raises(RuntimeError, match="1 requests have a correlation id that is not"):
            await alembic(command.downgrade, "0006")
        kept = await correlations(as_text), await schema_revision(engine)
        async with engine.begin() as conn:
            await conn.execute(sa.delete(as_text).where(as_text.c.correlation_id == after))
        await alembic(command.downgrade, "0006")
        downgraded = await correlations(as_uuids)
    finally:
        await engine.dispose()
    assert migrated == [str(before)]
    assert both == [str(before), after]
    assert kept == ([str(before), after], ("0007", NEWEST))
    assert downgraded == [before]

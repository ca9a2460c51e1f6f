"""Connecting to the store and bringing its schema to the newest migration."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import sqlalchemy as sa
from alembic import command
from alembic.config import Config
from alembic.runtime.migration import MigrationContext
from alembic.script import ScriptDirectory
from sqlalchemy import event
from sqlalchemy.engine import Connection
from sqlalchemy.ext.asyncio import AsyncEngine, create_async_engine

import llmsvc
from llmsvc.errors import StoreError

DAEMON_APPLICATION = "llmsvc daemon"


def create_engine(url: str, application: str = "llmsvc") -> AsyncEngine:
    """An async engine; SQLite gets WAL journaling and a busy timeout for concurrent readers.

    On PostgreSQL `application` is the sessions' application_name, by which a
    restore tells whether a daemon is using the database.
    """
    if url.startswith("sqlite"):
        path = url.partition(":///")[2]
        if path and path != ":memory:":
            parent = Path(path).parent
            try:
                parent.mkdir(parents=True, exist_ok=True, mode=0o700)
            except OSError as exc:
                raise StoreError(
                    f"cannot create {parent} for the SQLite database: {exc.strerror}"
                ) from None
        engine = create_async_engine(url, connect_args={"timeout": 30})
        event.listen(engine.sync_engine, "connect", _sqlite_pragmas)
        return engine
    return create_async_engine(
        url,
        pool_size=5,
        max_overflow=5,
        pool_pre_ping=True,
        connect_args={"server_settings": {"application_name": application}},
    )


def _sqlite_pragmas(dbapi_conn: Any, _record: Any) -> None:
    cursor = dbapi_conn.cursor()
    cursor.execute("PRAGMA journal_mode=WAL")
    cursor.execute("PRAGMA synchronous=NORMAL")
    cursor.execute("PRAGMA foreign_keys=ON")
    cursor.close()


def migrations_dir() -> Path:
    """Migrations ship inside the wheel as `_migrations`; in a source tree they are `alembic/`."""
    packaged = Path(llmsvc.__file__).parent / "_migrations"
    return packaged if packaged.is_dir() else Path(llmsvc.__file__).parent.parent / "alembic"


def _alembic_config(connection: Connection | None = None) -> Config:
    config = Config()
    config.set_main_option("script_location", str(migrations_dir()))
    config.attributes["connection"] = connection
    return config


def describe_error(exc: BaseException) -> str:
    """A database error's one-line cause, without the SQL or parameters (they may hold prompts)."""
    cause = exc.orig if isinstance(exc, sa.exc.DBAPIError) and exc.orig is not None else exc
    return f"{type(cause).__name__}: {str(cause).splitlines()[0] if str(cause) else ''}"


async def migrate(engine: AsyncEngine, where: str) -> None:
    """Upgrade to head at boot; a failure is one StoreError line naming the (redacted) `where`."""
    try:
        await upgrade_to_head(engine)
    except (sa.exc.SQLAlchemyError, OSError) as exc:
        raise StoreError(f"cannot migrate the database at {where}: {describe_error(exc)}") from None


async def upgrade_to_head(engine: AsyncEngine) -> None:
    async with engine.begin() as conn:
        await conn.run_sync(lambda sync: command.upgrade(_alembic_config(sync), "head"))


async def schema_revision(engine: AsyncEngine) -> tuple[str | None, str]:
    """The database's current revision and the newest one this code knows."""
    head = ScriptDirectory.from_config(_alembic_config()).get_current_head() or ""
    async with engine.connect() as conn:
        current = await conn.run_sync(
            lambda sync: MigrationContext.configure(sync).get_current_revision()
        )
    return current, head

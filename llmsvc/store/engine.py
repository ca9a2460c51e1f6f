"""Connecting to the store and bringing its schema to the newest migration.

A daemon's connections are bounded (`create_engine(timeout=…)`): a connection
attempt, and with `per_command` every command, is given up after `timeout`
seconds, and TCP keepalives (both ways) drop a peer that went silent, as a
network partition without a reset leaves it. Maintenance sessions get no
per-command bound: a consistency scan, a dump or a migration may rightly run
for minutes.

Only the daemon, `migrate` and `restore` create a store (`access="create"`): a
command pointed at the wrong SQLite path must not leave an empty database
there, and one that only reads changes nothing (`access="read"`).
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import os
import socket
import zlib
from collections.abc import AsyncIterator
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal
from urllib.parse import quote

import sqlalchemy as sa
from sqlalchemy import event
from sqlalchemy.engine import Connection
from sqlalchemy.ext.asyncio import AsyncEngine, create_async_engine

import llmsvc
from llmsvc import private
from llmsvc.errors import StoreError

if TYPE_CHECKING:  # alembic is imported where it is used: the flush process never migrates,
    from alembic.config import Config  # and importing it was a sixth of that process's start

DAEMON_APPLICATION = "llmsvc daemon"


MIGRATION_LOCK = zlib.crc32(b"llmsvc migrate") - 2**31  # a signed 32-bit advisory lock key
KEEPALIVE_PROBES = 3

Access = Literal["create", "write", "read"]
"""What sessions may do: `create` a missing SQLite file (and its directory), `write` an
existing store, or `read` one (SQLite `mode=ro`, PostgreSQL read-only transactions)."""


def create_engine(
    url: str,
    application: str = "llmsvc",
    timeout: float | None = None,
    per_command: bool = False,
    access: Access = "create",
) -> AsyncEngine:
    """An async engine; SQLite gets WAL journaling and a busy timeout for concurrent readers.

    On PostgreSQL `application` is the sessions' application_name, by which a
    restore tells whether a daemon is using the database. `timeout` bounds
    connecting (SQLite: waiting for the write lock) and how long a silent peer
    is kept; `per_command` bounds every command too, on the client (a server
    that stopped answering) and on the server (`statement_timeout`: a lock wait).
    """
    if url.startswith("sqlite"):
        path = sqlite_path(url)
        if path is not None and access == "create":
            _create_sqlite_file(path)
        engine = create_async_engine(url, connect_args={"timeout": timeout or 30})
        if access != "create":  # a missing file is an error, never made
            event.listen(
                engine.sync_engine, "do_connect", _sqlite_uri("ro" if access == "read" else "rw")
            )
        if access != "read":  # a read-only connection can set no journal mode
            event.listen(engine.sync_engine, "connect", _sqlite_pragmas)
        return engine
    server_settings = {"application_name": application}
    if access == "read":
        server_settings["default_transaction_read_only"] = "on"
    connect_args: dict[str, Any] = {"server_settings": server_settings}
    if timeout is not None:
        idle, interval = _keepalive(timeout)
        connect_args["timeout"] = timeout
        server_settings.update(  # so the server ends the sessions of a daemon it cannot reach
            tcp_keepalives_idle=str(idle),
            tcp_keepalives_interval=str(interval),
            tcp_keepalives_count=str(KEEPALIVE_PROBES),
        )
        if per_command:
            connect_args["command_timeout"] = timeout
            # just under the client's bound: the server ends a statement (and frees its locks)
            # itself, the client's bound is for a server that does not answer at all
            server_settings["statement_timeout"] = str(int(timeout * 900))
    engine = create_async_engine(
        url, pool_size=5, max_overflow=5, pool_pre_ping=True, connect_args=connect_args
    )
    if timeout is not None:
        event.listen(engine.sync_engine, "connect", _keepalives(timeout))
    return engine


def _create_sqlite_file(path: Path) -> None:
    """The database file and its folders, private before SQLite opens it: its side files
    (`-wal`, `-shm`, `-journal`) take the database file's mode."""
    try:
        private.make_dirs(path.parent)
        private.create_file(path)
    except OSError as exc:
        reason = exc.strerror or str(exc)
        raise StoreError(f"cannot create the SQLite database {path}: {reason}") from None


def _keepalive(timeout: float) -> tuple[int, int]:
    """Keepalive idle and interval seconds, so that a silent peer is dropped after ~`timeout`."""
    idle = max(1, int(timeout / 2))
    return idle, max(1, int((timeout - idle) / KEEPALIVE_PROBES))


def _keepalives(timeout: float) -> Any:
    """A connect hook setting TCP keepalives and TCP_USER_TIMEOUT on asyncpg's socket.

    asyncpg has no option for them; its transport is `_transport` (a private
    name, so tests/store/test_engine.py checks the options on a real connection).
    """
    idle, interval = _keepalive(timeout)

    def on_connect(dbapi_conn: Any, _record: Any) -> None:
        transport = getattr(dbapi_conn.driver_connection, "_transport", None)
        sock = transport.get_extra_info("socket") if transport is not None else None
        if sock is None or sock.family == socket.AF_UNIX:
            return
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPIDLE, idle)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPINTVL, interval)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPCNT, KEEPALIVE_PROBES)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_USER_TIMEOUT, int(timeout * 1000))

    return on_connect


def sqlite_path(url: str) -> Path | None:
    """The SQLite database file a URL names; None for another database or `:memory:`."""
    parsed = sa.engine.make_url(url)
    if parsed.get_backend_name() != "sqlite" or parsed.database in (None, "", ":memory:"):
        return None
    return Path(parsed.database)


def _sqlite_uri(mode: str) -> Any:
    """A do_connect hook opening the file as a SQLite URI with `mode` (`rw`, `ro`), which
    fails on a missing file instead of creating it."""

    def on_connect(_dialect: Any, _record: Any, cargs: list[Any], cparams: dict[str, Any]) -> None:
        cargs[0] = f"file:{quote(cargs[0])}?mode={mode}"
        cparams["uri"] = True

    return on_connect


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
    from alembic.config import Config

    config = Config()
    config.set_main_option("script_location", str(migrations_dir()))
    config.attributes["connection"] = connection
    return config


def describe_error(exc: BaseException) -> str:
    """A database error's one-line cause, without the SQL or parameters (they may hold prompts)."""
    cause = exc.orig if isinstance(exc, sa.exc.DBAPIError) and exc.orig is not None else exc
    text = str(cause).splitlines()[0] if str(cause) else ""
    if not text and isinstance(cause, TimeoutError):
        text = "no answer in time"
    return f"{type(cause).__name__}: {text}"


async def migrate(engine: AsyncEngine, where: str) -> None:
    """Upgrade to head at boot; a failure is one StoreError line naming the (redacted) `where`."""
    try:
        await upgrade_to_head(engine)
    except (sa.exc.SQLAlchemyError, OSError) as exc:
        raise StoreError(f"cannot migrate the database at {where}: {describe_error(exc)}") from None


async def upgrade_to_head(engine: AsyncEngine) -> None:
    """Upgrade to head, one process at a time: workers and the CLI may migrate together.

    A store at head already is left as it is without running alembic's upgrade, which
    loads every migration (0.2 s of each worker's boot, one worker after the other).
    """
    async with _migration_lock(engine), engine.begin() as conn:
        if conn.dialect.name == "postgresql":  # held until this transaction ends
            await conn.execute(sa.select(sa.func.pg_advisory_xact_lock(MIGRATION_LOCK)))
        else:  # the driver begins no transaction for DDL: a migration cut off would leave half
            await conn.exec_driver_sql("BEGIN IMMEDIATE")
        await conn.run_sync(_upgrade)


def _upgrade(sync: Connection) -> None:
    if _current_revision(sync) != _head_revision():
        from alembic import command

        command.upgrade(_alembic_config(sync), "head")


def _current_revision(sync: Connection) -> str | None:
    from alembic.runtime.migration import MigrationContext

    return MigrationContext.configure(sync).get_current_revision()


def _head_revision() -> str:
    from alembic.script import ScriptDirectory

    return ScriptDirectory.from_config(_alembic_config()).get_current_head() or ""


@contextlib.asynccontextmanager
async def _migration_lock(engine: AsyncEngine) -> AsyncIterator[None]:
    """SQLite: a lock file by the database, waited for (PostgreSQL locks in the transaction)."""
    database = engine.url.database
    if engine.dialect.name != "sqlite" or not database or database == ":memory:":
        yield
        return
    fd = open_lock_file(database, "migrate")
    try:
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                await asyncio.sleep(0.05)
        yield
    finally:
        os.close(fd)  # closing drops the flock


def open_lock_file(database: str, name: str) -> int:
    """The lock file `name` of a SQLite database, opened (created) for flock.

    All of them sit in one private folder, `<database>.locks/`, so the
    directory holding the database is not littered with one file per lock.
    """
    folder = private.make_dirs(Path(f"{database}.locks"))
    return private.open_file(folder / f"{name}.lock", os.O_RDWR)


async def schema_revision(engine: AsyncEngine) -> tuple[str | None, str]:
    """The database's current revision and the newest one this code knows."""
    async with engine.connect() as conn:
        current = await conn.run_sync(_current_revision)
    return current, _head_revision()

"""Backups of the store, their retention, and restore with replay of the WAL since.

PostgreSQL is dumped with `pg_dump` in its custom format (compressed) and
verified with `pg_restore --list`; SQLite is copied with its online backup
API and verified with `PRAGMA integrity_check`. Each backup is one file in
`backup_dir`, mode 0600, named by its UTC time, with a `.json` beside it
holding what `llmsvc backups` lists and what a restore needs: whether it was
verified and the WAL checkpoints it contains. The PostgreSQL tools are run
by `pgtools`, which hands them the password in their environment.

A restore brings the database back to the backup, whose checkpoints rewind
with it; replaying this instance's WAL from there (`store.replay`, as at
boot) adds everything journaled since. WAL housekeeping keeps the segments
after the newest verified backup's checkpoint for exactly that. The provider
switches, keys and teams in force are kept (`kept`): operational state, not data.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import os
import sqlite3
import uuid
from collections.abc import AsyncIterator
from dataclasses import asdict, dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import aiofiles.os
import orjson
import sqlalchemy as sa
from sqlalchemy.ext.asyncio import AsyncEngine

from llmsvc import private
from llmsvc.config import FlushPolicy, WalPolicy
from llmsvc.errors import BackupError, WalLocked
from llmsvc.logs import logger
from llmsvc.maintenance import kept, pgtools
from llmsvc.maintenance.runs import JobResult
from llmsvc.store.engine import DAEMON_APPLICATION
from llmsvc.store.replay import replay_wal
from llmsvc.store.schema import metadata, wal_checkpoints
from llmsvc.wal import WalLock

log = logger(__name__)

PREFIX = "llmsvc-"
SUFFIXES = {"postgresql": ".dump", "sqlite": ".sqlite3"}
TIME_FORMAT = "%Y%m%dT%H%M%SZ"


@dataclass
class Backup:
    """One backup file and what its `.json` says about it."""

    name: str
    kind: str  # postgresql or sqlite
    created: str  # ISO 8601, UTC
    size: int
    verified: bool
    checkpoints: dict[str, int]  # instance id -> the last LSN the backup holds
    error: str = ""

    def checkpoint(self, instance_id: uuid.UUID) -> int:
        return self.checkpoints.get(str(instance_id), 0)


def list_backups(backup_dir: Path) -> list[Backup]:
    """Every backup with its description, oldest first; files without one are skipped."""
    found = []
    for meta in sorted(backup_dir.glob(f"{PREFIX}*.json")):
        try:
            backup = Backup(**orjson.loads(meta.read_bytes()))
        except (OSError, ValueError, TypeError) as exc:
            log.warning("backup description unreadable", file=meta.name, error=exc)
            continue
        if (backup_dir / backup.name).exists():
            found.append(backup)
    return sorted(found, key=lambda b: b.created)


def newest_verified(backup_dir: Path) -> Backup | None:
    verified = [b for b in list_backups(backup_dir) if b.verified]
    return verified[-1] if verified else None


async def backup(engine: AsyncEngine, backup_dir: Path) -> JobResult:
    """Write, verify and describe one backup of the store; a failed one says why."""
    kind = engine.dialect.name
    await asyncio.to_thread(private.make_dirs, backup_dir)
    now = datetime.now(UTC)
    path = backup_dir / f"{PREFIX}{now.strftime(TIME_FORMAT)}{SUFFIXES[kind]}"
    for n in itertools.count(1):  # a second backup within the same second
        if not await aiofiles.os.path.exists(path):
            break
        path = backup_dir / f"{PREFIX}{now.strftime(TIME_FORMAT)}-{n}{SUFFIXES[kind]}"
    # Read before the copy starts: the copy holds at least these, so the WAL after
    # them is all a restore can need.
    async with engine.connect() as conn:
        rows = await conn.execute(sa.select(wal_checkpoints.c.instance_id, wal_checkpoints.c.lsn))
        checkpoints = {str(instance): int(lsn) for instance, lsn in rows}
    partial = path.with_name(path.name + ".partial")
    private.create_file(partial)
    error = ""
    try:
        if kind == "postgresql":
            await pgtools.run("pg_dump", engine, "--format=custom", f"--file={partial}")
            listing = await pgtools.run("pg_restore", None, "--list", str(partial))
            if "TABLE DATA" not in listing or "llm_requests" not in listing:
                error = "pg_restore --list does not show the llmsvc tables"
        else:
            await asyncio.to_thread(_sqlite_copy, _sqlite_path(engine), partial)
            error = await asyncio.to_thread(_sqlite_verify, partial)
    except BaseException:
        partial.unlink(missing_ok=True)
        raise
    os.replace(partial, path)
    size = path.stat().st_size
    described = Backup(path.name, kind, now.isoformat(), size, not error, checkpoints, error)
    _describe(backup_dir, described)
    found = {"file": path.name, "verified": not error, "checkpoints": checkpoints}
    if error:
        return JobResult("failed", bytes=size, found=found, error=f"verification failed: {error}")
    return JobResult(bytes=size, found=found)


def _describe(backup_dir: Path, backup: Backup) -> None:
    meta = backup_dir / f"{backup.name}.json"
    partial = meta.with_name(meta.name + ".partial")
    with os.fdopen(private.open_file(partial, os.O_WRONLY | os.O_TRUNC), "wb") as f:
        f.write(orjson.dumps(asdict(backup), option=orjson.OPT_INDENT_2))
        f.flush()
        os.fsync(f.fileno())
    os.replace(partial, meta)


def cleanup(backup_dir: Path, retention_days: int) -> JobResult:
    """Delete backups older than `retention_days`, except the newest verified one.

    That one stays whatever its age: it and the WAL kept after it are the
    only way back if backups have been failing since. Blocking file work: run
    it in a thread.
    """
    cutoff = datetime.now(UTC) - timedelta(days=retention_days)
    keep = newest_verified(backup_dir)
    removed, freed = [], 0
    for b in list_backups(backup_dir) if backup_dir.is_dir() else []:
        if datetime.fromisoformat(b.created) >= cutoff or (keep and b.name == keep.name):
            continue
        for path in (backup_dir / b.name, backup_dir / f"{b.name}.json"):
            freed += path.stat().st_size
            path.unlink()
        removed.append(b.name)
        log.info("backup removed", file=b.name, created=b.created)
    return JobResult(rows=len(removed), bytes=freed, repaired={"removed": removed})


def backup_path(backup_dir: Path, name: str) -> Path:
    """The backup called `name` in `backup_dir`; a name that leads elsewhere is refused."""
    if not name or "/" in name or "\\" in name or name.startswith(".") or "\x00" in name:
        raise BackupError(f"{name!r} is not a backup file name (no directories, no dot first)")
    path = backup_dir / name
    if not name.startswith(PREFIX) or path.suffix not in SUFFIXES.values():
        raise BackupError(f"{name!r} is not an llmsvc backup ({PREFIX}….dump or ….sqlite3)")
    if not path.is_file():
        raise BackupError(f"no backup {name!r} in {backup_dir}")
    return path


async def restore_database(
    engine: AsyncEngine, backup_dir: Path, name: str
) -> tuple[Backup, dict[str, Any]]:
    """Replace the database's contents with the backup's; the WAL replay is the caller's.

    The provider switches, keys and teams in force are kept (`kept`): with them,
    what the backup held otherwise, for the run's record.
    """
    path = backup_path(backup_dir, name)
    described = {b.name: b for b in list_backups(backup_dir)}.get(name)
    if described is None or not described.verified:
        raise BackupError(f"{name} is not a verified backup: its .json is missing or says so")
    if described.kind != engine.dialect.name:
        raise BackupError(
            f"{name} is a {described.kind} backup; the store is {engine.dialect.name}"
        )
    in_force = await kept.read(engine)
    if described.kind == "postgresql":
        await _restore_pg(engine, path)
    else:
        await engine.dispose()  # no connection of ours may hold the file while it is replaced
        await asyncio.to_thread(_sqlite_copy, path, _sqlite_path(engine))
    log.info("restore: database restored from", file=name, created=described.created)
    return described, await kept.write_back(engine, in_force)


# -- PostgreSQL -------------------------------------------------------------------------


async def _restore_pg(engine: AsyncEngine, path: Path) -> None:
    """Replace llmsvc's tables with the dump's, in one transaction.

    `pg_restore --clean` cannot drop a partition's inherited key, so psql runs
    the drops and then the dump's SQL, streamed from pg_restore, all in one
    transaction: a restore that fails leaves the database as it was.
    """
    tables = ", ".join([*metadata.tables, "alembic_version"])
    source = await pgtools.start("pg_restore", None, "--no-owner", "--file=-", str(path))
    sink = await pgtools.start(
        "psql",
        engine,
        "--single-transaction",
        "--set=ON_ERROR_STOP=1",
        "--quiet",
        "--file=-",
        stdin=asyncio.subprocess.PIPE,
    )
    assert source.stdout is not None
    assert sink.stdin is not None
    sink.stdin.write(f"DROP TABLE IF EXISTS {tables} CASCADE;\n".encode())
    while chunk := await source.stdout.read(1 << 16):
        sink.stdin.write(chunk)
        await sink.stdin.drain()
    sink.stdin.close()
    _, source_err = await source.communicate()
    _, sink_err = await sink.communicate()
    pgtools.check_exit("pg_restore", source, source_err)
    pgtools.check_exit("psql", sink, sink_err)


# -- SQLite -----------------------------------------------------------------------------


def _sqlite_path(engine: AsyncEngine) -> Path:
    return Path(engine.url.database or "")


def _sqlite_copy(source: Path, target: Path) -> None:
    """SQLite's online backup API: a consistent copy while others read and write.

    The copy is left in rollback-journal mode, one self-contained file; the
    daemon switches a restored database back to WAL mode when it connects.
    """
    src = sqlite3.connect(source)
    dst = sqlite3.connect(target)
    try:
        src.backup(dst)
        dst.execute("PRAGMA journal_mode=DELETE")
    finally:
        dst.close()
        src.close()


def _sqlite_verify(path: Path) -> str:
    """Empty when the copy is whole and holds the llmsvc tables; else what is wrong."""
    conn = sqlite3.connect(f"file:{path}?mode=ro", uri=True)
    try:
        result = conn.execute("PRAGMA integrity_check").fetchone()[0]
        tables = {r[0] for r in conn.execute("SELECT name FROM sqlite_master WHERE type='table'")}
    finally:
        conn.close()
    if result != "ok":
        return f"integrity_check: {result}"
    return "" if "llm_requests" in tables else "the llmsvc tables are missing"


class RestoreRefused(BackupError):
    """A daemon uses the database: a restore now would be undone or half replayed."""


@contextlib.asynccontextmanager
async def exclusive(engine: AsyncEngine, wal_dir: Path, force: bool) -> AsyncIterator[bool]:
    """Hold this host's WAL for a restore; yields whether it is held (the replay needs it).

    Refuses (RestoreRefused) while a daemon uses the database — it holds the
    WAL here, or a daemon's session is connected to the PostgreSQL database —
    unless forced; forced past a running daemon, the replay is left to that
    daemon's restart.
    """
    lock = WalLock(wal_dir)
    try:
        lock.acquire()
        locked = True
    except WalLocked:
        if not force:
            raise RestoreRefused(
                f"refusing to restore: an llmsvc daemon is running on this host (it holds "
                f"the WAL in {wal_dir}). Stop it first, or restore through its admin API "
                "(POST /api/admin/restore); --force restores under it and leaves the WAL's "
                "replay to its restart."
            ) from None
        locked = False
    try:
        if not force and (sessions := await _daemon_sessions(engine)):
            raise RestoreRefused(
                f"refusing to restore: {sessions} llmsvc daemon session(s) are connected to "
                "this database. Stop those daemons first, or use --force."
            )
        yield locked
    finally:
        if locked:
            lock.release()


async def restore(
    engine: AsyncEngine,
    backup_dir: Path,
    wal_dir: Path,
    name: str,
    replay: bool,
    wal: WalPolicy,
    flush: FlushPolicy,
) -> JobResult:
    """Restore a backup into the store, then (`replay`) replay this host's WAL journaled since.

    Run it inside `exclusive`, which says whether the WAL may be replayed here.
    """
    described, kept_found = await restore_database(engine, backup_dir, name)
    found: dict[str, Any] = {"restored": name, "created": described.created, "replayed": 0}
    if replay:
        found.update(await replay_wal(engine, wal_dir, "restore", wal, flush))
    else:
        log.warning("restore: a daemon holds the WAL; restart it to replay the WAL")
        found["replay"] = "left to the running daemon's restart"
    return JobResult(rows=found["replayed"], found={**found, **kept_found})


async def _daemon_sessions(engine: AsyncEngine) -> int:
    if engine.dialect.name != "postgresql":
        return 0
    query = sa.text(
        "SELECT count(*) FROM pg_stat_activity "
        "WHERE datname = current_database() AND application_name = :name"
    )
    async with engine.connect() as conn:
        return int(await conn.scalar(query, {"name": DAEMON_APPLICATION}) or 0)

"""Backups, their retention, and restore with WAL replay, on real SQLite and PostgreSQL."""

from __future__ import annotations

import os
import stat
import sys
import uuid
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import orjson
import pytest
import sqlalchemy as sa
from policies import flush_policy, wal_policy
from sqlalchemy.ext.asyncio import AsyncEngine
from store_steps import flush, journal_attempt

from llmsvc.errors import BackupError
from llmsvc.maintenance import backup as backups
from llmsvc.maintenance import pgtools
from llmsvc.maintenance.backup import (
    RestoreRefused,
    backup,
    backup_path,
    cleanup,
    list_backups,
)
from llmsvc.maintenance.runs import history, run_job
from llmsvc.store import keys
from llmsvc.store.engine import DAEMON_APPLICATION, create_engine
from llmsvc.store.queries import provider_states, set_provider_enabled
from llmsvc.store.replay import replay_wal
from llmsvc.store.schema import api_keys, llm_requests, llm_token_log
from llmsvc.wal.segment import WalLock


async def token_rows(engine: AsyncEngine) -> list[tuple[uuid.UUID, int, str]]:
    async with engine.connect() as conn:
        query = sa.select(llm_token_log.c.attempt_id, llm_token_log.c.seq, llm_token_log.c.text)
        return sorted((a, s, t) for a, s, t in await conn.execute(query))


async def test_a_backup_is_a_private_verified_file_listed_with_its_checkpoints(
    engine: AsyncEngine, wal_dir: Path, wal_id: uuid.UUID, open_writer: Any, tmp_path: Path
) -> None:
    writer = open_writer()
    await journal_attempt(writer, 20)
    await flush(engine, wal_dir, wal_id, writer)
    target = tmp_path / "backups"

    result = await backup(engine, target)

    assert result.status == "ok", result.error
    [listed] = list_backups(target)
    path = target / listed.name
    assert listed.name == result.found["file"]
    assert listed.verified
    assert listed.kind == engine.dialect.name
    assert listed.size == path.stat().st_size == result.bytes
    assert listed.checkpoints == {str(wal_id): writer.end.lsn - 1}
    for made in (path, target / f"{listed.name}.json"):
        assert stat.S_IMODE(made.stat().st_mode) == 0o600
    assert stat.S_IMODE(target.stat().st_mode) == 0o700
    assert sorted(p.name for p in target.iterdir()) == [listed.name, f"{listed.name}.json"]


async def test_restore_brings_back_the_backup_and_replays_the_wal_journaled_since(
    engine: AsyncEngine, wal_dir: Path, wal_id: uuid.UUID, open_writer: Any, tmp_path: Path
) -> None:
    target = tmp_path / "backups"
    writer = open_writer(segment_max_bytes=2048)
    before = [await journal_attempt(writer, 30) for _ in range(3)]
    await flush(engine, wal_dir, wal_id, writer)
    made = await backup(engine, target)
    after = [await journal_attempt(writer, 30) for _ in range(3)]
    await flush(engine, wal_dir, wal_id, writer)
    await writer.close()
    everything = await token_rows(engine)
    assert {a for a, _, _ in everything} == {*before, *after}
    async with engine.begin() as conn:  # the disaster: the store loses its contents
        await conn.execute(sa.delete(llm_token_log))
        await conn.execute(sa.text("DELETE FROM llm_attempts"))
        await conn.execute(sa.delete(llm_requests))

    async with backups.exclusive(engine, wal_dir, force=False) as replay:
        result = (
            await backups.restore(
                engine, target, wal_dir, made.found["file"], replay, wal_policy(), flush_policy()
            )
        ).found

    assert await token_rows(engine) == everything  # both phases, each token once
    assert result["replayed"] == writer.end.lsn - 1 - made.found["checkpoints"][str(wal_id)]
    assert "missing" not in result
    again = await replay_wal(engine, wal_dir, "restore", wal_policy(), flush_policy())
    assert again["replayed"] == 0
    assert await token_rows(engine) == everything


async def test_restore_refuses_while_a_daemon_holds_the_wal_unless_forced(
    engine: AsyncEngine, wal_dir: Path, tmp_path: Path
) -> None:
    target = tmp_path / "backups"
    made = await backup(engine, target)
    lock = WalLock(wal_dir)
    lock.acquire()
    try:
        with pytest.raises(RestoreRefused, match=r"refusing to restore: .*--force"):
            async with backups.exclusive(engine, wal_dir, force=False):
                raise AssertionError("not refused")
        async with backups.exclusive(engine, wal_dir, force=True) as replay:
            forced = await backups.restore(
                engine, target, wal_dir, made.found["file"], replay, wal_policy(), flush_policy()
            )
    finally:
        lock.release()
    assert replay is False
    assert forced.found["replay"] == "left to the running daemon's restart"


async def test_restore_keeps_the_provider_switches_keys_and_teams_in_force(
    engine: AsyncEngine, wal_dir: Path, tmp_path: Path
) -> None:
    """They are operational state, not data: a key revoked since must stay revoked."""
    target = tmp_path / "backups"
    await set_provider_enabled(engine, "openai", enabled=True)
    await set_provider_enabled(engine, "mock", enabled=False)
    await keys.create_team(engine, keys.TeamSpec(name="search", rpm=10))
    leaked, _ = await keys.create_key(engine, keys.KeySpec(name="leaked", team="search"))
    rotated, old_secret = await keys.create_key(engine, keys.KeySpec(name="rotated"))
    made = await backup(engine, target)
    # Since the backup: switches flipped, a key revoked, one rotated, one made, limits changed.
    await set_provider_enabled(engine, "openai", enabled=False)
    await set_provider_enabled(engine, "mock", enabled=True)
    await keys.revoke_key(engine, "leaked")
    _, new_secret = await keys.rotate_key(engine, "rotated")
    fresh, _ = await keys.create_key(engine, keys.KeySpec(name="fresh"))
    await keys.update_team(engine, "search", keys.TeamUpdate(rpm=5))
    in_force = await keys.list_keys(engine), await keys.list_teams(engine)

    async with backups.exclusive(engine, wal_dir, force=False) as replay:
        result = await backups.restore(
            engine, target, wal_dir, made.found["file"], replay, wal_policy(), flush_policy()
        )

    states = await provider_states(engine)
    assert {name: row["enabled"] for name, row in states.items()} == {
        "openai": False,
        "mock": True,
    }
    assert (await keys.list_keys(engine), await keys.list_teams(engine)) == in_force
    assert (await keys.show_key(engine, "leaked"))["state"] == "revoked"
    async with engine.connect() as conn:
        hashes = set((await conn.scalars(sa.select(api_keys.c.secret_hash))).all())
    assert keys.secret_hash(new_secret) in hashes
    assert keys.secret_hash(old_secret) not in hashes
    assert result.found["kept"].startswith("the provider switches, keys and teams in force")
    assert result.found["backup_had"] == {
        "provider openai": "enabled",
        "provider mock": "disabled",
        f"key leaked ({leaked['id']})": "not revoked (revoked since)",
        f"key rotated ({rotated['id']})": "its old secret (rotated since)",
        f"key fresh ({fresh['id']})": "no such key (created since)",
        "team search": "other limits",
    }


async def test_a_store_that_cannot_be_read_is_restored_with_the_backups_switches(
    engine: AsyncEngine, wal_dir: Path, tmp_path: Path
) -> None:
    """The reason to restore may be that the store is broken: the restore goes on, and says so."""
    target = tmp_path / "backups"
    await set_provider_enabled(engine, "mock", enabled=False)
    made = await backup(engine, target)
    async with engine.begin() as conn:  # the store has lost them
        for table in ("api_keys", "teams", "provider_status"):
            await conn.exec_driver_sql(f"DROP TABLE {table}")

    async with backups.exclusive(engine, wal_dir, force=False) as replay:
        result = await backups.restore(
            engine, target, wal_dir, made.found["file"], replay, wal_policy(), flush_policy()
        )

    assert result.found["kept"].startswith("nothing: the store could not be read")
    assert "the backup's provider switches, keys and teams are in force" in result.found["kept"]
    assert not (await provider_states(engine))["mock"]["enabled"]


@pytest.mark.parametrize("database_url", ["postgresql"], indirect=True)
async def test_restore_refuses_while_a_daemon_session_uses_the_database(
    engine: AsyncEngine, database_url: str, wal_dir: Path, tmp_path: Path
) -> None:
    target = tmp_path / "backups"
    await backup(engine, target)
    daemon = create_engine(database_url, DAEMON_APPLICATION)  # as a daemon on another host
    try:
        async with daemon.connect() as conn:
            await conn.execute(sa.text("SELECT 1"))
            with pytest.raises(RestoreRefused, match="1 llmsvc daemon session"):
                async with backups.exclusive(engine, wal_dir, force=False):
                    raise AssertionError("not refused")
    finally:
        await daemon.dispose()


@pytest.mark.parametrize("database_url", ["postgresql"], indirect=True)
async def test_the_password_reaches_pg_dump_in_its_environment_never_its_arguments(
    engine: AsyncEngine, database_url: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    secret = f"pw-{uuid.uuid4().hex}"
    seen = tmp_path / "seen"
    real_tool = pgtools.pg_tool
    wrapper = tmp_path / "wrapper.py"
    wrapper.write_text(
        "import json, os, sys\n"
        f"with open({str(seen)!r}, 'a') as f:\n"
        "    f.write(json.dumps([sys.argv, os.environ.get('PGPASSWORD')]) + '\\n')\n"
        "os.execv(sys.argv[1], sys.argv[1:])\n"
    )

    def logged(name: str) -> str:
        script = tmp_path / f"{name}.sh"
        script.write_text(f'#!/bin/sh\nexec {sys.executable} {wrapper} {real_tool(name)} "$@"\n')
        script.chmod(0o700)
        return str(script)

    monkeypatch.setattr(pgtools, "pg_tool", logged)
    user, at, rest = database_url.partition("://")[2].partition("@")
    with_password = f"postgresql+asyncpg://{user.split(':')[0]}:{secret}@{rest}"
    as_user = create_engine(with_password)  # the test cluster trusts local logins
    try:
        result = await backup(as_user, tmp_path / "backups")
    finally:
        await as_user.dispose()

    assert at
    assert result.status == "ok", result.error
    calls = [orjson.loads(line) for line in seen.read_text().splitlines()]
    assert [Path(argv[1]).name for argv, _ in calls] == ["pg_dump", "pg_restore"]
    assert all(secret not in " ".join(argv) for argv, _ in calls)
    assert calls[0][1] == secret  # pg_dump got it, in PGPASSWORD


@pytest.mark.parametrize("database_url", ["postgresql"], indirect=True)
async def test_a_failed_backup_is_a_failed_run_with_the_tools_message(
    engine: AsyncEngine, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    failing = tmp_path / "pg_dump"
    failing.write_text('#!/bin/sh\necho "pg_dump: error: connection refused" >&2\nexit 1\n')
    failing.chmod(0o700)
    monkeypatch.setattr(pgtools, "pg_tool", lambda name: str(failing))

    result = await run_job(engine, "backup", lambda: backup(engine, tmp_path / "b"), None)

    assert result is not None
    assert result.status == "failed"
    assert result.error == "BackupError: pg_dump exited 1: pg_dump: error: connection refused"
    (run,) = await history(engine, ("backup",), 5)
    assert (run["status"], run["error"]) == ("failed", result.error)
    assert list((tmp_path / "b").iterdir()) == []  # no half-written file is left


def _age(target: Path, name: str, days: int) -> None:
    meta = target / f"{name}.json"
    described = orjson.loads(meta.read_bytes())
    described["created"] = (datetime.now(UTC) - timedelta(days=days)).isoformat()
    meta.write_bytes(orjson.dumps(described))


@pytest.mark.parametrize("database_url", ["sqlite"], indirect=True)
async def test_cleanup_removes_old_backups_but_keeps_the_newest_verified(
    engine: AsyncEngine, tmp_path: Path
) -> None:
    target = tmp_path / "backups"
    oldest, old, young = [(await backup(engine, target)).found["file"] for _ in range(3)]
    _age(target, oldest, 40)
    _age(target, old, 35)
    meta = target / f"{young}.json"
    meta.write_bytes(meta.read_bytes().replace(b'"verified": true', b'"verified": false'))

    result = cleanup(target, 30)

    assert result.repaired["removed"] == [oldest]
    assert sorted(b.name for b in list_backups(target)) == sorted([old, young])
    assert not (target / oldest).exists()
    assert not (target / f"{oldest}.json").exists()


@pytest.mark.parametrize(
    "name",
    ["../llmsvc.db", "/etc/passwd", ".hidden", "llmsvc-x.txt", "other.dump", "", "a/b.dump"],
)
def test_a_backup_name_that_leads_elsewhere_is_refused(tmp_path: Path, name: str) -> None:
    (tmp_path / "b").mkdir()
    with pytest.raises(BackupError):
        backup_path(tmp_path / "b", name)


def test_a_missing_backup_is_named_in_the_error(tmp_path: Path) -> None:
    with pytest.raises(BackupError, match=r"no backup 'llmsvc-20260101T000000Z\.dump'"):
        backup_path(tmp_path, "llmsvc-20260101T000000Z.dump")
    assert not os.listdir(tmp_path)

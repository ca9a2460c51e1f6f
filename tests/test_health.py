"""`/api/health` and `/api/ready` on a real daemon: catching up, serving, detail, draining."""

from __future__ import annotations

import asyncio
import signal
import sqlite3
import time
import urllib.request
import uuid
from pathlib import Path

import pytest
from daemon_process import (
    CAUGHT_UP,
    DaemonProcess,
    daemon_env,
    get_json,
    read_store,
    run_async,
    run_cli,
)
from policies import wal_policy

from llmsvc import __version__
from llmsvc.gateway.journal import Journal
from llmsvc.wal.segment import instance_id
from llmsvc.wal.writer import WalWriter

pytestmark = pytest.mark.timeout(120)

JOBS = ["prune", "backup", "backup-cleanup", "wal-housekeeping", "gap-scan", "prune-sessions"]


async def journal_backlog(wal_dir: Path, tokens: int) -> None:
    """What a crash leaves: `tokens` journaled tokens the database has not seen."""
    writer = WalWriter(wal_dir, instance_id(wal_dir), wal_policy())
    writer.open(asyncio.get_running_loop(), lambda exc: None)
    journal = Journal(writer)
    for _ in range(tokens // 1000):
        request_id, attempt_id = uuid.uuid4(), uuid.uuid4()
        journal.request_start(request_id, uuid.uuid4(), "mock", True, [], {})
        journal.attempt_start(attempt_id, request_id, 1, "mock", "mock")
        for first in range(0, 1000, 50):
            journal.tokens(attempt_id.bytes, first, [f"t{first + i} " for i in range(50)])
        journal.attempt_end(attempt_id, status="completed", token_count=1000)
        await asyncio.shield(journal.request_end(request_id, status="completed"))
    await writer.close()


def test_ready_at_once_while_health_says_what_the_catch_up_waits_for(
    sqlite_url: str, tmp_path: Path
) -> None:
    """The daemon serves as soon as its WAL is open; the store catches up when it can.

    Another connection holds SQLite's write lock through the boot, so the
    catch-up (migrations, then the previous run's WAL) waits: ready, a request
    served, and health says what the catch-up waits for; once the lock is gone
    the catch-up ends and everything is stored.
    """
    wal_dir = tmp_path / "wal"
    wal_dir.mkdir()
    run_async(lambda: journal_backlog(wal_dir, 20_000))  # a previous run's, not stored yet
    holder = sqlite3.connect(sqlite_url.partition(":///")[2], isolation_level=None)
    holder.execute("BEGIN EXCLUSIVE")
    env = daemon_env(sqlite_url, wal_dir, database_timeout_seconds=1)
    try:
        with DaemonProcess(env) as daemon:
            ready = get_json(f"{daemon.base_url}/api/ready")
            deadline = time.monotonic() + 10
            while (
                "waiting" not in (health := get_json(f"{daemon.base_url}/api/health")[1])["reason"]
            ):
                assert time.monotonic() < deadline, health
                time.sleep(0.1)
            chat = urllib.request.Request(
                f"{daemon.base_url}/v1/chat/completions",
                data=b'{"model": "mock", "messages": [{"role": "user", "content": "hi"}]}',
                headers={"content-type": "application/json"},
            )
            with urllib.request.urlopen(chat, timeout=10) as response:
                served = (response.status, response.headers["x-request-id"])
            holder.rollback()
            daemon.wait_for_log(CAUGHT_UP, 30)
            assert daemon.stop() == 0, daemon.log
    finally:
        holder.close()

    assert ready == (200, {"ready": True, "reason": None})
    assert health["status"] == "degraded"
    assert health["reason"].startswith("catching up with the database: migrating the database")
    assert "database is locked" in health["reason"]
    assert health["database"]["connected"] is False
    assert served[0] == 200
    store = read_store(sqlite_url)
    assert len(store.requests) == 20 + 1
    assert {r["status"] for r in store.requests.values()} == {"completed"}


def test_health_reports_every_part_of_the_daemon(sqlite_url: str, tmp_path: Path) -> None:
    env = daemon_env(sqlite_url, tmp_path / "wal", backup_dir=tmp_path / "backups")
    with DaemonProcess(env) as daemon:
        daemon.wait_for_log(CAUGHT_UP)
        _, before = get_json(f"{daemon.base_url}/api/health")
        assert run_cli(env, "backup").returncode == 0
        chat = urllib.request.Request(
            f"{daemon.base_url}/v1/chat/completions",
            data=b'{"model": "mock", "messages": [{"role": "user", "content": "hi"}]}',
            headers={"content-type": "application/json"},
        )
        urllib.request.urlopen(chat, timeout=10).close()
        time.sleep(0.3)  # a flush interval or more
        code, health = get_json(f"{daemon.base_url}/api/health")
        ready_code, ready = get_json(f"{daemon.base_url}/api/ready")
        assert daemon.stop() == 0, daemon.log

    assert before["last_backup"] is None
    assert (code, health["status"]) == (200, "ok")
    assert (ready_code, ready) == (200, {"ready": True, "reason": None})
    assert health["version"] == __version__
    assert health["uptime_seconds"] > 0
    assert health["providers"] == [
        {"name": "mock", "enabled": True, "circuit": "closed", "attempts": {"completed": 1}}
    ]
    assert health["database"]["connected"] is True
    assert health["database"]["last_check"] is not None
    assert health["database"]["last_flush"] is not None  # it answered
    assert health["database"]["last_error"] is None
    wal = health["wal"]
    assert wal["segments"] >= 1
    assert wal["bytes"] > 0
    assert wal["backlog_records"] == 0
    assert wal["backlog_seconds"] == 0
    assert list(health["scheduler"]) == JOBS
    assert all(job["next_run"] for job in health["scheduler"].values())
    assert health["scheduler"]["backup"]["schedule"] == "0 2 * * *"
    assert health["last_backup"]["file"].startswith("llmsvc-")
    assert health["shutdown"] == {"draining": False, "fatal": ""}


def test_a_sigterm_during_the_replay_ends_the_daemon_and_the_replay_is_finished(
    sqlite_url: str, tmp_path: Path
) -> None:
    """SIGTERM lets the catch-up's replay go on within the drain's bound; a next boot ends it."""
    wal_dir = tmp_path / "wal"
    wal_dir.mkdir()
    run_async(lambda: journal_backlog(wal_dir, 200_000), timeout=120)
    env = daemon_env(sqlite_url, wal_dir)
    daemon = DaemonProcess(env).start()
    try:
        daemon.signal(signal.SIGTERM)  # the replay is under way (200 requests of 1,000 tokens)
        stopped = time.monotonic()
        assert daemon.wait(30) == 0, daemon.log
        took = time.monotonic() - stopped
    finally:
        if daemon.returncode is None:
            daemon.kill()
    assert "boot: wal replayed" not in daemon.log.split("SIGTERM received")[0]
    assert took < 10

    with DaemonProcess(env) as again:
        assert again.stop() == 0, again.log
    store = read_store(sqlite_url)
    assert len(store.requests) == 200
    assert {r["status"] for r in store.requests.values()} == {"completed"}

"""`/api/health` and `/api/ready` on a real daemon: booting, serving, detail, draining."""

from __future__ import annotations

import asyncio
import signal
import time
import urllib.error
import urllib.request
import uuid
from pathlib import Path

import pytest
from daemon_process import DaemonProcess, daemon_env, get_json, read_store, run_async, run_cli

from llmsvc import __version__
from llmsvc.gateway.journal import Journal
from llmsvc.wal.segment import instance_id
from llmsvc.wal.writer import WalWriter

pytestmark = pytest.mark.timeout(120)

JOBS = ["prune", "backup", "backup-cleanup", "wal-housekeeping", "gap-scan"]


async def journal_backlog(wal_dir: Path, tokens: int) -> None:
    """What a crash leaves: `tokens` journaled tokens the database has not seen."""
    writer = WalWriter(wal_dir, instance_id(wal_dir))
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


def test_ready_is_503_while_the_wal_replays_and_health_says_booting(
    sqlite_url: str, tmp_path: Path
) -> None:
    wal_dir = tmp_path / "wal"
    wal_dir.mkdir()
    run_async(lambda: journal_backlog(wal_dir, 200_000), timeout=120)
    seen: list[tuple[int, str]] = []
    daemon = DaemonProcess(daemon_env(sqlite_url, wal_dir)).start(wait_ready=False)
    try:
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            try:
                code, ready = get_json(f"{daemon.base_url}/api/ready")
                _, health = get_json(f"{daemon.base_url}/api/health")
            except (urllib.error.URLError, ConnectionError):
                time.sleep(0.02)  # not listening yet
                continue
            seen.append((code, health["status"]))
            if code == 200:
                break
            assert "starting" in ready["reason"]
            time.sleep(0.02)
        daemon.wait_for_log(r"\bready host=")
        assert daemon.stop() == 0, daemon.log
    finally:
        if daemon.returncode is None:
            daemon.kill()

    assert (503, "booting") in seen
    assert seen[-1] == (200, "ok")


def test_health_reports_every_part_of_the_daemon(sqlite_url: str, tmp_path: Path) -> None:
    env = daemon_env(sqlite_url, tmp_path / "wal", backup_dir=tmp_path / "backups")
    with DaemonProcess(env) as daemon:
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


def test_a_sigterm_during_the_replay_stops_the_boot_and_the_next_boot_finishes_it(
    sqlite_url: str, tmp_path: Path
) -> None:
    wal_dir = tmp_path / "wal"
    wal_dir.mkdir()
    run_async(lambda: journal_backlog(wal_dir, 200_000), timeout=120)
    env = daemon_env(sqlite_url, wal_dir)
    daemon = DaemonProcess(env).start(wait_ready=False)
    try:
        daemon.wait_for_log(r"\bUvicorn running\b", 30)  # HTTP is up: the replay is under way
        daemon.signal(signal.SIGTERM)
        stopped = time.monotonic()
        assert daemon.wait(30) == 0, daemon.log
        took = time.monotonic() - stopped
    finally:
        if daemon.returncode is None:
            daemon.kill()
    assert "ready host=" not in daemon.log
    assert took < 10

    with DaemonProcess(env) as again:
        assert again.stop() == 0, again.log
    store = read_store(sqlite_url)
    assert len(store.requests) == 200
    assert {r["status"] for r in store.requests.values()} == {"completed"}

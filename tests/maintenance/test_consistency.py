"""The consistency check on real SQLite and PostgreSQL, over a real WAL."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
import uuid
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from policies import wal_policy
from processes import alive, children, wait_until
from sqlalchemy.ext.asyncio import AsyncEngine
from store_steps import delete_seqs, flush, journal_attempt

from llmsvc.maintenance.consistency import as_result, in_child_process, run_check, wal_state
from llmsvc.maintenance.runs import history, record_run
from llmsvc.store.engine import create_engine, upgrade_to_head
from llmsvc.wal.segment import instance_id, list_segments
from llmsvc.wal.writer import WalWriter


async def test_a_store_that_matches_its_wal_is_consistent(
    engine: AsyncEngine, wal_dir: Path, wal_id: uuid.UUID, open_writer: Any
) -> None:
    writer = open_writer()
    await journal_attempt(writer, 10)
    await flush(engine, wal_dir, wal_id, writer)
    report = await run_check(engine, wal_dir)
    assert report.ok, report.problems
    assert report.gaps == []
    assert report.mismatches == []
    assert report.wal is not None
    assert report.wal.backlog == 0
    assert report.wal.last_lsn == report.wal.checkpoint == 10 + 4  # tokens + lifecycle records


async def test_holes_in_an_attempts_seqs_are_reported_with_their_ranges(
    engine: AsyncEngine, wal_dir: Path, wal_id: uuid.UUID, open_writer: Any
) -> None:
    writer = open_writer()
    damaged = await journal_attempt(writer, 10)
    intact = await journal_attempt(writer, 4)
    await flush(engine, wal_dir, wal_id, writer)
    await delete_seqs(engine, damaged, [0, 3, 4, 5, 9])

    report = await run_check(engine, wal_dir)

    assert not report.ok
    assert [(g.attempt_id, g.missing) for g in report.gaps] == [(str(damaged), [(0, 0), (3, 5)])]
    assert [(m.attempt_id, m.recorded, m.stored) for m in report.mismatches] == [
        (str(damaged), 10, 5)
    ]
    assert str(intact) not in " ".join(report.problems)
    assert any("missing token seqs 0, 3-5" in p for p in report.problems)


async def test_journaled_records_missing_from_the_database_are_a_problem_while_no_daemon_runs(
    engine: AsyncEngine, wal_dir: Path, wal_id: uuid.UUID, open_writer: Any
) -> None:
    writer = open_writer()
    await journal_attempt(writer, 3)  # journaled, never flushed
    report = await run_check(engine, wal_dir)
    assert report.wal is not None
    assert report.wal.backlog == 3 + 4  # tokens + lifecycle records
    assert any("7 journaled records are not in the database" in p for p in report.problems)


async def test_each_run_is_stored_with_what_it_found(
    engine: AsyncEngine, wal_dir: Path, wal_id: uuid.UUID, open_writer: Any
) -> None:
    writer = open_writer()
    damaged = await journal_attempt(writer, 6)
    await flush(engine, wal_dir, wal_id, writer)
    await record_run(
        engine, "check", wal_id, datetime.now(UTC), as_result(await run_check(engine, wal_dir), {})
    )
    await delete_seqs(engine, damaged, [2])
    await record_run(
        engine, "check", wal_id, datetime.now(UTC), as_result(await run_check(engine, wal_dir), {})
    )

    runs = await history(engine, ("check",), 10)

    assert [r["status"] for r in runs] == ["problems", "ok"]  # newest first
    assert runs[0]["found"]["gaps"] == [{"attempt_id": str(damaged), "missing": [[2, 2]]}]
    assert runs[1]["found"]["ok"] is True


def test_llmsvc_check_exits_1_naming_the_gap_and_keeps_a_history(tmp_path: Path) -> None:
    env = {**os.environ, "XDG_STATE_HOME": str(tmp_path)}
    for key in [k for k in env if k.startswith("LLMSVC_") and not k.startswith("LLMSVC_TEST")]:
        del env[key]

    def llmsvc(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [sys.executable, "-m", "llmsvc.cli", *args],
            env=env,
            capture_output=True,
            text=True,
            timeout=60,
        )

    async def prepare() -> uuid.UUID:
        db = tmp_path / "llmsvc" / "llmsvc.db"
        engine = create_engine(f"sqlite+aiosqlite:///{db}")
        await upgrade_to_head(engine)
        wal_dir = tmp_path / "llmsvc" / "wal"
        wal_dir.mkdir(parents=True)
        wal_id = instance_id(wal_dir)
        writer = WalWriter(wal_dir, wal_id, wal_policy())
        writer.open(asyncio.get_running_loop(), lambda exc: None)
        attempt = await journal_attempt(writer, 8)
        await flush(engine, wal_dir, wal_id, writer)
        await writer.close()
        for segment in list_segments(wal_dir):  # so the gap cannot be refilled from the WAL
            segment.path.unlink()
        await delete_seqs(engine, attempt, [6])
        await engine.dispose()
        return attempt

    attempt = asyncio.run(prepare())

    done = llmsvc("check")
    assert done.returncode == 1, done.stderr
    assert f"attempt {attempt} is missing token seqs 6" in done.stdout
    as_json = llmsvc("check", "--json")
    assert as_json.returncode == 1
    assert json.loads(as_json.stdout)["gaps"] == [{"attempt_id": str(attempt), "missing": [[6, 6]]}]
    runs = llmsvc("check", "--history", "--json")
    assert runs.returncode == 0
    assert [r["status"] for r in json.loads(runs.stdout)] == ["problems", "problems"]


async def test_the_wal_is_scanned_in_a_child_process_with_the_same_findings(
    wal_dir: Path, wal_id: uuid.UUID, open_writer: Any
) -> None:
    """The scan holds the GIL for seconds on a big log: it runs away from the event loop."""
    writer = open_writer()
    await journal_attempt(writer, 20)
    await writer.close()
    assert await in_child_process(os.getpid) != os.getpid()
    in_child, here = await in_child_process(wal_state, wal_dir), wal_state(wal_dir)
    assert in_child == here
    assert (in_child[0].last_lsn, in_child[1]) == (20 + 4, wal_id)


def test_a_scan_child_ends_when_its_daemon_is_killed_outright() -> None:
    """A daemon killed (SIGKILL, the OOM killer) mid-scan leaves no child behind, holding
    its output and reading its WAL: it was found left over by the crash harness."""
    scan = (
        "import asyncio, time\n"
        "from llmsvc.maintenance.consistency import in_child_process\n"
        "asyncio.run(in_child_process(time.sleep, 60))\n"
    )
    daemon = subprocess.Popen([sys.executable, "-c", scan])
    try:
        [child] = wait_until(lambda: children(daemon.pid, "spawn_main"), "the scan's child", 20)
    finally:
        daemon.kill()
        daemon.wait()
    try:
        wait_until(lambda: not alive(child), f"scan child {child} gone with its daemon", 20)
    finally:
        if alive(child):
            os.kill(child, signal.SIGKILL)

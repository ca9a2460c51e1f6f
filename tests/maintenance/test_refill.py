"""Token holes refilled from the WAL, on real SQLite and PostgreSQL, over a real WAL.

Rows are written by the real flusher, then deleted with SQL to make holes; the
refill must put back exactly what was journaled, and name what it cannot.
"""

from __future__ import annotations

import asyncio
import json
import logging
import shutil
import uuid
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest
import sqlalchemy as sa
from daemon_process import DaemonProcess, daemon_env, run_cli
from sqlalchemy.ext.asyncio import AsyncEngine
from store_steps import delete_seqs, flush

from llmsvc.gateway.journal import Journal
from llmsvc.maintenance.consistency import (
    CountMismatch,
    Gap,
    as_result,
    check_and_repair,
    run_check,
)
from llmsvc.maintenance.runs import history, record_run
from llmsvc.maintenance.wal_housekeeping import housekeep
from llmsvc.store.schema import llm_token_log
from llmsvc.wal.segment import list_segments
from llmsvc.wal.writer import WalWriter

pytestmark = pytest.mark.timeout(120)

WORDS = ["Grüße, ", "naïve café ", "日本語の", "nul\x00byte ", "🚀✨", " — «done»"]
SMALL_SEGMENT = 4096  # an attempt of LONG tokens fills it; one of short tokens does not
LONG = 500


def texts(n: int, prefix: str = "t", pad: int = 0) -> list[str]:
    """n distinct texts, non-ASCII and one U+0000 among them (PostgreSQL stores U+FFFD)."""
    return [f"{prefix}{i}·{WORDS[i % len(WORDS)]}" + "x" * pad for i in range(n)]


async def journal_attempt(
    writer: WalWriter, words: list[str], *, chunk: int = 3, ended: bool = True
) -> uuid.UUID:
    """One request whose attempt streamed `words` (seq 0..n-1) in upstream chunks of `chunk`.

    `ended=False` leaves it in flight: no end records, so no recorded token count.
    """
    journal = Journal(writer)
    request_id, attempt_id = uuid.uuid4(), uuid.uuid4()
    journal.request_start(request_id, uuid.uuid4(), "m", True, [], {})
    journal.attempt_start(attempt_id, request_id, 1, "p", "m")
    last = None
    for at in range(0, len(words), chunk):
        last = journal.tokens(attempt_id.bytes, at, words[at : at + chunk])
    if ended:
        journal.attempt_end(attempt_id, status="completed", token_count=len(words))
        last = journal.request_end(request_id, status="completed")
    assert last is not None
    await asyncio.shield(last)
    return attempt_id


Rows = list[tuple[uuid.UUID, int, str, datetime]]


async def token_rows(engine: AsyncEngine, attempt_id: uuid.UUID | None = None) -> Rows:
    """Every stored token (attempt, seq, text, time as aware UTC), in key order."""
    query = sa.select(llm_token_log).order_by(llm_token_log.c.attempt_id, llm_token_log.c.seq)
    if attempt_id is not None:
        query = query.where(llm_token_log.c.attempt_id == attempt_id)
    async with engine.connect() as conn:
        return [
            (a, s, t, c if c.tzinfo else c.replace(tzinfo=UTC))
            for a, s, t, c in await conn.execute(query)
        ]


def by_attempt(repaired: dict[str, Any]) -> dict[str, tuple[list[list[int]], int]]:
    return {r["attempt_id"]: (r["seqs"], r["rows"]) for r in repaired["refilled"]}


async def old_and_new(
    engine: AsyncEngine, wal_dir: Path, wal_id: uuid.UUID, open_writer: Any
) -> tuple[uuid.UUID, uuid.UUID, Rows]:
    """`old` (10 tokens) in a segment housekeeping has deleted, `new` (6) in the newest one.

    Returns both attempt ids and every stored token row, taken before any damage.
    """
    writer = open_writer(segment_max_bytes=SMALL_SEGMENT)
    old = await journal_attempt(writer, texts(10, "old", LONG), chunk=10)  # one batch, then rotate
    new = await journal_attempt(writer, texts(6, "new"))
    assert len(list_segments(wal_dir)) == 2
    await flush(engine, wal_dir, wal_id, writer)
    await housekeep(engine, wal_dir, wal_id, wal_dir.parent / "no-backups")
    assert len(list_segments(wal_dir)) == 1  # old's tokens are gone from the WAL
    await writer.close()
    return old, new, await token_rows(engine)


async def test_holes_still_in_the_wal_are_refilled_with_the_journaled_rows(
    engine: AsyncEngine, wal_dir: Path, wal_id: uuid.UUID, open_writer: Any
) -> None:
    writer = open_writer()
    middle = await journal_attempt(writer, texts(12))
    leading = await journal_attempt(writer, texts(8))
    trailing = await journal_attempt(writer, texts(10))
    intact = await journal_attempt(writer, texts(4))
    await flush(engine, wal_dir, wal_id, writer)
    before = await token_rows(engine)
    await delete_seqs(engine, middle, [3, 4, 5, 9])
    await delete_seqs(engine, leading, [0, 1, 2])
    await delete_seqs(engine, trailing, [7, 8, 9])
    damaged = await run_check(engine, wal_dir)  # the holes are there, the trailing one by count
    assert {g.attempt_id: g.missing for g in damaged.gaps} == {
        str(middle): [(3, 5), (9, 9)],
        str(leading): [(0, 2)],
    }
    assert CountMismatch(str(trailing), 10, 7, (7, 9)) in damaged.mismatches

    started = datetime.now(UTC)
    report, repaired = await check_and_repair(engine, wal_dir)

    assert report.ok, report.problems
    assert (report.gaps, report.mismatches) == ([], [])
    assert await token_rows(engine) == before  # same texts, seqs and times as the flusher wrote
    assert by_attempt(repaired) == {
        str(middle): ([[3, 5], [9, 9]], 4),
        str(leading): ([[0, 2]], 3),
        str(trailing): ([[7, 9]], 3),
    }
    assert str(intact) not in json.dumps(repaired)
    await record_run(engine, "check", wal_id, started, as_result(report, repaired))
    (run,) = await history(engine, ("check",), 10)
    assert (run["status"], run["repaired"]) == ("ok", repaired)

    again, nothing = await check_and_repair(engine, wal_dir)
    assert (again.ok, nothing) == (True, {})
    assert await token_rows(engine) == before


async def test_only_the_missing_seqs_of_attempts_with_holes_are_refilled(
    engine: AsyncEngine, wal_dir: Path, wal_id: uuid.UUID, open_writer: Any
) -> None:
    writer = open_writer()
    holed = await journal_attempt(writer, texts(8), ended=False)
    unholed = await journal_attempt(writer, texts(5), ended=False)
    await flush(engine, wal_dir, wal_id, writer)
    before = await token_rows(engine)
    # In flight, so no recorded count: a missing tail is no hole anyone can know of.
    await delete_seqs(engine, holed, [2, 6, 7])
    await delete_seqs(engine, unholed, [3, 4])

    report, repaired = await check_and_repair(engine, wal_dir)

    assert report.ok, report.problems
    assert by_attempt(repaired) == {str(holed): ([[2, 2]], 1)}
    assert [r[1] for r in await token_rows(engine, holed)] == [0, 1, 2, 3, 4, 5]
    assert await token_rows(engine, unholed) == [r for r in before if r[0] == unholed][:3]


async def test_holes_whose_segment_is_gone_are_reported_while_the_rest_is_refilled(
    engine: AsyncEngine, wal_dir: Path, wal_id: uuid.UUID, open_writer: Any
) -> None:
    old, new, before = await old_and_new(engine, wal_dir, wal_id, open_writer)
    await delete_seqs(engine, old, [0, 1, 4, 5, 9])
    await delete_seqs(engine, new, [2, 3, 5])

    started = datetime.now(UTC)
    report, repaired = await check_and_repair(engine, wal_dir)

    assert repaired == {"refilled": [{"attempt_id": str(new), "seqs": [[2, 3], [5, 5]], "rows": 3}]}
    assert await token_rows(engine, new) == [r for r in before if r[0] == new]
    assert [r[1] for r in await token_rows(engine, old)] == [2, 3, 6, 7, 8]
    assert not report.ok
    assert report.gaps == [Gap(str(old), [(0, 1), (4, 5)])]
    assert report.mismatches == [CountMismatch(str(old), 10, 5, (9, 9))]
    assert report.problems == [
        f"attempt {old} is missing token seqs 0-1, 4-5",
        f"attempt {old} recorded 10 tokens but 5 are stored; missing token seqs 9 at the end",
    ]
    await record_run(engine, "check", wal_id, started, as_result(report, repaired))
    (run,) = await history(engine, ("check",), 10)
    assert run["status"] == "problems"
    assert run["repaired"] == repaired
    assert run["found"]["mismatches"][0]["missing_tail"] == [9, 9]


async def test_an_attempt_with_no_rows_left_is_refilled_or_named_whole(
    engine: AsyncEngine, wal_dir: Path, wal_id: uuid.UUID, open_writer: Any
) -> None:
    old, new, before = await old_and_new(engine, wal_dir, wal_id, open_writer)
    await delete_seqs(engine, old, list(range(10)))
    await delete_seqs(engine, new, list(range(6)))

    report, repaired = await check_and_repair(engine, wal_dir)

    assert by_attempt(repaired) == {str(new): ([[0, 5]], 6)}
    assert await token_rows(engine, new) == [r for r in before if r[0] == new]
    assert report.problems == [
        f"attempt {old} recorded 10 tokens but 0 are stored; missing token seqs 0-9 at the end"
    ]


async def test_a_segment_that_fails_its_header_check_is_skipped_not_trusted(
    engine: AsyncEngine,
    wal_dir: Path,
    wal_id: uuid.UUID,
    open_writer: Any,
    tmp_path: Path,
    caplog: pytest.LogCaptureFixture,
) -> None:
    writer = open_writer(segment_max_bytes=SMALL_SEGMENT)
    old = await journal_attempt(writer, texts(10, "old", LONG), chunk=10)
    segment, kept = list_segments(wal_dir)[0].path, tmp_path / "kept"
    shutil.copy(segment, kept)  # old's tokens, before housekeeping deletes the segment
    await journal_attempt(writer, texts(2))
    await flush(engine, wal_dir, wal_id, writer)
    await housekeep(engine, wal_dir, wal_id, tmp_path / "no-backups")
    await writer.close()
    assert not segment.exists()
    before = await token_rows(engine, old)
    await delete_seqs(engine, old, [3])
    damaged = bytearray(kept.read_bytes())
    damaged[0] ^= 0xFF  # the magic
    segment.write_bytes(damaged)

    with caplog.at_level(logging.WARNING, logger="llmsvc.wal.reader"):
        report, repaired = await check_and_repair(engine, wal_dir)

    assert repaired == {}
    assert report.problems == [
        f"WAL segment {segment.name}: header checksum mismatch",
        f"attempt {old} is missing token seqs 3",
        f"attempt {old} recorded 10 tokens but 9 are stored",
    ]
    assert f"refill: WAL segment skipped segment={segment.name}" in caplog.text
    shutil.copy(kept, segment)  # the same segment, intact: now it refills
    report, repaired = await check_and_repair(engine, wal_dir)
    assert report.ok, report.problems
    assert by_attempt(repaired) == {str(old): ([[3, 3]], 1)}
    assert await token_rows(engine, old) == before


async def test_llmsvc_check_refills_and_exits_0_then_exits_1_naming_what_the_wal_lost(
    engine: AsyncEngine, database_url: str, wal_dir: Path, wal_id: uuid.UUID, open_writer: Any
) -> None:
    old, new, _before = await old_and_new(engine, wal_dir, wal_id, open_writer)
    env = daemon_env(database_url, wal_dir)

    async def llmsvc(*args: str) -> Any:
        return await asyncio.to_thread(run_cli, env, *args, timeout=60)

    await delete_seqs(engine, new, [2])
    done = await llmsvc("check")
    assert done.returncode == 0, done.stdout + done.stderr
    assert f"refilled:        attempt {new} seqs 2 (1 rows)" in done.stdout
    assert "consistent" in done.stdout

    await delete_seqs(engine, new, [3, 4])
    done = await llmsvc("check", "--json")
    assert done.returncode == 0, done.stdout + done.stderr
    found = json.loads(done.stdout)
    assert found["ok"] is True
    assert found["repaired"] == {
        "refilled": [{"attempt_id": str(new), "seqs": [[3, 4]], "rows": 2}]
    }

    await delete_seqs(engine, old, [1])
    done = await llmsvc("check", "--json")
    assert done.returncode == 1, done.stdout + done.stderr
    found = json.loads(done.stdout)
    assert (found["ok"], found["repaired"]) == (False, {})
    assert found["gaps"] == [{"attempt_id": str(old), "missing": [[1, 1]]}]
    assert found["problems"] == [
        f"attempt {old} is missing token seqs 1",
        f"attempt {old} recorded 10 tokens but 9 are stored",
    ]
    done = await llmsvc("check")
    assert done.returncode == 1
    assert f"attempt {old} is missing token seqs 1" in done.stdout

    runs = json.loads((await llmsvc("check", "--history", "--json")).stdout)
    assert [r["status"] for r in runs] == ["problems", "problems", "ok", "ok"]
    assert runs[2]["repaired"] == found_repaired(new, [[3, 4]], 2)
    listed = await llmsvc("check", "--history")
    assert listed.stdout.count("refilled=1") == 2, listed.stdout


def found_repaired(attempt: uuid.UUID, seqs: list[list[int]], rows: int) -> dict[str, Any]:
    return {"refilled": [{"attempt_id": str(attempt), "seqs": seqs, "rows": rows}]}


async def test_the_daemon_refills_at_boot_and_logs_each_refill(
    engine: AsyncEngine, database_url: str, wal_dir: Path, wal_id: uuid.UUID, open_writer: Any
) -> None:
    writer = open_writer()
    attempt = await journal_attempt(writer, texts(6))
    await flush(engine, wal_dir, wal_id, writer)
    await writer.close()
    before = await token_rows(engine)
    await delete_seqs(engine, attempt, [1, 2, 4])

    def boot() -> tuple[int, str]:
        with DaemonProcess(daemon_env(database_url, wal_dir)) as daemon:
            return daemon.stop(), daemon.log

    code, log = await asyncio.to_thread(boot)

    assert code == 0, log
    assert f"boot: token gap refilled from the WAL attempt={attempt} seqs=1-2,4 rows=3" in log
    assert "boot: consistency check ok gaps=0 count_mismatches=0" in log
    assert await token_rows(engine) == before
    (run,) = await history(engine, ("check",), 10)
    assert run["repaired"] == found_repaired(attempt, [[1, 2], [4, 4]], 3)

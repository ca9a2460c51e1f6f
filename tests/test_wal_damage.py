"""A daemon booting on a damaged WAL: it starts, says and counts what it found, loses nothing else.

The log is written record by record, one record a segment, by the real writer, so
each kind of damage hits exactly one record: a flipped byte in an older segment, a
missing middle segment, a segment of another instance, a directory named like a
segment, and a torn last record. Then a real `llmsvc run` boots on it against
SQLite and PostgreSQL, and the log, the metrics port, the store and `llmsvc check`
are read as an operator would.
"""

from __future__ import annotations

import asyncio
import re
import urllib.request
import uuid
from pathlib import Path

import pytest
from daemon_process import DaemonProcess, daemon_env, read_store, run_async, run_cli
from policies import wal_policy

from llmsvc.gateway.journal import Journal
from llmsvc.wal.segment import HEADER_SIZE, encode_header, instance_id, list_segments
from llmsvc.wal.writer import WalWriter

pytestmark = pytest.mark.timeout(120)

A, B, C, D = (uuid.UUID(int=n) for n in (0xA, 0xB, 0xC, 0xD))  # request ids
ATTEMPT = {r: uuid.UUID(int=r.int << 8) for r in (A, B, C, D)}


async def journal_one_record_a_segment(wal_dir: Path) -> dict[str, int]:
    """Four requests, every record in a segment of its own; returns each record's LSN by name."""
    writer = WalWriter(wal_dir, instance_id(wal_dir), wal_policy(segment_max_bytes=1))
    writer.open(asyncio.get_running_loop(), lambda exc: None)
    journal = Journal(writer)
    lsns: dict[str, int] = {}

    async def put(name: str, fut: asyncio.Future[int] | None = None) -> None:
        await (fut if fut is not None else writer.append())
        lsns[name] = writer.appended_lsn

    for request in (A, B, C, D):
        tag, attempt = f"{request.int:X}", ATTEMPT[request]
        journal.request_start(request, uuid.uuid4(), "mock", True, [{"role": "user"}], {})
        await put(f"{tag} start", writer.append())
        journal.attempt_start(attempt, request, 1, "mock", "mock")
        await put(f"{tag} attempt", writer.append())
        for seq in range(3):
            await put(f"{tag} token {seq}", journal.tokens(attempt.bytes, seq, [f"{tag}{seq} "]))
        await put(f"{tag} attempt end", journal.attempt_end(attempt, status="completed"))
        await put(f"{tag} end", journal.request_end(request, status="completed"))
    await writer.close()
    # The writer starts a new segment after each record here; a crash tearing the
    # last record would have come before that last rotation.
    list_segments(wal_dir)[-1].path.unlink()
    return lsns


def segment_of(wal_dir: Path, lsn: int) -> Path:
    [segment] = [s for s in list_segments(wal_dir) if s.first_lsn == lsn]
    return segment.path


def scrape(port: int) -> str:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as response:
        return str(response.read().decode())


def sample(text: str, name: str) -> float:
    found = re.search(rf"^{re.escape(name)} (\S+)$", text, re.M)
    assert found, f"{name} not exported"
    return float(found.group(1))


def test_a_damaged_wal_boots_reports_counts_and_replays_only_valid_records(
    database_url: str, tmp_path: Path
) -> None:
    wal_dir = tmp_path / "wal"
    wal_dir.mkdir()
    lsns = run_async(lambda: journal_one_record_a_segment(wal_dir))
    # B's second token: a byte flipped inside its record, in an older segment.
    flipped = segment_of(wal_dir, lsns["B token 1"])
    data = bytearray(flipped.read_bytes())
    data[HEADER_SIZE + 12] ^= 0xFF
    flipped.write_bytes(data)
    # C's start: the whole segment is gone, so C's attempt has no request to belong to.
    segment_of(wal_dir, lsns["C start"]).unlink()
    # D's end, the last record: torn by the crash.
    torn = segment_of(wal_dir, lsns["D end"])
    torn.write_bytes(torn.read_bytes()[:-3])
    # Not part of this log: another instance's segment, and a directory named like one.
    foreign = wal_dir / f"{lsns['D end'] + 100:016x}.wal"
    foreign.write_bytes(encode_header(uuid.uuid4(), lsns["D end"] + 100))
    unreadable = segment_of(wal_dir, lsns["A token 2"]).with_name(f"{lsns['D end'] + 50:016x}.wal")
    unreadable.mkdir()

    env = daemon_env(database_url, wal_dir)
    with DaemonProcess(env) as daemon:
        port = int(daemon.wait_for_log(r"boot: metrics port=(\d+)").group(1))
        metrics = scrape(port)
        assert daemon.stop() == 0, daemon.log
    log = daemon.log

    # A torn last record never reached a client (it is sent once journaled): not lost.
    assert "wal repaired torn_tail=1 corrupt=1 quarantined=2 lost_records=2" in log, log
    for lsn in (lsns["B token 1"], lsns["C start"]):
        assert f"wal records lost lsn={lsn}..{lsn}" in log
    assert f"wal tail repaired segment={torn.name} " in log
    assert sample(metrics, 'llmsvc_wal_damage_total{kind="torn_tail"}') == 1
    assert sample(metrics, 'llmsvc_wal_damage_total{kind="corrupt"}') == 1
    assert sample(metrics, 'llmsvc_wal_damage_total{kind="bad_header"}') == 1
    assert sample(metrics, 'llmsvc_wal_damage_total{kind="unreadable"}') == 1
    assert sample(metrics, 'llmsvc_wal_damage_total{kind="overlap"}') == 0
    assert sample(metrics, "llmsvc_wal_lost_records_total") == 2

    # Moved or copied aside, never deleted.
    quarantine = sorted(p.name for p in (wal_dir / "quarantine").iterdir())
    assert quarantine == sorted(
        [f"{flipped.name}.from-{HEADER_SIZE}", foreign.name, unreadable.name]
    )
    assert (wal_dir / f"{torn.name}.broken").exists()

    store = read_store(database_url)
    tokens = {r: [t for _, t in store.tokens.get(ATTEMPT[r], [])] for r in (A, B, C, D)}
    assert tokens == {
        A: ["A0 ", "A1 ", "A2 "],
        B: ["B0 ", "B2 "],  # B1 was damaged: never replayed, reported as a gap below
        C: ["C0 ", "C1 ", "C2 "],
        D: ["D0 ", "D1 ", "D2 "],
    }
    assert store.request(A)["status"] == "completed"
    assert store.request(D)["status"] == "interrupted"  # its end was torn off
    assert store.only_attempt(C)["status"] == "completed"
    assert store.request(C)["status"] == "completed"  # its end was journaled
    assert "start record was lost" in store.request(C)["error"]
    assert store.request(C)["model"] == "mock"

    check = run_cli(env, "check")
    assert check.returncode == 1, check.stdout + check.stderr
    assert f"attempt {ATTEMPT[B]} is missing token seqs 1" in check.stdout
    assert "3 damaged WAL file(s) kept in" in check.stdout
    history = run_cli(env, "check", "--history")
    assert "lost" in history.stdout, history.stdout

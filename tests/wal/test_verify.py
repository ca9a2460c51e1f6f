"""`llmsvc wal verify` and `llmsvc wal dump` over real segments."""

from __future__ import annotations

import asyncio
import itertools
import json
import os
import subprocess
import sys
import uuid
from pathlib import Path
from typing import Any

from llmsvc.wal import codec
from llmsvc.wal.reader import verify_log
from llmsvc.wal.segment import HEADER_SIZE, list_segments


async def write_log(open_writer: Any, records: int, segment_max_bytes: int = 4096) -> bytes:
    """Journal `records` token records across several small segments; return the attempt id."""
    writer = open_writer(segment_max_bytes=segment_max_bytes)
    attempt = uuid.uuid4().bytes
    for seq in range(records):
        fut = writer.append(codec.encode_token(attempt, seq, 1_000 + seq, f"tok{seq} "))
        if seq % 10 == 9:
            await asyncio.shield(fut)
    await asyncio.shield(fut)
    await writer.close()
    return attempt


async def test_a_whole_log_verifies_clean_with_lsns_running_on(
    wal_dir: Path, open_writer: Any
) -> None:
    await write_log(open_writer, 400)
    checks = verify_log(wal_dir)
    assert len(checks) > 2
    assert [c.problem for c in checks] == [""] * len(checks)
    assert [(c.missing, c.damage) for c in checks] == [(None, None)] * len(checks)
    assert sum(c.records for c in checks) == 400
    for before, after in itertools.pairwise(checks):
        assert after.first_lsn == before.first_lsn + before.records


async def test_damage_in_an_older_segment_is_corruption_at_its_byte(
    wal_dir: Path, open_writer: Any
) -> None:
    await write_log(open_writer, 400)
    older = list_segments(wal_dir)[1]
    with older.path.open("r+b") as f:
        f.seek(HEADER_SIZE + 60)
        byte = f.read(1)
        f.seek(HEADER_SIZE + 60)
        f.write(bytes([byte[0] ^ 0xFF]))
    checks = {c.name: c for c in verify_log(wal_dir)}
    assert checks[older.path.name].problem.startswith("corruption at byte ")
    assert checks[older.path.name].damage == "corrupt"
    assert [name for name, c in checks.items() if c.problem] == [older.path.name]


async def test_a_missing_middle_segment_names_the_missing_lsns(
    wal_dir: Path, open_writer: Any
) -> None:
    await write_log(open_writer, 400)
    segments = list_segments(wal_dir)
    gone, after = segments[1], segments[2]
    gone.path.unlink()
    checks = {c.name: c for c in verify_log(wal_dir)}
    assert checks[after.path.name].problem == (
        f"records {gone.first_lsn}..{after.first_lsn - 1} are missing (a segment is gone)"
    )
    assert checks[after.path.name].missing == (gone.first_lsn, after.first_lsn - 1)
    assert checks[after.path.name].damage is None


async def test_a_torn_tail_of_the_newest_segment_is_reported_as_torn(
    wal_dir: Path, open_writer: Any
) -> None:
    await write_log(open_writer, 50, segment_max_bytes=1 << 20)
    newest = list_segments(wal_dir)[-1]
    with newest.path.open("ab") as f:
        f.write(codec.encode_token(b"x" * 16, 99, 0, "half")[:-3])
    (check,) = verify_log(wal_dir)
    assert check.records == 50
    assert check.problem.startswith("torn tail (cut off at next boot) at byte ")
    assert check.damage == "torn_tail"


def _llmsvc(wal_dir: Path, *args: str) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "LLMSVC_WAL_DIR": str(wal_dir)}
    return subprocess.run(
        [sys.executable, "-m", "llmsvc.cli", "wal", *args],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )


async def test_wal_commands_verify_and_dump_what_was_journaled(
    wal_dir: Path, open_writer: Any
) -> None:
    attempt = await write_log(open_writer, 300)
    verified = await asyncio.to_thread(_llmsvc, wal_dir, "verify", "--json")
    assert verified.returncode == 0, verified.stderr
    assert sum(c["records"] for c in json.loads(verified.stdout)) == 300

    dumped = await asyncio.to_thread(
        _llmsvc, wal_dir, "dump", "--from", "11", "--limit", "5", "--json"
    )
    assert dumped.returncode == 0, dumped.stderr
    rows = [json.loads(line) for line in dumped.stdout.splitlines()]
    assert [(r["lsn"], r["seq"], r["text"]) for r in rows] == [
        (11 + i, 10 + i, f"tok{10 + i} ") for i in range(5)
    ]
    assert {r["attempt_id"] for r in rows} == {str(uuid.UUID(bytes=attempt))}

    list_segments(wal_dir)[1].path.unlink()  # now records are missing
    damaged = await asyncio.to_thread(_llmsvc, wal_dir, "verify")
    assert damaged.returncode == 1
    assert "are missing" in damaged.stdout

#!/usr/bin/env python3
"""What storing a token costs SQLite, by the order of the attempt ids and the rows a commit holds.

Not a test: one run that prints (and writes) JSON. The flush's SQLite thread
spent 6.2 µs a token under 300 paced streams, and wrote ~1,900 bytes to disk per
~50-byte row. This replays that shape in process, with the daemon's own table
(`llm_token_log` as SQLAlchemy creates it), row builder, insert statement and
pragmas: ATTEMPTS streams open at once, each one token per round, a new attempt
once one has TOKENS_PER_ATTEMPT; each commit holds `rounds_per_commit` rounds
(2 is 300 streams at 50 tokens/s flushed every 40 ms, 8 every 160 ms). It
compares the ids the gateway made before (random, version 4) with those it makes
now (time-ordered, version 7, `gateway.ids.new_id`), and the table without its
primary key's index, the least a row costs. Figures are the CPU of the inserts
and commits per token and the bytes written to the database's files per token
(`wchar` of /proc/self/io), medians over rounds.

Usage:  .venv/bin/python benchmarks/bench_token_index.py [--tokens 600000] [--rounds 3]
            [--out bench-token-index.json]
"""

from __future__ import annotations

import argparse
import json
import sqlite3
import statistics
import tempfile
import time
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

import sqlalchemy as sa
from benchkit import PACKAGES, machine_info
from sqlalchemy.dialects import sqlite

from llmsvc.gateway.ids import new_id
from llmsvc.store.batch import TOKEN_ROWS
from llmsvc.store.flusher import _SQLITE_TOKENS
from llmsvc.store.schema import llm_token_log

ATTEMPTS = 300  # streams open at once
TOKENS_PER_ATTEMPT = 200
EPOCH_US = 1_796_000_000_000_000
IDS: dict[str, Callable[[], uuid.UUID]] = {"random": uuid.uuid4, "time-ordered": new_id}


def table_ddl(indexed: bool) -> str:
    """The daemon's token table on SQLite; without `indexed`, its primary key dropped."""
    ddl = str(sa.schema.CreateTable(llm_token_log).compile(dialect=sqlite.dialect()))
    return ddl if indexed else ddl.replace(", \n\tPRIMARY KEY (attempt_id, seq)", "")


def written_bytes() -> int:
    """Bytes this process has passed to write(2) so far."""
    for line in Path("/proc/self/io").read_text().splitlines():
        if line.startswith("wchar:"):
            return int(line.split()[1])
    raise RuntimeError("no wchar in /proc/self/io")


def one_run(tmp: Path, ids: str, indexed: bool, per_commit: int, tokens: int) -> dict[str, Any]:
    path = tmp / f"{ids}-{indexed}-{per_commit}.db"
    db = sqlite3.connect(path, isolation_level=None)
    for pragma in ("journal_mode=WAL", "synchronous=NORMAL"):  # the daemon's (store/engine.py)
        db.execute(f"PRAGMA {pragma}")
    ddl = table_ddl(indexed)
    assert ("PRIMARY KEY" in ddl) == indexed
    db.execute(ddl)
    make = IDS[ids]
    open_ids = [make().bytes for _ in range(ATTEMPTS)]
    seqs = [0] * ATTEMPTS
    us, done, cpu, written = EPOCH_US, 0, 0.0, 0
    while done < tokens:
        batch = []
        for _ in range(per_commit):
            us += 20_000 // ATTEMPTS
            for i in range(ATTEMPTS):
                batch.append((open_ids[i], seqs[i], " token", us))
                seqs[i] += 1
                if seqs[i] == TOKENS_PER_ATTEMPT:
                    open_ids[i], seqs[i] = make().bytes, 0
        rows = TOKEN_ROWS["sqlite"](batch)
        began, wrote = time.process_time(), written_bytes()
        db.execute("BEGIN")
        db.executemany(_SQLITE_TOKENS, rows)
        db.execute("COMMIT")
        cpu += time.process_time() - began
        written += written_bytes() - wrote
        done += len(rows)
    db.close()
    for p in tmp.glob(f"{path.name}*"):
        p.unlink()
    return {"cpu_us_per_token": cpu / done * 1e6, "bytes_written_per_token": written / done}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--tokens", type=int, default=600_000, help="tokens per run")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--out", type=Path, default=Path("bench-token-index.json"))
    args = p.parse_args()
    tmp = Path(tempfile.mkdtemp(prefix="llmsvc-token-index-"))
    cases = [
        (ids, indexed, per_commit)
        for per_commit in (2, 8)
        for ids, indexed in (("random", True), ("time-ordered", True), ("time-ordered", False))
    ]
    runs: dict[str, list[dict[str, Any]]] = {}
    for r in range(args.rounds):
        for ids, indexed, per_commit in cases[r % len(cases) :] + cases[: r % len(cases)]:
            name = f"{ids} ids, {'indexed' if indexed else 'no index'}, {per_commit} rounds/commit"
            got = one_run(tmp, ids, indexed, per_commit, args.tokens)
            runs.setdefault(name, []).append(got)
            print(f"round {r} {name}: {got}", flush=True)
    report = {
        "machine": machine_info(tmp, PACKAGES),
        "attempts_open": ATTEMPTS,
        "tokens_per_run": args.tokens,
        "cases": {
            name: {
                key: round(statistics.median(run[key] for run in case_runs), 2)
                for key in ("cpu_us_per_token", "bytes_written_per_token")
            }
            for name, case_runs in runs.items()
        },
    }
    tmp.rmdir()
    text = json.dumps(report, indent=1)
    print(text)
    args.out.write_text(text + "\n")


if __name__ == "__main__":
    main()

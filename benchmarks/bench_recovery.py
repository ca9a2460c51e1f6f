#!/usr/bin/env python3
"""Benchmark recovery: replaying a crashed instance's journaled tokens into SQLite and PostgreSQL.

Not a test: one run that prints (and writes) JSON. Issue #4 asks how long a
restart takes after a crash that left a large backlog in the WAL, with a
target of >= 100,000 tokens/s into PostgreSQL. So: the gateway's own Journal
writes N tokens (streams of 1,000 tokens, each with request/attempt start and
end records, 50 tokens per append as one upstream read gives them) over a real
WalWriter in `write` mode; the writer is closed without any flush, which is
what a crash leaves behind (every record journaled, nothing in the database).

Each round then does what boot does, on a fresh copy of that WAL and a fresh
store: migrate, reopen the WAL (tail scan), `await flusher.start()`, `await
flusher.drain(within=inf)` with the writer's end as the target. The timed part
is start+drain (wall time, this process's CPU, and the whole machine's busy
CPU, which includes the PostgreSQL server). Afterwards the token rows must
number exactly N and the stored checkpoint must equal the last LSN. SQLite and
PostgreSQL rounds are interleaved (alternating which goes first); figures are
medians over rounds.

Usage:  .venv/bin/python benchmarks/bench_recovery.py [--tokens 1000000] [--rounds 3]
            [--out bench-recovery.json] [--pg-url postgresql://...  ('' skips PostgreSQL)]
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import shutil
import statistics
import sys
import tempfile
import time
import uuid
from dataclasses import replace
from datetime import datetime
from pathlib import Path
from typing import Any

import sqlalchemy as sa
import uvloop
from benchkit import (
    identifier,
    machine_busy_s,
    machine_info,
    pg_drop_scratch,
    pg_scratch,
    write_report,
)

from llmsvc.config import Settings
from llmsvc.gateway.journal import Journal
from llmsvc.store.engine import create_engine, upgrade_to_head
from llmsvc.store.flusher import Flusher, load_checkpoint
from llmsvc.wal.reader import Position
from llmsvc.wal.segment import list_segments
from llmsvc.wal.writer import WalWriter

MODEL = "gpt-test"
MESSAGES = [{"role": "user", "content": "Write a long story about a durable log."}]
TOKENS_PER_STREAM = 1000
TOKENS_PER_APPEND = 50  # one upstream read's worth, as the gateway appends them
Raw = dict[str, list[float]]


PACKAGES = (
    "sqlalchemy",
    "aiosqlite",
    "asyncpg",
    "orjson",
    "uvloop",
    "crc32c",
)  # versions recorded with the figures


def log(message: str) -> None:
    print(f"bench-recovery: {message}", file=sys.stderr, flush=True)


# --------------------------------------------------------------------------- the crashed WAL
async def journal_and_crash(wal_dir: Path, tokens: int) -> tuple[uuid.UUID, Position, int]:
    """Journal `tokens` tokens as the gateway does, then close the writer without flushing.

    Returns the instance id, the writer's final position and the number of streams.
    """
    instance = uuid.uuid4()
    writer = WalWriter(wal_dir, instance, replace(Settings().wal_policy(), sync="write"))
    writer.open(asyncio.get_running_loop(), lambda exc: None)
    journal = Journal(writer)
    streams = -(-tokens // TOKENS_PER_STREAM)
    fut: asyncio.Future[int] | None = None
    for s in range(streams):
        n = min(TOKENS_PER_STREAM, tokens - s * TOKENS_PER_STREAM)
        request, attempt = uuid.uuid4(), uuid.uuid4()
        journal.request_start(request, uuid.uuid4(), MODEL, True, MESSAGES, {"max_tokens": n})
        journal.attempt_start(attempt, request, 1, "upstream", MODEL)
        for first in range(0, n, TOKENS_PER_APPEND):
            texts = [f"t{i} " for i in range(first, min(n, first + TOKENS_PER_APPEND))]
            journal.tokens(attempt.bytes, first, texts)
        journal.attempt_end(
            attempt, status="completed", http_status=200, token_count=n, first_token_ts=None
        )
        fut = journal.request_end(request, status="completed", completion_tokens=n)
        if s % 20 == 19:  # bound the buffer, as concurrent streams awaiting durability would
            await asyncio.shield(fut)
    if fut is not None:
        await asyncio.shield(fut)
    await writer.close()  # the "crash": every record is on disk, nothing is in the database
    return instance, writer.end, streams


# --------------------------------------------------------------------------- stores
async def recover_once(
    url: str, pristine: Path, wal_dir: Path, instance: uuid.UUID, final: Position
) -> dict[str, float]:
    """Boot's recovery on a fresh copy of the crashed WAL into a fresh store; timed and checked."""
    shutil.rmtree(wal_dir, ignore_errors=True)
    shutil.copytree(pristine, wal_dir)  # the flusher deletes segments it has committed
    engine = create_engine(url)
    writer = WalWriter(wal_dir, instance, replace(Settings().wal_policy(), sync="write"))
    try:
        await upgrade_to_head(engine)
        t_open = time.perf_counter()
        writer.open(asyncio.get_running_loop(), lambda exc: None)  # boot's tail scan
        open_s = time.perf_counter() - t_open
        if writer.end != final:
            raise RuntimeError(f"reopened WAL ends at {writer.end}, written to {final}")
        flusher = Flusher(engine, wal_dir, instance, lambda: writer.end, Settings().flush_policy())
        busy0, cpu0, t0 = machine_busy_s(), time.process_time(), time.perf_counter()
        await flusher.start()
        drained = await flusher.drain(within=float("inf"))
        wall = time.perf_counter() - t0
        cpu, busy = time.process_time() - cpu0, machine_busy_s() - busy0
        await flusher.close()
        if not drained:
            raise RuntimeError("drain returned without catching up")
        async with engine.connect() as conn:
            tokens = int(await conn.scalar(sa.text("SELECT count(*) FROM llm_token_log")) or 0)
            completed = int(
                await conn.scalar(
                    sa.text("SELECT count(*) FROM llm_requests WHERE status = 'completed'")
                )
                or 0
            )
            attempts = int(await conn.scalar(sa.text("SELECT count(*) FROM llm_attempts")) or 0)
        checkpoint = await load_checkpoint(engine, instance)
    finally:
        await writer.close()
        await engine.dispose()
    return {
        "seconds": wall,
        "tokens": tokens,
        "tokens_per_s": tokens / wall,
        "cpu_us_per_token_in_process": cpu / tokens * 1e6,
        "machine_cpu_us_per_token": busy / tokens * 1e6,
        "wal_open_scan_s": open_s,
        "checkpoint": checkpoint,
        "requests_completed": completed,
        "attempts": attempts,
    }


# --------------------------------------------------------------------------- orchestration
def remove_files(folder: Path, pattern: str) -> None:
    """Drop a round's SQLite file (and its -wal/-shm) so the next round's page cache is its own."""
    for path in folder.glob(pattern):
        with contextlib.suppress(OSError):
            path.unlink()


def rotated(items: list[str], r: int) -> list[str]:
    """Alternate the order each round so neither store always runs first."""
    k = r % len(items)
    return [*items[k:], *items[:k]]


def summarise(raw: Raw) -> dict[str, Any]:
    med = {k: round(statistics.median(v), 3) for k, v in raw.items()}
    return {**med, "per_round": {k: [round(x, 3) for x in v] for k, v in raw.items()}}


async def bench(args: argparse.Namespace) -> dict[str, Any]:
    started = time.perf_counter()
    tmp = Path(tempfile.mkdtemp(prefix="llmsvc-bench-recovery-", dir=args.tmp_dir))
    report: dict[str, Any] = {"machine": machine_info(tmp, PACKAGES)}
    report["params"] = {"tokens": args.tokens, "rounds": args.rounds, "pg": bool(args.pg_url)}
    report["notes"] = (
        "Timed: Flusher.start() + drain(within=inf) from checkpoint 0 to the crashed writer's "
        "end, default batch size (50,000 records per transaction), on a fresh copy of the WAL "
        "(in the page cache: a process crash, not a cold machine) into a freshly migrated "
        "store. cpu_us_per_token_in_process = this process (all threads); "
        "machine_cpu_us_per_token = the whole machine's busy time, i.e. including the "
        "PostgreSQL server. wal_open_scan_s = reopening the WAL (boot's tail scan), "
        "not included in seconds. Checked each round: token rows == tokens journaled, "
        "checkpoint == last LSN, every request 'completed'. Medians over rounds, "
        "per_round the raw values."
    )
    pristine = tmp / "crashed-wal"
    pristine.mkdir()
    try:
        log(f"journaling {args.tokens:,} tokens")
        t0 = time.perf_counter()
        instance, final, streams = await journal_and_crash(pristine, args.tokens)
        last_lsn = final.lsn - 1
        report["journal"] = {
            "streams": streams,
            "tokens": args.tokens,
            "records": last_lsn,
            "wal_bytes": sum(s.path.stat().st_size for s in list_segments(pristine)),
            "segments": len(list_segments(pristine)),
            "seconds": round(time.perf_counter() - t0, 2),
        }
        log(f"journaled {last_lsn:,} records in {report['journal']['seconds']} s")
        stores = ["sqlite"] + (["postgresql"] if args.pg_url else [])
        raw: dict[str, Raw] = {s: {} for s in stores}
        for r in range(args.rounds):
            for store in rotated(stores, r):
                if store == "sqlite":
                    url = f"sqlite+aiosqlite:///{tmp / f'recover-{r}.db'}"
                else:
                    url = await pg_scratch(args.pg_url, args.pg_scratch_db)
                fig = await recover_once(url, pristine, tmp / "wal", instance, final)
                if fig["tokens"] != args.tokens or fig["checkpoint"] != last_lsn:
                    raise RuntimeError(
                        f"{store}: {fig['tokens']} tokens, checkpoint "
                        f"{fig['checkpoint']}; want {args.tokens}, {last_lsn}"
                    )
                if fig["requests_completed"] != streams or fig["attempts"] != streams:
                    raise RuntimeError(f"{store}: requests/attempts not as journaled: {fig}")
                for key in (
                    "seconds",
                    "tokens_per_s",
                    "cpu_us_per_token_in_process",
                    "machine_cpu_us_per_token",
                    "wal_open_scan_s",
                ):
                    raw[store].setdefault(key, []).append(fig[key])
                if store == "sqlite":
                    remove_files(tmp, f"recover-{r}.db*")
                log(
                    f"{store} round {r + 1}/{args.rounds}: {fig['tokens_per_s']:,.0f} tokens/s "
                    f"in {fig['seconds']:.2f} s"
                )
        for store in stores:
            report[store] = {"verified": True, **summarise(raw[store])}
        pg = report.get("postgresql", {}).get("tokens_per_s")
        report["target"] = {
            "target": ">= 100000 tokens/s into PostgreSQL",
            "reached": pg,
            "met": pg is not None and pg >= 100_000,
        }
    finally:
        if args.pg_url:
            with contextlib.suppress(Exception):
                await pg_drop_scratch(args.pg_url, args.pg_scratch_db)
        shutil.rmtree(tmp, ignore_errors=True)
    report["machine"]["loadavg_at_end"] = [round(x, 2) for x in os.getloadavg()]
    report["finished_at"] = datetime.now().astimezone().isoformat(timespec="seconds")
    report["wall_s"] = round(time.perf_counter() - started, 1)
    return report


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    p.add_argument("--tokens", type=int, default=1_000_000, help="tokens journaled and replayed")
    p.add_argument("--rounds", type=int, default=3, help="interleaved rounds per store")
    p.add_argument("--out", type=Path, default=Path("bench-recovery.json"))
    p.add_argument(
        "--pg-url",
        default="postgresql://postgres@127.0.0.1:5432/postgres",
        help="server for the scratch database ('' skips PostgreSQL)",
    )
    p.add_argument(
        "--pg-scratch-db",
        default="llmsvc_bench_recovery",
        type=identifier,
        help="created (and dropped) there; any existing database of that name is dropped",
    )
    p.add_argument("--tmp-dir", default=None, help="where the WAL and SQLite files go")
    args = p.parse_args(argv)
    if args.tokens < 1 or args.rounds < 1:
        p.error("--tokens and --rounds must be positive")
    return args


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    report = uvloop.run(bench(args))
    write_report(report, args.out)


if __name__ == "__main__":
    main()

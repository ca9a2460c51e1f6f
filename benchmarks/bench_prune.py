#!/usr/bin/env python3
"""Benchmark retention on PostgreSQL: pruning by row deletion against dropping daily partitions.

Not a test: one run that prints (and writes) JSON. Issue #5 asks for pruning 10
million token rows both ways. Each round fills a fresh scratch database (migrated
to head) with `--tokens` old token rows (requests created 200..191 days ago, 1,000
tokens per attempt, spread over 10 daily partitions) plus 100 recent requests that
must survive, then runs `retention.prune` with a cut-off 180 days back once with
`partitions=False` (every token row deleted, in batches of `--batch` requests, as
on SQLite) and once with partitions (whole days dropped). The timed part is the
prune call (its counting included). Afterwards the old rows must be gone, the
recent ones intact, and the table's on-disk size is recorded (deleted rows leave
dead tuples until VACUUM; dropped partitions free their files at once).

Usage:  .venv/bin/python benchmarks/bench_prune.py --pg-url postgresql://postgres@127.0.0.1/postgres
            [--tokens 10000000] [--batch 500] [--out bench-prune.json]
"""

from __future__ import annotations

import argparse
import asyncio
import os
import sys
import tempfile
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import sqlalchemy as sa
from benchkit import (
    identifier,
    machine_busy_s,
    machine_info,
    pg_drop_scratch,
    pg_scratch,
    write_report,
)

from llmsvc.maintenance.retention import create_partition, prune
from llmsvc.store.engine import create_engine, upgrade_to_head

PACKAGES = ("sqlalchemy", "asyncpg")
TOKENS_PER_ATTEMPT = 1000
OLD_DAYS = range(191, 201)  # the old requests' ages in days: ten partitions
RECENT_REQUESTS = 100


async def fill(engine: Any, tokens: int) -> None:
    """Old requests with their attempts and tokens, and recent ones; generated in SQL."""
    attempts = tokens // TOKENS_PER_ATTEMPT
    now = datetime.now(UTC)
    async with engine.begin() as conn:
        for age in OLD_DAYS:
            await create_partition(conn, (now - timedelta(days=age)).date())
    request = """
        INSERT INTO llm_requests (id, instance_id, correlation_id, model, stream, status,
                                  messages, params, created_at)
        SELECT md5(:tag || 'r' || i)::uuid, md5('instance')::uuid, 'c' || i, 'm',
               true, 'completed', '[]', '{}',
               CAST(:base AS timestamptz) + (i % CAST(:days AS int)) * interval '1 day'
        FROM generate_series(0, CAST(:n AS int) - 1) i
    """
    attempt = """
        INSERT INTO llm_attempts (id, request_id, attempt_no, provider, model, status, started_at)
        SELECT md5(:tag || 'a' || i)::uuid, md5(:tag || 'r' || i)::uuid, 1, 'p', 'm', 'completed',
               CAST(:base AS timestamptz) + (i % CAST(:days AS int)) * interval '1 day'
        FROM generate_series(0, CAST(:n AS int) - 1) i
    """
    token = """
        INSERT INTO llm_token_log (attempt_id, seq, text, created_at)
        SELECT md5(:tag || 'a' || i)::uuid, s, 'token ' || s,
               CAST(:base AS timestamptz) + (i % CAST(:days AS int)) * interval '1 day'
               + s * interval '10 ms'
        FROM generate_series(CAST(:first AS int), CAST(:last AS int)) i,
             generate_series(0, CAST(:per AS int) - 1) s
    """
    for tag, n, base, days in (
        ("old", attempts, now - timedelta(days=max(OLD_DAYS)), len(OLD_DAYS)),
        ("new", RECENT_REQUESTS, now - timedelta(days=1), 1),
    ):
        params = {"tag": tag, "n": n, "base": base, "days": days, "per": TOKENS_PER_ATTEMPT}
        async with engine.begin() as conn:
            await conn.execute(sa.text(request), params)
            await conn.execute(sa.text(attempt), params)
        for first in range(0, n, 1000):  # a million rows per transaction
            async with engine.begin() as conn:
                last = min(n, first + 1000) - 1
                await conn.execute(sa.text(token), {**params, "first": first, "last": last})
    async with engine.begin() as conn:
        await conn.exec_driver_sql("ANALYZE")


async def counts(engine: Any) -> dict[str, int]:
    async with engine.connect() as conn:
        return {
            table: int(await conn.scalar(sa.text(f"SELECT count(*) FROM {table}")) or 0)
            for table in ("llm_requests", "llm_attempts", "llm_token_log")
        } | {
            "token_log_bytes": int(
                await conn.scalar(
                    sa.text(
                        "SELECT coalesce(sum(pg_total_relation_size(c.oid)), 0) FROM pg_class c "
                        "WHERE c.relname LIKE 'llm_token_log%' AND c.relkind = 'r'"
                    )
                )
                or 0
            )
        }


async def one(pg_url: str, scratch: str, tokens: int, batch: int, partitions: bool) -> Any:
    url = await pg_scratch(pg_url, scratch)
    engine = create_engine(url)
    try:
        await upgrade_to_head(engine)
        started = time.perf_counter()
        await fill(engine, tokens)
        filled_s = time.perf_counter() - started
        before = await counts(engine)
        cpu, busy, clock = time.process_time(), machine_busy_s(), time.perf_counter()
        cutoff = datetime.now(UTC) - timedelta(days=180)
        result = await prune(engine, cutoff, cutoff, batch, partitions=partitions)
        seconds = time.perf_counter() - clock
        cpu, busy = time.process_time() - cpu, machine_busy_s() - busy
        after = await counts(engine)
    finally:
        await engine.dispose()
        await pg_drop_scratch(pg_url, scratch)
    recent_tokens = RECENT_REQUESTS * TOKENS_PER_ATTEMPT
    expected = {
        "llm_requests": RECENT_REQUESTS,
        "llm_attempts": RECENT_REQUESTS,
        "llm_token_log": recent_tokens,
    }
    checked = {k: after[k] for k in expected} == expected
    removed = before["llm_token_log"] - after["llm_token_log"]
    return {
        "method": "partition drop" if partitions else "row deletion",
        "fill_seconds": round(filled_s, 1),
        "token_rows_removed": removed,
        "seconds": round(seconds, 2),
        "token_rows_per_s": round(removed / seconds),
        "cpu_s_this_process": round(cpu, 2),
        "cpu_s_whole_machine": round(busy, 2),
        "token_log_bytes_before": before["token_log_bytes"],
        "token_log_bytes_after": after["token_log_bytes"],
        "partitions_dropped": len(result.repaired["partitions_dropped"]),
        "token_rows_deleted_one_by_one": result.repaired["token_rows_deleted"],
        "checked": checked,
    }


async def bench(args: argparse.Namespace) -> dict[str, Any]:
    report: dict[str, Any] = {
        "machine": machine_info(Path(tempfile.gettempdir()), PACKAGES),
        "tokens": args.tokens,
        "batch_requests": args.batch,
        "runs": [],
    }
    for partitions in (False, True):
        run = await one(args.pg_url, args.pg_scratch_db, args.tokens, args.batch, partitions)
        print(f"[bench_prune] {run}", file=sys.stderr)
        report["runs"].append(run)
    deletion, drop = report["runs"]
    report["drop_speedup"] = round(deletion["seconds"] / drop["seconds"], 1)
    report["ok"] = all(r["checked"] for r in report["runs"])
    return report


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    p.add_argument("--pg-url", required=True, help="a server to create a scratch database on")
    p.add_argument("--pg-scratch-db", type=identifier, default=f"llmsvc_bench_prune_{os.getpid()}")
    p.add_argument("--tokens", type=int, default=10_000_000, help="old token rows to prune")
    p.add_argument("--batch", type=int, default=500, help="requests per delete transaction")
    p.add_argument("--out", type=Path, default=Path("bench-prune.json"))
    return p.parse_args(argv)


def main() -> int:
    args = parse_args()
    report = asyncio.run(bench(args))
    write_report(report, args.out)
    return 0 if report["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())

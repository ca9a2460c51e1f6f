#!/usr/bin/env python3
"""A whole request's rows, built and written in process: llmsvc trees side by side.

Not a test: one run that prints (and writes) JSON. Each tree's `build_batch` and
`write_batch` store REQUESTS whole requests (a start with a two-message prompt,
an attempt, its reply as one token, both ends: what a non-streaming request
journals) in batches of BATCH requests, into a new SQLite file or a scratch
PostgreSQL database of its own. The figure is the CPU of the process doing it
(the flush process's share of a whole request, the driver's threads included)
per request; PostgreSQL's server's own CPU is not in it. Each tree runs in a
child process with the tree first on its path, the trees in turn each round.

Usage:  .venv/bin/python benchmarks/bench_flush_rows.py --tree base=/tmp/wt --tree new=.
            [--pg-url postgresql://postgres@127.0.0.1:5432/postgres] [--rounds 3]
            [--requests 6000] --out bench-flush-rows.json
"""

from __future__ import annotations

import argparse
import asyncio
import os
import statistics
import sys
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any

import orjson
from benchkit import (
    PACKAGES,
    commit_of,
    log,
    machine_info,
    pg_drop_scratch,
    pg_scratch,
    rotated,
    tree_arg,
    write_report,
)

BATCH = 100  # requests a batch: 16 clients at ~2,000 requests a second, flushed every 50 ms
SCRATCH_DB = "llmsvc_bench_flush_rows"


def records(n: int) -> list[tuple[int, bytes]]:
    """The WAL records of the `n`th whole request, as the gateway journals them. (llmsvc is
    imported here and in `child` only: in the child, from the tree first on its path.)"""
    from llmsvc.wal import RecordType
    from llmsvc.wal.codec import FRAME, encode_token

    ts = 1_796_000_000_000_000 + n * 1_000
    request, attempt = str(uuid.uuid4()), uuid.uuid4()
    prompt = [
        {"role": "system", "content": "You are a helpful assistant."},
        {"role": "user", "content": "Say something about gateways in a few words. " * 3},
    ]
    start = {
        "id": request,
        "correlation_id": request,
        "model": "m",
        "stream": False,
        "messages": prompt,
        "params": {"max_tokens": 16, "temperature": 0.2},
        "ts": ts,
    }
    attempt_start = {
        "id": str(attempt),
        "request_id": request,
        "attempt_no": 1,
        "provider": "up",
        "model": "m",
        "ts": ts + 5,
    }
    token = encode_token(attempt.bytes, 0, ts + 100, "a reply of sixteen tokens or so")
    attempt_end = {
        "id": str(attempt),
        "ts": ts + 200,
        "status": "completed",
        "http_status": 200,
        "prompt_tokens": 30,
        "completion_tokens": 16,
        "token_count": 1,
        "first_token_ts": ts + 100,
        "finish_reason": "stop",
    }
    request_end = {"id": request, "ts": ts + 210, "status": "completed", "prompt_tokens": 30,
                   "completion_tokens": 16, "provider": "up", "cost": 0.0001}  # fmt: skip
    return [
        (RecordType.REQUEST_START, orjson.dumps(start)),
        (RecordType.ATTEMPT_START, orjson.dumps(attempt_start)),
        (RecordType.TOKEN, token[FRAME.size :]),  # a record's payload: past its frame's head
        (RecordType.ATTEMPT_END, orjson.dumps(attempt_end)),
        (RecordType.REQUEST_END, orjson.dumps(request_end)),
    ]


async def child(url: str, requests: int) -> float:
    """In the tree's own process: CPU µs per request to build and write every batch."""
    from llmsvc.store.batch import build_batch
    from llmsvc.store.engine import create_engine, upgrade_to_head
    from llmsvc.store.flusher import write_batch

    engine = create_engine(url, access="create")
    try:
        await upgrade_to_head(engine)
        instance = uuid.uuid4()
        batches = [
            [r for n in range(b * BATCH, (b + 1) * BATCH) for r in records(n)]
            for b in range(requests // BATCH)
        ]
        began = time.process_time()
        for lsn, batch_records in enumerate(batches, 1):
            batch = build_batch(batch_records, lsn, instance, engine.dialect.name)
            await write_batch(engine, batch, instance)
        return (time.process_time() - began) / (len(batches) * BATCH) * 1e6
    finally:
        await engine.dispose()


async def one_run(tree: Path, args: argparse.Namespace, tmp: Path) -> float:
    if args.pg_url:
        url = await pg_scratch(args.pg_url, SCRATCH_DB)
    else:
        url = f"sqlite+aiosqlite:///{tmp / f'{uuid.uuid4().hex}.db'}"
    env = {**os.environ, "PYTHONPATH": f"{tree}{os.pathsep}{Path(__file__).parent}"}
    command = [sys.executable, __file__, "--child", url, "--requests", str(args.requests)]
    try:
        proc = await asyncio.create_subprocess_exec(
            *command, env=env, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE
        )
        out, err = await proc.communicate()
    finally:
        if args.pg_url:
            await pg_drop_scratch(args.pg_url, SCRATCH_DB)
    if proc.returncode:
        raise RuntimeError(f"{tree}: the run failed:\n{err.decode()[-2000:]}")
    return float(out)


async def run(args: argparse.Namespace) -> dict[str, Any]:
    trees: dict[str, Path] = dict(args.tree)
    runs: dict[str, list[float]] = {name: [] for name in trees}
    with tempfile.TemporaryDirectory(prefix="llmsvc-flush-rows-") as tmp:
        report: dict[str, Any] = {
            "machine": machine_info(Path(tmp), PACKAGES),
            "store": "postgresql" if args.pg_url else "sqlite",
            "requests": args.requests,
            "batch": BATCH,
        }
        for r in range(args.rounds):
            for name in rotated(list(trees), r):
                got = round(await one_run(trees[name], args, Path(tmp)), 1)
                runs[name].append(got)
                log(f"round {r} {name}: {got} µs a request")
    report["trees"] = {
        name: {
            "path": str(path),
            "commit": commit_of(path),
            "cpu_us_per_request": runs[name],
            "cpu_us_per_request_median": statistics.median(runs[name]),
        }
        for name, path in trees.items()
    }
    return report


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--tree", type=tree_arg, action="append", help="name=path, two or more")
    p.add_argument("--pg-url", default="", help="a PostgreSQL server for a scratch database")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--requests", type=int, default=6000)
    p.add_argument("--out", type=Path)
    p.add_argument("--child", metavar="URL", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.child:
        print(asyncio.run(child(args.child, args.requests)))
        return
    if not args.tree or len(args.tree) < 2 or args.out is None:
        p.error("--tree name=path at least twice, and --out")
    write_report(asyncio.run(run(args)), args.out)


if __name__ == "__main__":
    main()

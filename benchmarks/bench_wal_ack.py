#!/usr/bin/env python3
"""How long an append waits for its acknowledgement: the WAL writer's hand-off and commit delay.

Not a test: one run that prints (and writes) JSON. A request at c=1 waits for
the WAL batch holding its end records before the client is answered, and a
streamed token for the batch holding it, so the time from `WalWriter.append`
to its future's result is on every request's path. One stream appends a token
record and awaits it, again and again, in `write` mode (what the daemon runs),
with each commit delay in DELAYS_US and each gap in GAPS_US between appends:
0 is a stream appending back to back, 300 µs is about the time between a
request's start records and its end records at c=1 here, 1,000 µs is past
any delay. Rounds interleave the delays; figures are medians over rounds of
each round's median, p90 and p99.

Usage:  .venv/bin/python benchmarks/bench_wal_ack.py [--appends 5000] [--rounds 3]
            [--out bench-wal-ack.json]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any

import uvloop
from benchkit import PACKAGES, machine_info, pct

from llmsvc.config import Settings
from llmsvc.wal import WalWriter
from llmsvc.wal.codec import encode_token

DELAYS_US = (0, 100, 500)  # 500 is the default `wal_commit_delay_us`
GAPS_US = (0, 300, 1000)


async def acks(delay_us: int, gap_us: int, appends: int, wal_dir: Path) -> list[float]:
    """Seconds from each append to its acknowledgement, one stream, `gap_us` between them."""
    policy = Settings.model_construct(wal_commit_delay_us=delay_us).wal_policy()
    writer = WalWriter(wal_dir, uuid.uuid4(), policy)
    writer.open(asyncio.get_running_loop(), lambda exc: None)
    attempt, waits = uuid.uuid4().bytes, []
    try:
        for seq in range(appends):
            started = time.perf_counter()
            await writer.append(encode_token(attempt, seq, 0, "token"))
            waits.append(time.perf_counter() - started)
            if gap_us:
                await asyncio.sleep(gap_us / 1e6)
    finally:
        await writer.close()
    return waits


async def run(args: argparse.Namespace) -> dict[str, Any]:
    raw: dict[str, list[float]] = {}
    with tempfile.TemporaryDirectory() as tmp:
        machine = machine_info(Path(tmp), PACKAGES)
        for r in range(args.rounds):
            for gap_us in GAPS_US:
                for delay_us in DELAYS_US[r % 3 :] + DELAYS_US[: r % 3]:  # order rotated
                    wal_dir = Path(tmp) / f"r{r}-g{gap_us}-d{delay_us}"
                    wal_dir.mkdir(mode=0o700)
                    waits = await acks(delay_us, gap_us, args.appends, wal_dir)
                    for q in (0.5, 0.9, 0.99):
                        key = f"gap_{gap_us}us_delay_{delay_us}us_p{round(q * 100)}_us"
                        raw.setdefault(key, []).append(pct(waits, q) * 1e6)
    return {
        "machine": machine,
        "appends_per_run": args.appends,
        "rounds": args.rounds,
        "ack_us": {key: round(statistics.median(v), 1) for key, v in raw.items()},
        "per_round": raw,
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[1])
    p.add_argument("--appends", type=int, default=5000)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--out", type=Path)
    args = p.parse_args()
    report = uvloop.run(run(args))
    text = json.dumps(report, indent=1)
    print(json.dumps(report["ack_us"], indent=1))
    if args.out:
        args.out.write_text(text + "\n")


if __name__ == "__main__":
    main()

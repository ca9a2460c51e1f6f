"""Where the c=1 tail comes from: daemons that differ in one flush setting (a mode of bench.py).

--tail-compare    S1 (non-streaming, c=1): the upstream called directly and one daemon per
                  variant in VARIANTS, each differing from the defaults in its flush
                  settings only, interleaved round by round (order rotated). Each gets its
                  p50 and p99, its share of requests over 2 ms and its CPU per request
                  (the flushes of a round's requests included, as the round ends before the
                  next flush only in `flush_idle`).

--tail-compare also times, in this process, a flusher draining one pre-written WAL of
2,000 such requests (5 records each) into a new SQLite file per batch size in BATCHES: CPU
per record at each size gives a transaction's fixed cost and a record's own, the two parts of
what a flush costs.

`flush_idle` flushes once a minute, the longest interval allowed: nothing while the rounds run
if they end within it (3 rounds of 1,500 take about 25 s here), so it shows what the serving
path costs alone. `flushing` writes its batches from the flush process (the default),
`flush_in_daemon` on the serving event loop: their difference is what the process moves
off the serving path. CPU per request counts the daemon's children (the flush process).
"""

from __future__ import annotations

import argparse
import functools
import shutil
import tempfile
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

import aiohttp
from bench_limits import Raw, timed
from bench_scale import tree_cpu_s
from benchkit import (
    MODEL,
    PACKAGES,
    add,
    chat_body,
    chat_url,
    close_report,
    log,
    machine_busy_s,
    machine_info,
    pct,
    per_round,
    prewrite_wal,
    processes,
    rnd,
    rotated,
    spawn_upstream,
    start_variants,
    summary,
)

from llmsvc.config import Settings
from llmsvc.store.engine import create_engine, upgrade_to_head
from llmsvc.store.flusher import Flusher

SLOW_S = 0.002  # a request over this counts as in the tail
BATCHES = (15, 60, 250, 1000)  # records a transaction: the daemon's at 1,000 requests/s and
# a flush every 10, 50 and 200 ms, and more
VARIANTS: dict[str, dict[str, str]] = {
    "flushing": {},  # the defaults: a flush every 50 ms, written by the flush process
    "flush_in_daemon": {"LLMSVC_FLUSH_PROCESS": "false"},  # … on the serving event loop
    "flush_idle": {"LLMSVC_FLUSH_INTERVAL_MS": "60000", "LLMSVC_FLUSH_BATCH_RECORDS": "10000000"},
}


async def tail_compare(args: argparse.Namespace, tmp: Path) -> dict[str, Any]:
    """S1's p50, p99, tail share and daemon CPU per request, for each variant beside direct."""
    raw: Raw = {}
    with processes() as procs:
        procs.append(up := spawn_upstream(tmp, "upstream", 0.0))
        daemons = await start_variants(tmp, args.database_url, up, VARIANTS, procs)
        targets = {"direct": chat_url(up)} | {n: chat_url(d) for n, d in daemons.items()}
        cpu = {name: functools.partial(tree_cpu_s, d.pid) for name, d in daemons.items()}
        body = chat_body(MODEL, 16, stream=False)
        async with aiohttp.ClientSession() as session:
            for url in targets.values():  # warm every path
                for _ in range(100):
                    await timed(session, url, body, None)
            for r in range(args.rounds):
                for name in rotated(list(targets), r):
                    cpu0 = cpu[name]() if name in cpu else 0.0
                    n = args.latency_n
                    lats = [await timed(session, targets[name], body, None) for _ in range(n)]
                    add(raw, f"{name}_p50_ms", pct(lats, 0.5) * 1e3)
                    add(raw, f"{name}_p99_ms", pct(lats, 0.99) * 1e3)
                    add(raw, f"{name}_over_2ms_pct", 100 * sum(t > SLOW_S for t in lats) / n)
                    if name in cpu:
                        add(raw, f"{name}_cpu_us_per_request", (cpu[name]() - cpu0) / n * 1e6)
                for q in ("p50", "p99"):
                    for name in VARIANTS:
                        added = raw[f"{name}_{q}_ms"][-1] - raw[f"direct_{q}_ms"][-1]
                        add(raw, f"added_{q}_ms_{name}", added)
    return {
        "requests_per_round": args.latency_n,
        "rounds": args.rounds,
        "database": "postgresql" if args.database_url.startswith("postgres") else "sqlite",
        "variants": VARIANTS,
        **summary(raw),
        "per_round": per_round(raw),
    }


async def batch_costs(tmp: Path, requests: int) -> dict[str, Any]:
    """CPU per record draining one WAL at each batch size, and the fit of those into a
    transaction's fixed cost and a record's own (the smallest and largest batch)."""
    wal_dir = tmp / "batches-wal"
    wal_dir.mkdir()
    instance, end = await prewrite_wal(wal_dir, requests, 1)
    per_record: dict[int, float] = {}
    for size in BATCHES:
        engine = create_engine(f"sqlite+aiosqlite:///{tmp / f'batches-{size}.db'}")
        try:
            await upgrade_to_head(engine)
            policy = replace(Settings().flush_policy(), batch_records=size)
            flusher = Flusher(engine, wal_dir, instance, lambda: end, policy)
            await flusher.start()
            cpu0 = time.process_time()
            if not await flusher.drain(within=300):
                raise RuntimeError(f"batches of {size}: the WAL did not drain within 300 s")
            per_record[size] = (time.process_time() - cpu0) / (end.lsn - 1) * 1e6
            await flusher.close()
        finally:
            await engine.dispose()
        log(f"batches of {size} records: {per_record[size]:.1f} us CPU per record")
    small, large = BATCHES[0], BATCHES[-1]
    fixed = (per_record[small] - per_record[large]) / (1 / small - 1 / large)
    return {
        "requests": requests,
        "records": end.lsn - 1,
        "cpu_us_per_record": {str(size): rnd(us, 2) for size, us in per_record.items()},
        "cpu_us_per_transaction_fixed": rnd(fixed, 1),
        "cpu_us_per_record_own": rnd(per_record[large] - fixed / large, 2),
    }


async def run(args: argparse.Namespace) -> dict[str, Any]:
    """The comparison, with the machine it ran on."""
    started = time.perf_counter()
    tmp = Path(tempfile.mkdtemp(prefix="llmsvc-bench-tail-", dir=args.tmp_dir))
    report: dict[str, Any] = {"machine": machine_info(tmp, PACKAGES)}
    busy0 = machine_busy_s()
    try:
        log("S1 at c=1 beside daemons that flush differently")
        report["tail_compare_nonstream_c1"] = await tail_compare(args, tmp)
        log("a flusher draining one WAL in batches of each size")
        report["flush_batch_costs"] = await batch_costs(tmp, 200 if args.quick else 2000)
    finally:
        if not args.keep_tmp:
            shutil.rmtree(tmp, ignore_errors=True)
    return close_report(report, started, busy0)

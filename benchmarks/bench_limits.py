"""Keys and rate limits: what `auth = "keys"` adds to a call, and how exactly a rate holds.

Two modes of benchmarks/bench.py (which imports this module for them):

--auth-compare    S1 (non-streaming, c=1): the upstream called directly, a daemon with
                  `auth = "none"` and one with `auth = "keys"` and a key whose rpm/tpm limits
                  are too high ever to refuse, interleaved round by round (order rotated).
--limit-accuracy  `workers = 2`, one key at RPM requests a minute (burst = rate unless
                  --burst), offered at 3x the rate with a new connection per request, so the
                  kernel's SO_REUSEPORT spreads them over both workers. The burst is spent
                  first: at 3x the rate that takes burst / (2 x RPM/60) s (30 s for 600 rpm),
                  every request due, all accepted. Then WINDOW seconds more at the same pace,
                  the bucket empty when it starts: the window's allowance is RPM/60 x WINDOW
                  (300 for 600 rpm and 30 s), the whole run's burst + RPM/60 x (its seconds).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import aiohttp
import sqlalchemy as sa
from benchkit import (
    MODEL,
    PACKAGES,
    Proc,
    add,
    chat_body,
    chat_url,
    close_report,
    log,
    log_tail,
    machine_busy_s,
    machine_info,
    pct,
    per_round,
    pg_drop_scratch,
    pg_scratch,
    processes,
    rotated,
    spawn_daemon,
    spawn_upstream,
    stop_proc,
    summary,
    upstream_provider,
    wait_ready,
)

from llmsvc.store.engine import create_engine
from llmsvc.store.schema import llm_requests

LLMSVC = Path(sys.executable).parent / "llmsvc"
Raw = dict[str, list[float | None]]


def cli(database_url: str, *args: str) -> str:
    """`llmsvc ARGS` against the database; its stdout (fails loudly)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("LLMSVC_")}
    env["LLMSVC_DATABASE_URL"] = database_url
    cmd = [str(LLMSVC)] if LLMSVC.exists() else [sys.executable, "-m", "llmsvc.cli"]
    done = subprocess.run([*cmd, *args], env=env, capture_output=True, text=True, check=False)
    if done.returncode != 0:
        raise RuntimeError(f"llmsvc {' '.join(args[:2])}: {done.stderr}")
    return done.stdout


def new_key(database_url: str, name: str, *options: str) -> str:
    """A key made with `llmsvc keys create` (store migrated first); returns its secret."""
    cli(database_url, "migrate")
    return str(json.loads(cli(database_url, "keys", "create", name, *options, "--json"))["secret"])


async def call(session: aiohttp.ClientSession, url: str, body: bytes, secret: str | None) -> int:
    """One non-streaming request; its HTTP status."""
    headers = {"Content-Type": "application/json"}
    if secret is not None:
        headers["Authorization"] = f"Bearer {secret}"
    async with session.post(url, data=body, headers=headers) as resp:
        await resp.read()
        return resp.status


async def timed(session: aiohttp.ClientSession, url: str, body: bytes, secret: str | None) -> float:
    t0 = time.perf_counter()
    status = await call(session, url, body, secret)
    if status != 200:
        raise RuntimeError(f"{url}: HTTP {status}")
    return time.perf_counter() - t0


async def auth_compare(args: argparse.Namespace, tmp: Path) -> dict[str, Any]:
    """S1 added p50/p99 with and without keys, the two daemons and the upstream interleaved."""
    raw: Raw = {}
    with processes() as procs:
        procs.append(up := spawn_upstream(tmp, "upstream", 0.0))
        targets: dict[str, tuple[str, str | None]] = {"direct": (chat_url(up), None)}
        for auth in ("none", "keys"):
            home = tmp / auth
            home.mkdir()
            url = args.database_url or f"sqlite:///{home / 'llmsvc.db'}"
            secret = None
            settings = {"LLMSVC_AUTH": auth}
            if auth == "keys":  # limits on, never reached
                secret = new_key(url, "bench", "--rpm", "10000000", "--tpm", "1000000000")
            providers = [upstream_provider("fast", up, MODEL)]
            procs.append(daemon := spawn_daemon(home, url, providers, settings=settings))
            await wait_ready(daemon)
            targets[auth] = (chat_url(daemon), secret)
        body = chat_body(MODEL, 16, stream=False)
        async with aiohttp.ClientSession() as session:
            for url, secret in targets.values():  # warm every path
                for _ in range(20):
                    await timed(session, url, body, secret)
            for r in range(args.rounds):
                for name in rotated(list(targets), r):
                    url, secret = targets[name]
                    lats = [await timed(session, url, body, secret) for _ in range(args.latency_n)]
                    add(raw, f"{name}_p50_ms", pct(lats, 0.5) * 1e3)
                    add(raw, f"{name}_p99_ms", pct(lats, 0.99) * 1e3)
                for q in ("p50", "p99"):
                    direct = raw[f"direct_{q}_ms"][-1]
                    for auth in ("none", "keys"):
                        got = raw[f"{auth}_{q}_ms"][-1]
                        assert direct is not None
                        assert got is not None
                        add(raw, f"added_{q}_ms_auth_{auth}", got - direct)
                    keys, none = raw[f"keys_{q}_ms"][-1], raw[f"none_{q}_ms"][-1]
                    assert keys is not None
                    assert none is not None
                    add(raw, f"keys_minus_none_{q}_ms", keys - none)
    return {
        "requests_per_round": args.latency_n,
        "rounds": args.rounds,
        "database": "postgresql" if args.database_url.startswith("postgres") else "sqlite",
        **summary(raw),
        "per_round": per_round(raw),
    }


async def offer(url: str, secret: str, rps: float, seconds: float) -> list[tuple[float, int]]:
    """`rps` requests a second for `seconds`, each on a new connection, at a fixed pace:
    (when it was due, from the start; its HTTP status, 0 for no response) for each."""
    done: list[tuple[float, int]] = []
    connector = aiohttp.TCPConnector(limit=0, force_close=True)
    body = chat_body(MODEL, 16, stream=False)
    async with aiohttp.ClientSession(connector=connector) as session:

        async def one(due: float) -> None:
            await asyncio.sleep(max(0.0, start + due - time.monotonic()))
            try:
                done.append((due, await call(session, url, body, secret)))
            except aiohttp.ClientError:
                done.append((due, 0))

        start = time.monotonic() + 0.05
        await asyncio.gather(*(one(i / rps) for i in range(round(rps * seconds))))
    return done


def tally(done: list[tuple[float, int]], allowance: float) -> dict[str, Any]:
    statuses = [status for _, status in done]
    accepted = statuses.count(200)
    return {
        "offered": len(statuses),
        "accepted": accepted,
        "refused_429": statuses.count(429),
        "other": len(statuses) - accepted - statuses.count(429),
        "allowance": round(allowance, 1),
        "error_pct": round((accepted - allowance) / allowance * 100, 2),
    }


async def per_instance(database_url: str) -> dict[str, int]:
    """Stored requests by instance (each worker is one): how the kernel spread them."""
    engine = create_engine(database_url)
    try:
        async with engine.connect() as conn:
            rows = await conn.execute(
                sa.select(llm_requests.c.instance_id, sa.func.count()).group_by(
                    llm_requests.c.instance_id
                )
            )
            return {str(instance): int(count) for instance, count in rows}
    finally:
        await engine.dispose()


async def accuracy_on(
    args: argparse.Namespace, tmp: Path, up: Proc, database_url: str
) -> dict[str, Any]:
    burst = args.burst or args.rpm
    secret = new_key(database_url, "accuracy", "--rpm", str(args.rpm), "--rpm-burst", str(burst))
    settings = {"LLMSVC_AUTH": "keys", "LLMSVC_WORKERS": "2"}
    daemon = spawn_daemon(
        tmp, database_url, [upstream_provider("fast", up, MODEL)], settings=settings
    )
    try:
        await wait_ready(daemon)
        await asyncio.sleep(2.5)  # every worker has read the key table
        url = chat_url(daemon)
        rate = args.rpm / 60
        # At 3x the rate the burst is spent when 3rt = burst + rt: the window starts then.
        spend_s = burst / (2 * rate)
        done = await offer(url, secret, 3 * rate, spend_s + args.window)
        await asyncio.sleep(2)  # the last rows flushed
        stored = await per_instance(database_url)
    finally:
        code = await asyncio.to_thread(stop_proc, daemon.popen)
        if code != 0:
            log(f"daemon exit code {code}:\n{log_tail(daemon.log)}")
    return {
        "burst_spent": {
            "seconds": spend_s,
            **tally([d for d in done if d[0] < spend_s], burst + rate * spend_s),
        },
        "window": tally([d for d in done if d[0] >= spend_s], rate * args.window),
        "whole_run": tally(done, burst + rate * (spend_s + args.window)),
        "stored_by_worker": stored,
        "daemon_exit_code": code,
    }


async def limit_accuracy(args: argparse.Namespace, tmp: Path) -> dict[str, Any]:
    out: dict[str, Any] = {
        "rpm": args.rpm,
        "burst": args.burst or args.rpm,
        "workers": 2,
        "window_s": args.window,
        "offered_rps": 3 * args.rpm / 60,
    }
    with processes() as procs:
        procs.append(up := spawn_upstream(tmp, "upstream", 0.0))
        stores = {"sqlite": f"sqlite+aiosqlite:///{tmp / 'limits.db'}"}
        if args.pg_url:
            stores["postgresql"] = await pg_scratch(args.pg_url, args.pg_scratch_db)
        try:
            for name, url in stores.items():
                log(f"rate-limit accuracy on {name}")
                home = tmp / name
                home.mkdir()
                out[name] = await accuracy_on(args, home, up, url)
        finally:
            if args.pg_url:
                await pg_drop_scratch(args.pg_url, args.pg_scratch_db)
    return out


async def run(args: argparse.Namespace) -> dict[str, Any]:
    """The mode asked for, with the machine it ran on."""
    started = time.perf_counter()
    tmp = Path(tempfile.mkdtemp(prefix="llmsvc-bench-limits-", dir=args.tmp_dir))
    report: dict[str, Any] = {"machine": machine_info(tmp, PACKAGES)}
    busy0 = machine_busy_s()
    try:
        if args.auth_compare:
            log("S1 with auth none and keys")
            report["auth_compare_nonstream_c1"] = await auth_compare(args, tmp)
        if args.limit_accuracy:
            report["limit_accuracy"] = await limit_accuracy(args, tmp)
    finally:
        if not args.keep_tmp:
            shutil.rmtree(tmp, ignore_errors=True)
    return close_report(report, started, busy0)

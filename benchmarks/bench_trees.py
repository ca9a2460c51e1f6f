"""CPU per streamed token or per request, llmsvc trees side by side, in one run.

Each tree runs its own daemon (SQLite, the defaults) in front of one shared upstream;
the load goes to each in turn, the order turned each round. Per run a daemon is measured
over a window in the middle of the load, after the start's burst: its CPU and its flush
process's, per token the clients got in that window. Nothing is drained after the window,
so a flush running behind counts in a later window, not this one.

`paced`: 300 streams at 50 tokens/s (200-token replies, arriving at once), the shape of
issue 19's paced row. `saturated`: the same with 500 streams, more than the serving process
keeps up with on this machine: how the pump fares on a loop that falls behind (its tokens a
second say as much as its CPU per token). `instant`: 100 streams of 1000-token replies from
an upstream that writes each reply at once. `whole`: 16 clients each sending one
non-streaming request after another (16-token replies), measured per request: the CPU that
sets the latency rows once requests overlap (the daemon's with its flush process, and the
serving process's alone), and the clients' p50 and p99 over the window. `burst`: 300 streams
at 50 tokens/s open, then 300 more arriving at once (5-token replies, new connections): the
open streams' gaps between tokens (p99, max) and the arrivals' time to first token.

With `--pin` each daemon's serving process (every thread) runs on a CPU of its own, and
its flush process, the upstream and the load on the others, so the serving process does
not share its core's caches with the load it is measured under.

With `--pg-url` each tree stores into a scratch database of its own on that PostgreSQL
server (made and dropped here), and a run also counts the store's own work over the
window: the CPU of the server's backends serving that database, and (streams) the WAL it
wrote.

With `--drained` a run is measured whole instead, until the store holds every token the
clients got (bench_scale's `measured`, as `bench.py --floor` measures its rows): the flush
process's whole share counts, the start's burst too.

Usage:  .venv/bin/python benchmarks/bench_trees.py --tree base=/path/to/worktree
            --tree new=. [--load paced|saturated|instant|whole|burst] [--pin] [--rounds 3]
            [--pg-url postgresql://user@host/db] --out x.json
A tree is imported from its path (PYTHONPATH) with this tree's virtualenv and packages.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import shutil
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

import asyncpg
from bench_scale import Side, measured, start_daemon, streams_for, tree_cpu_s, tree_pids
from benchkit import (
    MODEL,
    PACKAGES,
    Endpoint,
    Proc,
    chat_body,
    commit_of,
    complete,
    log,
    machine_info,
    new_session,
    pct,
    pg_drop_scratch,
    pg_scratch,
    plain_pg_url,
    proc_cpu_s,
    processes,
    rotated,
    spawn_upstream,
    tree_arg,
)

LOADS = {  # token delay (ms), streams, tokens per reply
    "paced": (20.0, 300, 200),
    "saturated": (20.0, 500, 200),
    "instant": (0.0, 100, 1000),
    "whole": (0.0, 16, 16),  # clients, not streams
    "burst": (20.0, 300, 200),  # the open streams; BURST more arrive at once
}
BURST, BURST_TOKENS, BURST_AFTER_S = 300, 5, 2.0
FIGURE = {
    "paced": "cpu_us_per_token",
    "saturated": "cpu_us_per_token",
    "instant": "cpu_us_per_token",
    "whole": "cpu_us_per_request",
    "burst": "open_gap_p99_ms",
}
WARM_S, WINDOW_S, COOL_S = 4.0, 8.0, 2.0  # the window: after the start's burst, before the end


async def drained_run(daemon: Proc, up: Proc, load: str) -> dict[str, Any]:
    """The load on one daemon, measured whole until its store holds every token."""
    _, streams, tokens = LOADS[load]
    seconds = WARM_S + WINDOW_S
    load_it = lambda: streams_for(daemon.port, streams, tokens, seconds, 0)  # noqa: E731
    got = await measured(Side("daemon", daemon), up, "", load_it)
    keep = ("cpu_us_per_token", "serving_cpu_us_per_token", "tokens_per_s", "ttft_p50_ms")
    keep += ("errors", "drain_s")
    return {key: got[key] for key in keep}


class Store:
    """A PostgreSQL store's own work for one database: its backends' CPU and the server's WAL."""

    def __init__(self, conn: asyncpg.Connection, database: str) -> None:
        self.conn, self.database = conn, database

    async def sample(self) -> tuple[float, int]:
        """The backends' CPU seconds so far and the server's WAL bytes (PostgreSQL 14+)."""
        pids = await self.conn.fetch(
            "SELECT pid FROM pg_stat_activity WHERE datname = $1", self.database
        )
        cpu = 0.0
        for row in pids:
            with contextlib.suppress(FileNotFoundError, ProcessLookupError):
                cpu += proc_cpu_s(row["pid"])
        wal = await self.conn.fetchval("SELECT wal_bytes FROM pg_stat_wal")
        return cpu, int(wal)


async def one_run(port: int, pid: int, load: str, store: Store | None) -> dict[str, Any]:
    """The load on one daemon; its CPU per token and the clients' TTFT over the window,
    and with a PostgreSQL `store` the store's CPU and WAL bytes per token."""
    _, streams, tokens = LOADS[load]
    run = asyncio.create_task(streams_for(port, streams, tokens, WARM_S + WINDOW_S + 2, 0.0))
    await asyncio.sleep(WARM_S)
    cpu0, own0 = tree_cpu_s(pid), proc_cpu_s(pid)
    store0 = await store.sample() if store else (0.0, 0)
    await asyncio.sleep(WINDOW_S)
    cpu, own = tree_cpu_s(pid) - cpu0, proc_cpu_s(pid) - own0
    store1 = await store.sample() if store else (0.0, 0)
    stats, wall = await run
    in_window = stats.tokens / wall * WINDOW_S  # the clients' rate held over the window
    got = {
        "cpu_us_per_token": round(cpu / in_window * 1e6, 2),
        "serving_cpu_us_per_token": round(own / in_window * 1e6, 2),  # the flush process's not
        "tokens_per_s": round(stats.tokens / wall),
        "ttft_p50_ms": round(statistics.median(stats.ttfts) * 1e3, 1) if stats.ttfts else None,
        "errors": len(stats.errors),
    }
    if store:
        got["store_cpu_us_per_token"] = round((store1[0] - store0[0]) / in_window * 1e6, 2)
        got["store_wal_bytes_per_token"] = round((store1[1] - store0[1]) / in_window, 1)
    return got


async def whole_run(port: int, pid: int, store: Store | None) -> dict[str, Any]:
    """Non-streaming requests on one daemon; its CPU per request and the clients' latency
    over the window, and with a PostgreSQL `store` the store's CPU per request."""
    _, clients, tokens = LOADS["whole"]
    body = chat_body(MODEL, tokens, False)
    latencies: list[float] = []
    counting = False
    stop = time.monotonic() + WARM_S + WINDOW_S + 2

    async def client(ep: Endpoint) -> None:
        while time.monotonic() < stop:
            took = await complete(ep, body)
            if counting:
                latencies.append(took)

    async with new_session() as session:
        ep = Endpoint("daemon", f"http://127.0.0.1:{port}/v1/chat/completions", session, MODEL)
        load = asyncio.gather(*(client(ep) for _ in range(clients)))
        await asyncio.sleep(WARM_S)
        cpu0, own0, counting = tree_cpu_s(pid), proc_cpu_s(pid), True
        store0 = await store.sample() if store else (0.0, 0)
        await asyncio.sleep(WINDOW_S)
        cpu, own = tree_cpu_s(pid) - cpu0, proc_cpu_s(pid) - own0
        counting, n = False, len(latencies)
        store1 = await store.sample() if store else (0.0, 0)
        await load
    got = {
        "cpu_us_per_request": round(cpu / n * 1e6, 1),
        "serving_cpu_us_per_request": round(own / n * 1e6, 1),  # the flush process's not counted
        "requests_per_s": round(n / WINDOW_S),
        "p50_ms": round(pct(latencies, 0.5) * 1e3, 3),
        "p99_ms": round(pct(latencies, 0.99) * 1e3, 3),
    }
    if store:
        got["store_cpu_us_per_request"] = round((store1[0] - store0[0]) / n * 1e6, 1)
    return got


async def burst_run(port: int) -> dict[str, Any]:
    """Streams open on one daemon, then a burst of arrivals: what the open streams' clients
    wait between tokens meanwhile, and the arrivals' first tokens."""
    _, streams, tokens = LOADS["burst"]  # one reply each: streams_for's least, in 0 s
    open_run = asyncio.create_task(streams_for(port, streams, tokens, 0.0, 0.0, gaps=True))
    await asyncio.sleep(BURST_AFTER_S)
    arrivals, _ = await streams_for(port, BURST, BURST_TOKENS, 0.0, 0.0)
    opened, _ = await open_run
    return {
        "open_gap_p99_ms": round(pct(opened.gaps, 0.99) * 1e3, 1),
        "open_gap_max_ms": round(max(opened.gaps) * 1e3, 1),
        "burst_ttft_p50_ms": round(pct(arrivals.ttfts, 0.5) * 1e3, 1),
        "burst_ttft_p90_ms": round(pct(arrivals.ttfts, 0.9) * 1e3, 1),
        "errors": len(opened.errors) + len(arrivals.errors),
    }


def pin(daemons: list[Proc], others: list[Proc]) -> None:
    """Each daemon's own process on the last CPU, its flush process, `others` and this
    process on the rest. Threads started later inherit their starter's CPUs."""
    cpus = sorted(os.sched_getaffinity(0))
    own, rest = set(cpus[-1:]), set(cpus[:-1])
    for daemon in daemons:
        pids = tree_pids(daemon.pid)
        _pin_threads(pids[0], own)
        for child in pids[1:]:
            _pin_threads(child, rest)
    for proc in others:
        _pin_threads(proc.pid, rest)
    os.sched_setaffinity(0, rest)


def _pin_threads(pid: int, cpus: set[int]) -> None:
    for task in Path(f"/proc/{pid}/task").iterdir():
        os.sched_setaffinity(int(task.name), cpus)


async def rounds(
    args: argparse.Namespace,
    tmp: Path,
    runs: dict[str, list[dict[str, Any]]],
    scratch: dict[str, str],
    admin: asyncpg.Connection | None,
) -> None:
    """A daemon per tree (storing into its `scratch` database with `admin`), the load on each
    in turn, `args.rounds` times; each run's figures appended to its tree's `runs`."""
    stores: dict[str, Store] = {}
    with processes() as procs:
        procs.append(up := spawn_upstream(tmp, "upstream", LOADS[args.load][0]))
        daemons = {}
        for name, path in args.trees.items():
            url = ""
            if admin is not None:
                url = await pg_scratch(args.pg_url, scratch[name])
                stores[name] = Store(admin, scratch[name])
            env = {"PYTHONPATH": str(path)}
            procs.append(daemon := await start_daemon(tmp, name, url, up, env))
            daemons[name] = daemon
        if args.pin:
            pin(list(daemons.values()), [up])
        for r in range(args.rounds):
            for name in rotated(list(args.trees), r):
                daemon = daemons[name]
                if args.load == "whole":
                    got = await whole_run(daemon.port, daemon.pid, stores.get(name))
                elif args.load == "burst":
                    got = await burst_run(daemon.port)
                elif args.drained:
                    got = await drained_run(daemon, up, args.load)
                else:
                    got = await one_run(daemon.port, daemon.pid, args.load, stores.get(name))
                runs[name].append(got)
                log(f"round {r} {name}: {got}")
                await asyncio.sleep(COOL_S)


async def run(args: argparse.Namespace) -> dict[str, Any]:
    trees: dict[str, Path] = args.trees
    delay_ms, streams, tokens = LOADS[args.load]
    tmp = Path(tempfile.mkdtemp(prefix="llmsvc-trees-"))
    report: dict[str, Any] = {
        "machine": machine_info(tmp, PACKAGES),
        "load": {"name": args.load, "token_delay_ms": delay_ms, "streams": streams},
        "tokens_per_reply": tokens,
        "window_s": None if args.drained else WINDOW_S,
        "pinned": args.pin,
        "store": "postgresql" if args.pg_url else "sqlite",
        "trees": {
            name: {"path": str(path), "commit": commit_of(path)} for name, path in trees.items()
        },
    }
    runs: dict[str, list[dict[str, Any]]] = {name: [] for name in trees}
    started = time.perf_counter()
    scratch = {name: f"llmsvc_trees_{name}" for name in trees} if args.pg_url else {}
    admin = await asyncpg.connect(plain_pg_url(args.pg_url)) if args.pg_url else None
    try:
        await rounds(args, tmp, runs, scratch, admin)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)  # the daemons' WALs and SQLite files
        if admin is not None:
            await admin.close()
            for database in scratch.values():
                await pg_drop_scratch(args.pg_url, database)
    figure = FIGURE[args.load]
    for name, tree_runs in runs.items():
        report["trees"][name]["runs"] = tree_runs
        for key in (
            figure,
            "tokens_per_s",
            "store_cpu_us_per_token",
            "store_wal_bytes_per_token",
            "store_cpu_us_per_request",
        ):
            if key in tree_runs[0]:
                median = statistics.median(r[key] for r in tree_runs)
                report["trees"][name][f"{key}_median"] = median
    report["wall_s"] = round(time.perf_counter() - started, 1)
    return report


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument(
        "--tree", type=tree_arg, action="append", required=True, help="name=path, two or more"
    )
    p.add_argument("--load", choices=sorted(LOADS), default="paced")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--drained", action="store_true", help="whole runs, until stored")
    p.add_argument("--pin", action="store_true", help="each daemon on a CPU of its own")
    p.add_argument("--pg-url", default="", help="a PostgreSQL server to store into (scratch DBs)")
    p.add_argument("--out", type=Path, required=True)
    args = p.parse_args()
    if len(args.tree) < 2:
        p.error("--tree takes name=path, at least twice")
    if args.pin and len(os.sched_getaffinity(0)) < 2:
        p.error("--pin needs two CPUs or more")
    if args.drained and args.load in ("whole", "burst"):
        p.error("--drained measures CPU per token: not with --load whole or burst")
    if args.pg_url and (args.drained or args.load == "burst"):
        p.error("--pg-url counts the store's CPU over the window: not with --drained or burst")
    args.trees = dict(args.tree)
    report = asyncio.run(run(args))
    args.out.write_text(json.dumps(report, indent=1) + "\n")
    for name, tree in report["trees"].items():
        medians = {k[: -len("_median")]: v for k, v in tree.items() if k.endswith("_median")}
        log(f"{name} ({tree['commit']}): {medians}")


if __name__ == "__main__":
    main()

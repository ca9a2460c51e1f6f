"""llmsvc at production scale: paced streams, many open streams, a throttled database, workers.

Run as ``benchmarks/bench.py --scale``. Real LLM traffic is many long, slow streams
whose tokens arrive one at a time, so every scenario but `instant` uses an
upstream that waits before each token (each token its own socket write). Each
is measured side by side, in one run, with the upstream called directly and,
for the paced one, through `relay_floor.py`: a TCP relay on raw uvloop
protocols that neither parses nor stores, the floor any Python hop pays here;
and through `journal_floor.py`, the same relay journaling every token into
llmsvc's WAL from its protocol callbacks, the floor of a durable one.
The load comes from `loadgen.py` (raw protocols, kept-alive connections), so
the client's own cost stays small next to the daemon's.

1. paced: N concurrent 200-token streams at 50 tokens/s each, N swept up to
   1,000: daemon CPU per token (its whole process tree: every thread, the
   journal and the flush until the run's rows are in the database), added
   time to first token p50/p99, tokens/s, errors;
2. instant: 1000-token streams at concurrency 100 with no delay, through one
   daemon with `workers = 1` and one with `workers = 2`: tokens/s against the
   direct figure and CPU per token;
3. open: 5,000 concurrent streams at 1 token/s for 60 s: all served, resident
   memory per open stream (plateau minus idle), event-loop lag p99 from the
   daemon's own `llmsvc_event_loop_lag_seconds` histogram;
4. throttled: paced load while the database is locked 95 % of the time:
   the WAL backlog grows on disk while the daemon's memory stays flat, and
   drains once the database is free again.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import re
import shutil
import sqlite3
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import asyncpg
from benchkit import (
    MODEL,
    PACKAGES,
    ROOT,
    Proc,
    chat_body,
    log,
    log_tail,
    machine_info,
    open_token_rows,
    pct,
    plain_pg_url,
    proc_cpu_s,
    processes,
    rotated,
    spawn_daemon,
    spawn_upstream,
    stop_proc,
    upstream_provider,
    wait_drained,
    wait_ready,
)
from loadgen import StreamStats, connect, request_bytes

PATH = "/v1/chat/completions"
RELAY_SCRIPT = ROOT / "benchmarks" / "relay_floor.py"
JOURNAL_SCRIPT = ROOT / "benchmarks" / "journal_floor.py"
PAGE_KIB = 4


# --------------------------------------------------------------------------- processes
def tree_pids(pid: int) -> list[int]:
    """A process and its descendants (a supervisor and its workers)."""
    pids, todo = [], [pid]
    while todo:
        current = todo.pop()
        pids.append(current)
        with contextlib.suppress(FileNotFoundError):
            for task in Path(f"/proc/{current}/task").iterdir():
                todo += [int(c) for c in (task / "children").read_text().split()]
    return pids


def tree_cpu_s(pid: int) -> float:
    total = 0.0
    for p in tree_pids(pid):
        with contextlib.suppress(FileNotFoundError, ProcessLookupError):
            total += proc_cpu_s(p)
    return total


def tree_rss_kib(pid: int) -> int:
    total = 0
    for p in tree_pids(pid):
        with contextlib.suppress(FileNotFoundError):
            total += int(Path(f"/proc/{p}/statm").read_text().split()[1]) * PAGE_KIB
    return total


def open_fds(pid: int) -> int:
    return sum(len(list(Path(f"/proc/{p}/fd").iterdir())) for p in tree_pids(pid))


def spawn_relay(tmp: Path, upstream: Proc, journaled: bool = False) -> Proc:
    """`relay_floor.py` in front of `upstream`, or `journal_floor.py` if `journaled`."""
    name = "journal" if journaled else "relay"
    logfile = tmp / f"{name}.log"
    script = JOURNAL_SCRIPT if journaled else RELAY_SCRIPT
    cmd = [sys.executable, str(script), "--upstream-port", str(upstream.port)]
    cmd += ["--wal-dir", str(tmp / "journal-wal")] if journaled else []
    with logfile.open("wb") as err:
        popen = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=err)
    assert popen.stdout is not None
    line = popen.stdout.readline()
    if not line.startswith(b"LISTENING "):
        stop_proc(popen)
        raise RuntimeError(f"the {name} relay did not start:\n{log_tail(logfile)}")
    return Proc(name, popen, int(line.split()[1]), logfile)


async def start_daemon(
    tmp: Path, name: str, database_url: str, upstream: Proc, settings: dict[str, str]
) -> Proc:
    home = tmp / name
    home.mkdir()
    url = database_url or f"sqlite:///{home / 'llmsvc.db'}"
    daemon = spawn_daemon(home, url, [upstream_provider("up", upstream, MODEL)], settings=settings)
    await wait_ready(daemon)
    return daemon


def metrics_port(daemon: Proc) -> int:
    found = re.findall(rb"metrics port=(\d+)", daemon.log.read_bytes())
    return int(found[-1])


def http_json(url: str) -> Any:
    with urllib.request.urlopen(url, timeout=10) as resp:
        return json.loads(resp.read())


async def loop_lag_buckets(daemon: Proc) -> dict[float, float]:
    """The daemon's event-loop lag histogram: cumulative count per upper bound (s)."""
    url = f"http://127.0.0.1:{metrics_port(daemon)}/metrics"

    def fetch() -> str:
        with urllib.request.urlopen(url, timeout=10) as resp:
            return str(resp.read().decode())

    text = await asyncio.to_thread(fetch)
    pattern = r'llmsvc_event_loop_lag_seconds_bucket\{le="([^"]+)"\} (\S+)'
    return {float(le): float(n) for le, n in re.findall(pattern, text)}


def lag_quantile_bound(before: dict[float, float], after: dict[float, float], q: float) -> float:
    """The smallest histogram bound at or under which a share `q` of the run's probes fell."""
    total = after[float("inf")] - before.get(float("inf"), 0.0)
    for bound in sorted(after):
        if after[bound] - before.get(bound, 0.0) >= q * total:
            return bound
    return float("inf")


# --------------------------------------------------------------------------- load
@dataclass
class Side:
    """One way to reach the upstream: directly, through a relay, or through a daemon."""

    name: str
    proc: Proc | None  # the hop's process (None: direct)


async def streams_for(
    port: int, streams: int, tokens: int, seconds: float, stagger_s: float, gaps: bool = False
) -> tuple[StreamStats, float]:
    """`streams` clients, each on its own kept-alive connection, streaming replies back to
    back, one at least, until `seconds` have passed; their starts spread over `stagger_s`."""
    stats = StreamStats()
    request = request_bytes("127.0.0.1", port, PATH, chat_body(MODEL, tokens, stream=True))
    t0 = time.perf_counter()
    t_end = t0 + seconds

    async def client(i: int) -> None:
        await asyncio.sleep(stagger_s * i / streams)
        try:
            conn = await connect("127.0.0.1", port, stats, gaps)
        except OSError as exc:
            stats.errors.append(f"connect: {exc}")
            return
        try:
            while not stats.errors:
                await conn.stream(request, tokens)
                if time.perf_counter() >= t_end:
                    break
        finally:
            conn.close()

    await asyncio.gather(*(client(i) for i in range(streams)))
    return stats, time.perf_counter() - t0


async def measured(
    side: Side,
    upstream: Proc,
    database_url: str,
    load: Callable[[], Awaitable[tuple[StreamStats, float]]],
) -> dict[str, Any]:
    """One run: tokens/s, TTFT, errors, and CPU per token of the hop, the upstream and the
    load generator; through a daemon, its CPU runs until the run's rows are all stored."""
    since = datetime.now(UTC)
    hop0 = tree_cpu_s(side.proc.pid) if side.proc else 0.0
    own0 = proc_cpu_s(side.proc.pid) if side.proc else 0.0
    up0, lg0 = proc_cpu_s(upstream.pid), time.process_time()
    stats, wall = await load()
    tokens = max(stats.tokens, 1)
    out: dict[str, Any] = {
        "tokens": stats.tokens,
        "streams": stats.streams,
        "errors": len(stats.errors),
        "first_errors": stats.errors[:3],
        "tokens_per_s": stats.tokens / wall,
        "ttft_p50_ms": pct(stats.ttfts, 0.5) * 1e3 if stats.ttfts else None,
        "ttft_p99_ms": pct(stats.ttfts, 0.99) * 1e3 if stats.ttfts else None,
        "upstream_cpu_us_per_token": (proc_cpu_s(upstream.pid) - up0) / tokens * 1e6,
        "loadgen_cpu_us_per_token": (time.process_time() - lg0) / tokens * 1e6,
    }
    if side.proc is not None and side.name.startswith("daemon"):
        rows = await open_token_rows(database_url or sqlite_url(side.proc))
        try:
            drain, _ = await wait_drained(rows, since, stats.tokens, time.perf_counter(), 300)
        finally:
            await rows.close()
        out["drain_s"] = drain
    if side.proc is not None:
        out["cpu_us_per_token"] = (tree_cpu_s(side.proc.pid) - hop0) / tokens * 1e6
        # The hop's own process: a daemon's flush process is the difference.
        out["serving_cpu_us_per_token"] = (proc_cpu_s(side.proc.pid) - own0) / tokens * 1e6
    return out


def sqlite_url(daemon: Proc) -> str:
    return f"sqlite:///{daemon.log.parent / 'llmsvc.db'}"


def median_of(runs: list[dict[str, Any]], key: str) -> float | None:
    values = [r[key] for r in runs if r.get(key) is not None]
    return round(statistics.median(values), 3) if values else None


# --------------------------------------------------------------------------- the scenarios
async def phase_paced(args: argparse.Namespace, tmp: Path) -> dict[str, Any]:
    """N streams at 50 tokens/s each, N swept; direct, both relays and daemon interleaved."""
    results: dict[str, Any] = {}
    with processes() as procs:
        procs.append(up := spawn_upstream(tmp, "upstream-paced", args.paced_delay_ms))
        procs.append(relay := spawn_relay(tmp, up))
        procs.append(journal := spawn_relay(tmp, up, journaled=True))
        procs.append(daemon := await start_daemon(tmp, "daemon-paced", args.database_url, up, {}))
        hops = (relay, journal, daemon)
        sides = [Side("direct", None), *(Side(hop.name, hop) for hop in hops)]
        ports = {"direct": up.port} | {hop.name: hop.port for hop in hops}
        for n in args.paced_streams:
            runs: dict[str, list[dict[str, Any]]] = {s.name: [] for s in sides}
            for r in range(args.rounds):
                for side in rotated(sides, r):
                    port, seconds = ports[side.name], args.paced_seconds
                    load = _load(port, n, args.paced_tokens, seconds, args.paced_stagger_s)
                    got = await measured(side, up, args.database_url, load)
                    runs[side.name].append(got)
                    log(
                        f"paced {n} streams {side.name}: {got['tokens_per_s']:,.0f} tok/s "
                        f"ttft p50 {got['ttft_p50_ms'] or 0:.1f} ms "
                        f"cpu {got.get('cpu_us_per_token', 0):.1f} us/tok errors {got['errors']}"
                    )
            results[f"streams_{n}"] = _paced_summary(n, runs)
    return results


def _load(
    port: int, n: int, tokens: int, seconds: float, stagger_s: float
) -> Callable[[], Awaitable[tuple[StreamStats, float]]]:
    return lambda: streams_for(port, n, tokens, seconds, stagger_s)


def _paced_summary(n: int, runs: dict[str, list[dict[str, Any]]]) -> dict[str, Any]:
    out: dict[str, Any] = {"streams": n}
    for name, side_runs in runs.items():
        for key in side_runs[0]:
            if key != "first_errors":
                out[f"{name}_{key}"] = median_of(side_runs, key)
        out[f"{name}_first_errors"] = [e for r in side_runs for e in r["first_errors"]][:3]
    for q in ("p50", "p99"):
        d, v = out[f"direct_ttft_{q}_ms"], out[f"daemon_ttft_{q}_ms"]
        out[f"added_ttft_{q}_ms"] = None if d is None or v is None else round(v - d, 3)
    daemon = out.get("daemon_cpu_us_per_token")
    for floor in ("relay", "journal"):
        if (cpu := out.get(f"{floor}_cpu_us_per_token")) and daemon:
            out[f"daemon_over_{floor}_cpu"] = round(daemon / cpu, 2)
    out["per_round"] = runs
    return out


async def phase_instant(args: argparse.Namespace, tmp: Path) -> dict[str, Any]:
    """1000-token replies written at once, c=100: direct, 1 worker and 2 workers."""
    with processes() as procs:
        procs.append(up := spawn_upstream(tmp, "upstream-instant", 0.0))
        daemons = {}
        for workers in args.instant_workers:
            name = f"daemon_w{workers}"
            settings = {"LLMSVC_WORKERS": str(workers)} if workers > 1 else {}
            procs.append(d := await start_daemon(tmp, name, args.database_url, up, settings))
            daemons[name] = d
        sides = [Side("direct", None), *(Side(n, d) for n, d in daemons.items())]
        ports = {"direct": up.port, **{n: d.port for n, d in daemons.items()}}
        runs: dict[str, list[dict[str, Any]]] = {s.name: [] for s in sides}
        for r in range(args.rounds):
            for side in rotated(sides, r):
                load = lambda p=ports[side.name]: streams_for(  # noqa: E731
                    p, 100, 1000, args.instant_seconds, 0.5
                )
                got = await measured(side, up, args.database_url, load)
                runs[side.name].append(got)
                log(
                    f"instant c100 t1000 {side.name}: {got['tokens_per_s']:,.0f} tok/s "
                    f"cpu {got.get('cpu_us_per_token', 0):.1f} us/tok errors {got['errors']}"
                )
    out: dict[str, Any] = {"concurrency": 100, "tokens_per_reply": 1000}
    for name, side_runs in runs.items():
        for key in ("tokens_per_s", "cpu_us_per_token", "serving_cpu_us_per_token", "drain_s"):
            out[f"{name}_{key}"] = median_of(side_runs, key)
        out[f"{name}_errors"] = median_of(side_runs, "errors")
        if name != "direct":
            ratios = [
                d["tokens_per_s"] / x["tokens_per_s"]
                for d, x in zip(side_runs, runs["direct"], strict=True)
            ]
            out[f"{name}_share_of_direct_tokens_per_s"] = round(statistics.median(ratios), 3)
    out["per_round"] = runs
    return out


async def phase_open(args: argparse.Namespace, tmp: Path) -> dict[str, Any]:
    """Many streams open at once at 1 token/s: memory per open stream and loop lag."""
    n, tokens = args.open_streams, args.open_tokens
    stagger = args.open_stagger_s
    delay = args.open_delay_ms
    out: dict[str, Any] = {"streams": n, "tokens_per_stream": tokens, "token_delay_ms": delay}
    with processes() as procs:
        procs.append(up := spawn_upstream(tmp, "upstream-slow", delay))
        procs.append(daemon := await start_daemon(tmp, "daemon-open", args.database_url, up, {}))
        for side in (Side("daemon", daemon), Side("direct", None)):
            port = daemon.port if side.proc else up.port
            watched = daemon if side.proc else up
            await asyncio.sleep(args.open_settle_s)  # let the idle figures settle
            idle_rss, idle_fds = tree_rss_kib(watched.pid), open_fds(watched.pid)
            lag0 = await loop_lag_buckets(daemon) if side.proc else {}
            samples: list[tuple[float, int, int, int]] = []  # t, open streams, rss KiB, fds
            stats = StreamStats()
            request = request_bytes("127.0.0.1", port, PATH, chat_body(MODEL, tokens, True))
            sampler = asyncio.create_task(_sample_open(stats, watched, samples))
            got = await measured(
                side,
                up,
                args.database_url,
                lambda s=stats, r=request, p=port: _open_load(p, n, r, tokens, stagger, s),
            )
            sampler.cancel()
            full = [s for s in samples if s[1] >= n]  # every stream open
            plateau_rss = statistics.median(s[2] for s in full) if full else None
            plateau_fds = statistics.median(s[3] for s in full) if full else None
            figures: dict[str, Any] = {
                **{k: v for k, v in got.items() if k != "first_errors"},
                "first_errors": got["first_errors"],
                "most_open_at_once": max((s[1] for s in samples), default=0),
                "seconds_with_all_open": len(full),
                "idle_rss_mib": round(idle_rss / 1024, 1),
                "plateau_rss_mib": None if plateau_rss is None else round(plateau_rss / 1024, 1),
                "rss_kib_per_open_stream": None
                if plateau_rss is None
                else round((plateau_rss - idle_rss) / n, 1),
                "idle_fds": idle_fds,
                "plateau_fds": plateau_fds,
                "samples": samples,
            }
            if side.proc:
                lag1 = await loop_lag_buckets(daemon)
                figures["loop_lag_p50_le_s"] = lag_quantile_bound(lag0, lag1, 0.5)
                figures["loop_lag_p99_le_s"] = lag_quantile_bound(lag0, lag1, 0.99)
                figures["loop_lag_probes"] = lag1[float("inf")] - lag0.get(float("inf"), 0)
            out[side.name] = figures
            log(
                f"open {n} streams {side.name}: served {got['streams']} errors {got['errors']} "
                f"rss/stream {figures['rss_kib_per_open_stream']} KiB "
                f"lag p99 <= {figures.get('loop_lag_p99_le_s')}"
            )
    return out


async def _sample_open(
    stats: StreamStats, watched: Proc, samples: list[tuple[float, int, int, int]]
) -> None:
    """Every second: open streams, resident memory (KiB) and descriptors of the hop."""
    t0 = time.perf_counter()
    while True:
        await asyncio.sleep(1)
        rss, fds = tree_rss_kib(watched.pid), open_fds(watched.pid)
        samples.append((round(time.perf_counter() - t0, 1), stats.active, rss, fds))


async def _open_load(
    port: int, n: int, request: bytes, tokens: int, stagger_s: float, stats: StreamStats
) -> tuple[StreamStats, float]:
    """`n` single streams on their own connections, started over `stagger_s`."""
    t0 = time.perf_counter()

    async def client(i: int) -> None:
        await asyncio.sleep(stagger_s * i / n)
        try:
            conn = await connect("127.0.0.1", port, stats)
        except OSError as exc:
            stats.errors.append(f"connect: {exc}")
            return
        try:
            await conn.stream(request, tokens)
        finally:
            conn.close()

    await asyncio.gather(*(client(i) for i in range(n)))
    return stats, time.perf_counter() - t0


class Throttle:
    """Holds the database's write lock for `duty` of every `period`, from another session."""

    def __init__(self, database_url: str, duty: float, period: float = 2.0) -> None:
        self.database_url = database_url
        self.locked, self.free = duty * period, (1 - duty) * period
        self.stop = threading.Event()

    def run_sqlite(self, path: str) -> None:
        conn = sqlite3.connect(path, isolation_level=None, timeout=30)
        try:
            while not self.stop.is_set():
                conn.execute("BEGIN EXCLUSIVE")
                self.stop.wait(self.locked)
                conn.execute("COMMIT")
                self.stop.wait(self.free)
        finally:
            conn.close()

    async def run_postgres(self) -> None:
        conn = await asyncpg.connect(plain_pg_url(self.database_url))
        try:
            while not self.stop.is_set():
                async with conn.transaction():
                    await conn.execute("LOCK TABLE llm_token_log IN EXCLUSIVE MODE")
                    await asyncio.sleep(self.locked)
                await asyncio.sleep(self.free)
        finally:
            await conn.close()


async def phase_throttled(args: argparse.Namespace, tmp: Path) -> dict[str, Any]:
    """Paced load; the database locked `duty` of the time in the middle third of the run."""
    n, seconds, duty = args.throttle_streams, args.throttle_seconds, args.throttle_duty
    samples: list[dict[str, Any]] = []
    with processes() as procs:
        procs.append(up := spawn_upstream(tmp, "upstream-throttle", args.paced_delay_ms))
        procs.append(d := await start_daemon(tmp, "daemon-throttle", args.database_url, up, {}))
        url = args.database_url or sqlite_url(d)
        health = f"http://127.0.0.1:{d.port}/api/health"
        wal_dir = d.log.parent / "wal"
        throttle = Throttle(url, duty)
        t0 = time.perf_counter()

        async def sample() -> None:
            while True:
                report = await asyncio.to_thread(http_json, health)
                wal = report["wal"]
                samples.append(
                    {
                        "t": round(time.perf_counter() - t0, 2),
                        "throttled": throttling.is_set(),
                        "rss_mib": round(tree_rss_kib(d.pid) / 1024, 1),
                        "backlog_records": wal["backlog_records"],
                        "backlog_bytes": wal["backlog_bytes"],
                        "wal_bytes_on_disk": sum(f.stat().st_size for f in wal_dir.glob("*")),
                    }
                )
                await asyncio.sleep(0.5)

        throttling = threading.Event()

        async def throttle_window() -> None:
            await asyncio.sleep(seconds / 3)
            throttling.set()
            if url.startswith("sqlite"):
                thread = asyncio.to_thread(throttle.run_sqlite, url.partition(":///")[2])
                task = asyncio.ensure_future(thread)
            else:
                task = asyncio.ensure_future(throttle.run_postgres())
            await asyncio.sleep(seconds / 3)
            throttle.stop.set()
            await task
            throttling.clear()

        sampler = asyncio.create_task(sample())
        window = asyncio.create_task(throttle_window())
        stats, _ = await streams_for(d.port, n, args.paced_tokens, seconds, args.paced_stagger_s)
        await window
        end_of_load = time.perf_counter() - t0
        while True:
            drained = (await asyncio.to_thread(http_json, health))["wal"]["backlog_records"] == 0
            if drained or time.perf_counter() - t0 > seconds + 120:
                break
            await asyncio.sleep(0.2)
        drained_at = time.perf_counter() - t0
        sampler.cancel()
    before = [s for s in samples if s["t"] < seconds / 3]
    during = [s for s in samples if s["throttled"]]
    return {
        "streams": n,
        "seconds": seconds,
        "duty": duty,
        "database": "sqlite" if url.startswith("sqlite") else "postgresql",
        "tokens": stats.tokens,
        "errors": len(stats.errors),
        "max_backlog_records": max(s["backlog_records"] for s in samples),
        "max_backlog_bytes": max(s["backlog_bytes"] for s in samples),
        "rss_mib_before_median": statistics.median(s["rss_mib"] for s in before),
        "rss_mib_throttled_max": max(s["rss_mib"] for s in during),
        "drained": drained,
        "drained_s_after_load": round(drained_at - end_of_load, 2),
        "samples": samples,
    }


# --------------------------------------------------------------------------- entry
def configure(args: argparse.Namespace) -> None:
    """The issue's scenarios; `--quick` shrinks every one to seconds (a smoke run, not figures)."""
    quick = args.quick
    args.rounds = args.rounds or (1 if quick else 2)
    args.paced_streams = [int(x) for x in args.paced_streams_sweep.split(",")]
    args.paced_delay_ms, args.paced_tokens = 20.0, (10 if quick else 200)
    args.paced_seconds = 0.5 if quick else 8.0
    # starts spread over one stream's length, so the streams overlap evenly
    args.paced_stagger_s = args.paced_tokens * args.paced_delay_ms / 1000
    args.instant_workers = [int(x) for x in args.workers_sweep.split(",")]
    args.instant_seconds = 0.5 if quick else 6.0
    args.open_streams = 50 if quick else 5000
    args.open_delay_ms = 1000.0  # quick: 3 s of streams, so the 1 s samples see them open
    args.open_tokens = 3 if quick else 60
    args.open_stagger_s = 0.5 if quick else 10.0
    args.open_settle_s = 0.5 if quick else 2.0
    args.throttle_streams = 20 if quick else 200
    args.throttle_seconds = 3.0 if quick else 45.0


async def run(args: argparse.Namespace) -> dict[str, Any]:
    configure(args)
    tmp = Path(tempfile.mkdtemp(prefix="llmsvc-scale-", dir=args.tmp_dir))
    report: dict[str, Any] = {"machine": machine_info(tmp, PACKAGES)}
    phases = {
        "paced": phase_paced,
        "instant": phase_instant,
        "open": phase_open,
        "throttled": phase_throttled,
    }
    started = time.perf_counter()
    for name in args.scale_phases.split(","):
        log(f"scale: {name}")
        report[name] = await phases[name](args, tmp)
    report["machine"]["loadavg_at_end"] = [round(x, 2) for x in os.getloadavg()]
    report["wall_s"] = round(time.perf_counter() - started, 1)
    if not args.keep_tmp:
        shutil.rmtree(tmp, ignore_errors=True)
    return report

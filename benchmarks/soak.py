#!/usr/bin/env python3
"""Soak llmsvc: steady paced load for a long time, watching for slow leaks and a growing backlog.

Not a test and not in CI: one long run that writes a JSON report and a PNG. bench.py measures
the daemon in bursts of seconds; a leak of a few bytes or one file descriptor per request, a
WAL backlog the flusher never quite catches up on, or latency creeping up as tables grow only
show after many minutes. So this holds a fixed number of paced streams open through the
daemon (`write` sync mode, SQLite unless --database-url) for --minutes, each worker streaming
replies back to back from the local upstream at one token per --token-delay-ms (each token
its own upstream write, the shape of a real provider), and every --interval seconds samples:

* the daemon's resident memory (VmRSS) and threads, from /proc/<pid>/status;
* its open file descriptors, the entries of /proc/<pid>/fd;
* the WAL backlog (records journaled, not yet committed to the database), from /api/health,
  with the WAL's segments and bytes on disk and how long /api/health took to answer;
* tokens/s, and the p99 of time to first token and of the gap between tokens the clients
  saw over the interval (a read carrying k tokens counts one gap and k-1 zero gaps);
* errors, and the CPU utilisation of the daemon, the upstream and this load generator.

Then it stops the load, times how long the backlog takes to return to zero, stops the
daemon with SIGTERM (it should exit 0), and reports growth after the warm-up: the median of
the last few samples over the median of the first few after the warm-up (default 10 % of the
run). Targets (the soak issue): resident memory and descriptors grow by at most 10 %; the
backlog returns to zero. Clients, upstream and daemon share the machine's cores: when
loadgen_cpu_util nears 1.0 the latencies include the load generator's own lag.

Setup (matplotlib is in the optional `bench` group):
    .venv/bin/pip install -e '.[test,bench]'
Usage:
    .venv/bin/python benchmarks/soak.py --streams N [--minutes 30] [--out soak.json]
        [--png soak.png] [--database-url postgresql://...]
A short check:  .venv/bin/python benchmarks/soak.py --minutes 2 --streams 100 --interval 5
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import shutil
import statistics
import sys
import tempfile
import time
from array import array
from collections import Counter
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import aiohttp
import uvloop
from benchkit import (
    EDGE,
    JSON_HEADERS,
    TOKEN_MARK,
    Endpoint,
    Proc,
    chat_body,
    log_tail,
    machine_busy_s,
    machine_info,
    new_session,
    pct,
    proc_cpu_s,
    spawn_daemon,
    spawn_upstream,
    stop_proc,
    wait_ready,
)

MODEL = "gpt-paced"
PACKAGES = ("aiohttp", "uvicorn", "uvloop", "orjson", "sqlalchemy", "aiosqlite", "asyncpg")
MEDIAN_OF = 3  # samples whose median stands for "at the end of the warm-up" and "at the end"
GROWTH_LIMIT = 0.10
ERROR_PAUSE_S = 1.0  # a worker whose stream failed waits this long, as a client would
INSTALL_HINT = "install it with: .venv/bin/pip install -e '.[test,bench]'"


def say(message: str) -> None:
    print(f"soak: {message}", file=sys.stderr, flush=True)


# --------------------------------------------------------------------------- the load
@dataclass
class Window:
    """What the clients saw since the last sample; swapped whole at each sample."""

    tokens: int = 0
    streams: int = 0
    ttfts: array[float] = field(default_factory=lambda: array("d"))
    gaps: array[float] = field(default_factory=lambda: array("d"))
    errors: Counter[str] = field(default_factory=Counter)


@dataclass
class Load:
    window: Window = field(default_factory=Window)
    stopped: bool = False  # the daemon died: no point in going on
    errors: Counter[str] = field(default_factory=Counter)
    first_errors: list[str] = field(default_factory=list)

    def take(self) -> Window:
        window, self.window = self.window, Window()
        return window

    def failed(self, exc: BaseException) -> None:
        kind = getattr(exc, "kind", None) or type(exc).__name__
        self.window.errors[kind] += 1
        self.errors[kind] += 1
        if len(self.first_errors) < 5:
            self.first_errors.append(f"{kind}: {str(exc)[:300]}")
            say(f"stream error {kind}: {str(exc)[:200]}")


class StreamError(Exception):
    def __init__(self, kind: str, message: str) -> None:
        super().__init__(message)
        self.kind = kind


async def stream_timed(ep: Endpoint, body: bytes, expect: int, into: Load) -> None:
    """One streaming reply, token events counted without parsing (as bench.stream does), with
    the time to the first token and every gap between tokens recorded in the current window."""
    t0 = time.perf_counter()
    tokens, tail, last = 0, b"", 0.0
    async with ep.session.post(ep.url, data=body, headers=JSON_HEADERS) as resp:
        if resp.status != 200:
            text = (await resp.read())[:300]
            raise StreamError(f"http_{resp.status}", repr(text))
        async for chunk in resp.content.iter_any():
            now = time.perf_counter()
            n = chunk.count(TOKEN_MARK) + (tail + chunk[:EDGE]).count(TOKEN_MARK)
            tail = chunk[-EDGE:] if len(chunk) >= EDGE else (tail + chunk)[-EDGE:]
            if n:
                window = into.window  # the sampler may have swapped it since the last read
                if tokens:
                    window.gaps.append(now - last)
                else:
                    window.ttfts.append(now - t0)
                if n > 1:  # tokens that came in one read reached the client together
                    window.gaps.extend([0.0] * (n - 1))
                window.tokens += n
                tokens, last = tokens + n, now
    if tokens != expect or not tail.endswith(b"data: [DONE]\n\n"[-EDGE:]):
        raise StreamError("short_stream", f"{tokens} tokens of {expect}, or no [DONE]")
    into.window.streams += 1


async def worker(
    ep: Endpoint, body: bytes, tokens: int, start: float, end: float, load: Load
) -> None:
    """Streams back to back from `start` until `end`; a failure is counted, then retried."""
    await asyncio.sleep(max(0.0, start - time.perf_counter()))
    while time.perf_counter() < end and not load.stopped:
        try:
            await stream_timed(ep, body, tokens, load)
        except (aiohttp.ClientError, OSError, StreamError) as exc:  # TimeoutError is an OSError
            load.failed(exc)
            await asyncio.sleep(ERROR_PAUSE_S)


def stagger(streams: int, stream_s: float) -> list[float]:
    """Start offsets spread over one reply's length, so the load is even, not in waves."""
    return [stream_s * i / streams for i in range(streams)]


# --------------------------------------------------------------------------- the samples
@dataclass
class Sample:
    """One interval; `t_s` is its end, in seconds since the load started."""

    t_s: float
    phase: str  # warmup, steady, rampdown (streams finishing after the end), drained
    interval_s: float
    rss_mib: float
    threads: int
    fds: int
    wal_backlog_records: int | None
    wal_backlog_bytes: int | None
    wal_segments: int | None
    wal_bytes: int | None
    health_status: str | None
    health_ms: float | None
    db_bytes: int | None
    streams: int
    tokens_per_s: float
    ttft_p50_ms: float | None
    ttft_p99_ms: float | None
    gap_p99_ms: float | None
    gap_max_ms: float | None
    errors: int
    daemon_cpu_util: float
    upstream_cpu_util: float
    loadgen_cpu_util: float
    other_cpu_util: float  # the rest of the machine (in cores): noise on a shared machine


def proc_status(pid: int) -> tuple[float, int]:
    """(VmRSS in MiB, threads) of a process, from /proc/<pid>/status."""
    rss_kib, threads = 0, 0
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                rss_kib = int(line.split()[1])
            elif line.startswith("Threads:"):
                threads = int(line.split()[1])
    return rss_kib / 1024, threads


def open_fds(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/fd"))


def file_bytes(paths: Sequence[Path]) -> int:
    total = 0
    for path in paths:
        with contextlib.suppress(FileNotFoundError):
            total += path.stat().st_size
    return total


def ms_pct(values: Sequence[float], q: float) -> float | None:
    return round(pct(values, q) * 1e3, 2) if values else None


class Probe:
    """Reads the daemon from outside: /proc for memory and descriptors, /api/health for the WAL.

    CPU is utime+stime deltas between samples, so each sample's utilisation is its own interval's.
    """

    def __init__(
        self, daemon: Proc, upstream: Proc, session: aiohttp.ClientSession, db_files: list[Path]
    ) -> None:
        self.daemon, self.upstream, self.session = daemon, upstream, session
        self.health_url = f"http://127.0.0.1:{daemon.port}/api/health"
        self.db_files = db_files
        self.t0 = time.perf_counter()
        self.last = self._cpu()

    def _cpu(self) -> tuple[float, float, float, float, float]:
        return (
            time.perf_counter(),
            proc_cpu_s(self.daemon.pid),
            proc_cpu_s(self.upstream.pid),
            time.process_time(),
            machine_busy_s(),
        )

    async def health(self) -> tuple[dict[str, Any], float | None]:
        """/api/health's JSON and how long it took, or ({}, None) if it did not answer."""
        t0 = time.perf_counter()
        try:
            async with self.session.get(
                self.health_url, timeout=aiohttp.ClientTimeout(total=10)
            ) as resp:
                body = await resp.json()
        except (aiohttp.ClientError, TimeoutError, ValueError) as exc:
            say(f"/api/health did not answer: {type(exc).__name__}: {exc}")
            return {}, None
        return body, (time.perf_counter() - t0) * 1e3

    async def backlog(self) -> int | None:
        body, _ = await self.health()
        value = body.get("wal", {}).get("backlog_records")
        return None if value is None else int(value)

    async def sample(self, window: Window, phase: str) -> Sample:
        health, health_ms = await self.health()
        wal = health.get("wal", {})
        now = self._cpu()
        dt = now[0] - self.last[0]
        daemon_cpu, upstream_cpu, own_cpu, busy = (now[i] - self.last[i] for i in (1, 2, 3, 4))
        self.last = now
        rss_mib, threads = proc_status(self.daemon.pid)
        return Sample(
            t_s=round(now[0] - self.t0, 2),
            phase=phase,
            interval_s=round(dt, 3),
            rss_mib=round(rss_mib, 2),
            threads=threads,
            fds=open_fds(self.daemon.pid),
            wal_backlog_records=wal.get("backlog_records"),
            wal_backlog_bytes=wal.get("backlog_bytes"),
            wal_segments=wal.get("segments"),
            wal_bytes=wal.get("bytes"),
            health_status=health.get("status"),
            health_ms=None if health_ms is None else round(health_ms, 2),
            db_bytes=file_bytes(self.db_files) if self.db_files else None,
            streams=window.streams,
            tokens_per_s=round(window.tokens / dt, 1),
            ttft_p50_ms=ms_pct(window.ttfts, 0.5),
            ttft_p99_ms=ms_pct(window.ttfts, 0.99),
            gap_p99_ms=ms_pct(window.gaps, 0.99),
            gap_max_ms=round(max(window.gaps) * 1e3, 2) if window.gaps else None,
            errors=sum(window.errors.values()),
            daemon_cpu_util=round(daemon_cpu / dt, 3),
            upstream_cpu_util=round(upstream_cpu / dt, 3),
            loadgen_cpu_util=round(own_cpu / dt, 3),
            other_cpu_util=round(max(0.0, busy - daemon_cpu - upstream_cpu - own_cpu) / dt, 3),
        )


async def sample_load(
    probe: Probe, load: Load, args: argparse.Namespace, samples: list[Sample]
) -> None:
    """A sample every interval until the load's end (the last interval may be shorter)."""
    end = probe.t0 + args.seconds
    tick = probe.t0
    while tick < end:
        tick = min(tick + args.interval, end)
        await asyncio.sleep(max(0.0, tick - time.perf_counter()))
        phase = "warmup" if tick - probe.t0 <= args.warmup + 1e-6 else "steady"
        if (last := await sample_or_stop(probe, load, phase)) is None:
            return
        samples.append(last)
        say(
            f"{last.t_s / 60:5.1f} min rss {last.rss_mib:.1f} MiB fds {last.fds} "
            f"backlog {last.wal_backlog_records} {last.tokens_per_s:,.0f} tok/s "
            f"ttft p99 {last.ttft_p99_ms} ms gap p99 {last.gap_p99_ms} ms "
            f"cpu {last.daemon_cpu_util:.2f} errors {last.errors}"
        )


async def sample_or_stop(probe: Probe, load: Load, phase: str) -> Sample | None:
    """A sample, or None once the daemon has died (its /proc entry goes with it): the load
    is then stopped, and the report says so rather than ending in a traceback."""
    try:
        if probe.daemon.popen.poll() is None:
            return await probe.sample(load.take(), phase)
    except (FileNotFoundError, ProcessLookupError):
        pass
    if not load.stopped:
        say(f"the daemon exited (code {probe.daemon.popen.poll()}); stopping the load")
        load.stopped = True
    return None


async def wait_backlog_zero(probe: Probe, limit_s: float) -> tuple[float | None, int | None]:
    """Seconds until /api/health reports no backlog (None if not within `limit_s`)."""
    t0 = time.perf_counter()
    while probe.daemon.popen.poll() is None:
        backlog = await probe.backlog()
        elapsed = time.perf_counter() - t0
        if backlog == 0:
            return elapsed, 0
        if elapsed > limit_s:
            return None, backlog
        await asyncio.sleep(0.05)
    return None, None


# --------------------------------------------------------------------------- the summary
def median_of(samples: Sequence[Sample], key: str) -> float | None:
    values = [getattr(s, key) for s in samples if getattr(s, key) is not None]
    return statistics.median(values) if values else None


def growth(samples: Sequence[Sample], key: str, judged: bool = True) -> dict[str, Any]:
    """The median of the last few steady samples over that of the first few (after warm-up);
    `judged` against the soak's 10 % target, or only reported (threads: the default executor
    adds its workers lazily, so one more thread is no leak)."""
    steady = [s for s in samples if s.phase == "steady"]
    first = median_of(steady[:MEDIAN_OF], key)
    last = median_of(steady[-MEDIAN_OF:], key)
    if not first or last is None:
        return {"at_warmup_end": first, "at_end": last, "ratio": None, "met": False}
    ratio = last / first
    out: dict[str, Any] = {
        "at_warmup_end": round(first, 2),
        "at_end": round(last, 2),
        "ratio": round(ratio, 4),
        "growth": round(ratio - 1, 4),
    }
    if judged:
        out |= {"target": f"<= {GROWTH_LIMIT:.0%} growth", "met": ratio - 1 <= GROWTH_LIMIT}
    return out


def spread(samples: Sequence[Sample], key: str) -> dict[str, float | None]:
    values = [getattr(s, key) for s in samples if getattr(s, key) is not None]
    if not values:
        return {"median": None, "max": None}
    return {"median": round(statistics.median(values), 2), "max": round(max(values), 2)}


def summarize(
    samples: list[Sample], load: Load, drain_s: float | None, backlog_left: int | None
) -> dict[str, Any]:
    loaded = [s for s in samples if s.phase in ("warmup", "steady")]
    steady = [s for s in samples if s.phase == "steady"]
    backlogs = [s.wal_backlog_records for s in samples if s.wal_backlog_records is not None]
    tokens = sum(s.tokens_per_s * s.interval_s for s in samples)
    return {
        "rss_mib": growth(samples, "rss_mib"),
        "open_fds": growth(samples, "fds"),
        "threads": growth(samples, "threads", judged=False),
        "wal_backlog_records": {
            "max": max(backlogs, default=None),
            "median_steady": median_of(steady, "wal_backlog_records"),
            "drained": drain_s is not None,
            "drain_s": None if drain_s is None else round(drain_s, 3),
            "left_after_drain_limit": backlog_left,
            "target": "returns to zero after the load",
            "met": drain_s is not None,
        },
        "tokens": round(tokens),
        "streams": sum(s.streams for s in samples),
        "tokens_per_s_steady": spread(steady, "tokens_per_s"),
        "ttft_p99_ms_steady": spread(steady, "ttft_p99_ms"),
        "gap_p99_ms_steady": spread(steady, "gap_p99_ms"),
        "gap_max_ms": spread(loaded, "gap_max_ms")["max"],
        "health_ms_steady": spread(steady, "health_ms"),
        "daemon_cpu_util_steady": spread(steady, "daemon_cpu_util"),
        "loadgen_cpu_util_steady": spread(steady, "loadgen_cpu_util"),
        "other_cpu_util_steady": spread(steady, "other_cpu_util"),
        "errors": sum(load.errors.values()),
        "errors_by_kind": dict(load.errors),
        "first_errors": load.first_errors,
    }


def log_problems(path: Path, keep: int = 5) -> dict[str, Any]:
    """The daemon's WARNING and ERROR lines: a soak should not produce any."""
    lines = [
        ln
        for ln in path.read_text(errors="replace").splitlines()
        if " WARNING " in ln or " ERROR " in ln or " CRITICAL " in ln
    ]
    return {"count": len(lines), "first": lines[:keep]}


# --------------------------------------------------------------------------- the plot
def plot(report: dict[str, Any], png: Path) -> None:
    """Four panels over one time axis; the warm-up shaded, the end of the load dotted.

    Drawn from the report alone, so a report already written can be drawn again."""
    from matplotlib import pyplot as plt

    samples = [Sample(**s) for s in report["samples"]]

    def series(key: str) -> list[float]:
        return [float("nan") if (v := getattr(s, key)) is None else v for s in samples]

    params, summary = report["params"], report["summary"]
    minutes = [s.t_s / 60 for s in samples]
    fig, axes = plt.subplots(4, 1, sharex=True, figsize=(10, 11), constrained_layout=True)
    panels = [
        ("rss_mib", "resident memory (MiB)", summary["rss_mib"]),
        ("fds", "open file descriptors", summary["open_fds"]),
        ("wal_backlog_records", "WAL backlog (records)", None),
    ]
    for ax, (key, label, grew) in zip(axes, panels, strict=False):
        ax.plot(minutes, series(key), marker="o", markersize=3, color="tab:blue")
        ax.set_ylabel(label)
        if grew and grew.get("ratio") is not None:
            ok = "met" if grew["met"] else "NOT met"
            base, warm = grew["at_warmup_end"], params["warmup"] / 60
            ax.hlines(base, warm, minutes[-1], colors="0.5", linewidth=0.8)
            ax.hlines(
                base * (1 + GROWTH_LIMIT),
                warm,
                minutes[-1],
                colors="tab:red",
                linestyles="--",
                linewidth=0.8,
                label=f"+{GROWTH_LIMIT:.0%} over the median after warm-up",
            )
            ax.legend(loc="lower right", fontsize=8)
            ax.set_title(
                f"{grew['at_warmup_end']:g} after warm-up, {grew['at_end']:g} at the end: "
                f"{grew['growth']:+.1%} ({ok}, target <= {GROWTH_LIMIT:.0%})",
                fontsize=9,
                loc="left",
            )
    backlog = summary["wal_backlog_records"]
    drained = (
        f"drained {backlog['drain_s']:.2f} s after the load stopped"
        if backlog["drained"]
        else "NOT drained"
    )
    axes[2].set_title(f"max {backlog['max'] or 0:,}; {drained}", fontsize=9, loc="left")
    after = [s for s in samples if s.phase == "drained"]
    if after and after[-1].wal_backlog_records is not None:
        axes[2].plot(
            after[-1].t_s / 60,
            after[-1].wal_backlog_records,
            marker="*",
            markersize=10,
            color="tab:green",
            linestyle="none",
            label="after the drain",
        )
        axes[2].legend(loc="upper right", fontsize=8)
    axes[3].plot(minutes, series("ttft_p99_ms"), marker="o", markersize=3, label="p99 TTFT")
    axes[3].plot(
        minutes, series("gap_p99_ms"), marker="o", markersize=3, label="p99 inter-token gap"
    )
    axes[3].set_ylabel("client latency (ms)")
    axes[3].axvline(params["seconds"] / 60, color="0.5", linestyle=":", label="load stopped")
    axes[3].legend(loc="upper left", fontsize=9)
    axes[3].set_xlabel("minutes since the load started")
    for ax in axes:
        ax.axvspan(0, params["warmup"] / 60, color="0.9", zorder=0)
        ax.axvline(params["seconds"] / 60, color="0.5", linestyle=":", linewidth=1)
        ax.set_ylim(bottom=0)
        ax.grid(alpha=0.3)
    axes[0].text(0.005, 0.05, " warm-up", transform=axes[0].transAxes, fontsize=8, color="0.4")
    store = report["daemon"]["database"]
    fig.suptitle(
        f"llmsvc soak: {params['streams']} streams x {params['tokens']} tokens at "
        f"{params['token_delay_ms']:g} ms/token, {store}, wal_sync=write, "
        f"commit {report['machine']['llmsvc_commit']}",
        fontsize=11,
    )
    fig.savefig(png, dpi=100)
    plt.close(fig)


# --------------------------------------------------------------------------- orchestration
def provider(up: Proc) -> dict[str, Any]:
    return {
        "name": "paced",
        "kind": "openai",
        "base_url": f"http://127.0.0.1:{up.port}/v1",
        "api_key": "sk-soak",
        "models": [MODEL],
    }


def without_password(url: str) -> str:
    """The store's URL for the report, minus any password in it."""
    parts = urlsplit(url)
    if parts.password is None:
        return url
    return urlunsplit(parts._replace(netloc=parts.netloc.replace(f":{parts.password}@", ":***@")))


def sqlite_files(database_url: str) -> list[Path]:
    """The SQLite database and its own WAL, whose sizes are sampled (none for PostgreSQL)."""
    if not database_url.startswith("sqlite"):
        return []
    db = Path(database_url.partition(":///")[2])
    return [db, db.with_name(db.name + "-wal"), db.with_name(db.name + "-shm")]


async def run_load(args: argparse.Namespace, daemon: Proc, upstream: Proc) -> dict[str, Any]:
    """The load, the samples, the drain; returns the report's samples and summary."""
    samples: list[Sample] = []
    load = Load()
    session, probe_session = new_session(), new_session()
    try:
        probe = Probe(daemon, upstream, probe_session, sqlite_files(args.database_url))
        ep = Endpoint(
            "daemon", f"http://127.0.0.1:{daemon.port}/v1/chat/completions", session, MODEL
        )
        body = chat_body(MODEL, args.tokens, stream=True)
        end = probe.t0 + args.seconds
        stream_s = args.tokens * args.token_delay_ms / 1e3
        workers = [
            worker(ep, body, args.tokens, probe.t0 + offset, end, load)
            for offset in stagger(args.streams, stream_s)
        ]
        sampler = asyncio.create_task(sample_load(probe, load, args, samples))
        await asyncio.wait_for(asyncio.gather(*workers), args.seconds + stream_s + 120)
        await sampler
        drain_s, left = None, None
        if rampdown := await sample_or_stop(probe, load, "rampdown"):
            samples.append(rampdown)
            say("load stopped; waiting for the WAL backlog to reach zero")
            drain_s, left = await wait_backlog_zero(probe, args.drain_limit)
        if drained := await sample_or_stop(probe, load, "drained"):
            samples.append(drained)
    finally:
        await session.close()
        await probe_session.close()
    summary = summarize(samples, load, drain_s, left)
    return {"samples": samples, "summary": summary, "died_during_load": load.stopped}


async def soak(args: argparse.Namespace, tmp: Path) -> dict[str, Any]:
    database_url = args.database_url = args.database_url or f"sqlite:///{tmp / 'llmsvc.db'}"
    report: dict[str, Any] = {"machine": machine_info(tmp, PACKAGES)}
    report["params"] = {
        k: str(v) if isinstance(v, Path) else v
        for k, v in vars(args).items()
        if k not in ("tmp_dir", "keep_tmp")
    } | {"database_url": without_password(database_url)}
    started: list[Proc] = []
    try:
        started.append(upstream := spawn_upstream(tmp, "upstream", args.token_delay_ms))
        settings = {f"LLMSVC_{name.upper()}": value for name, value in args.setting}
        started.append(
            daemon := spawn_daemon(tmp, database_url, [provider(upstream)], settings=settings)
        )
        await wait_ready(daemon)
        say(
            f"daemon pid {daemon.pid} port {daemon.port}, upstream pid {upstream.pid}; "
            f"{args.streams} streams for {args.seconds / 60:g} min, warm-up {args.warmup:g} s"
        )
        measured = await run_load(args, daemon, upstream)
        alive = daemon.popen.poll() is None
        cpu_total = round(proc_cpu_s(daemon.pid), 2) if alive else None
        code = await asyncio.to_thread(stop_proc, daemon.popen, 60)
        if code != 0:
            say(f"daemon exit code {code}:\n{log_tail(daemon.log)}")
    finally:
        for proc in reversed(started):
            stop_proc(proc.popen)
    report["daemon"] = {
        "database": "sqlite" if database_url.startswith("sqlite") else "postgresql",
        "wal_sync": "write",
        "cpu_s_total": cpu_total,
        "died_during_load": measured["died_during_load"],
        "exit_code": code,
        "exit_ok": code == 0 and not measured["died_during_load"],
        "log_problems": log_problems(daemon.log),
    }
    report["summary"] = measured["summary"]
    report["samples"] = [asdict(s) for s in measured["samples"]]
    return report


def tell(report: dict[str, Any]) -> None:
    """A few lines for the operator; the JSON holds the rest."""
    p, s, d = report["params"], report["summary"], report["daemon"]

    def grew(name: str, g: dict[str, Any]) -> str:
        if g.get("ratio") is None:
            return f"{name} n/a"
        ok = "" if "met" not in g else ", met" if g["met"] else ", NOT MET"
        return f"{name} {g['at_warmup_end']:g} -> {g['at_end']:g} ({g['growth']:+.1%}{ok})"

    b = s["wal_backlog_records"]
    drained = f"drained in {b['drain_s']:.2f} s" if b["drained"] else "NOT DRAINED"
    for line in (
        f"{p['seconds'] / 60:g} min, {p['streams']} streams x {p['tokens']} tokens at "
        f"{p['token_delay_ms']:g} ms/token: {s['tokens']:,} tokens, {s['streams']:,} streams, "
        f"{s['errors']} errors" + (f" {s['errors_by_kind']}" if s["errors"] else ""),
        f"{grew('RSS MiB', s['rss_mib'])}; {grew('fds', s['open_fds'])}; "
        f"{grew('threads', s['threads'])}",
        f"WAL backlog max {b['max'] or 0:,} records "
        f"(steady median {b['median_steady']}), {drained}",
        f"steady: {s['tokens_per_s_steady']['median'] or 0:,.0f} tok/s, p99 TTFT median "
        f"{s['ttft_p99_ms_steady']['median']} ms (max {s['ttft_p99_ms_steady']['max']}), "
        f"p99 gap median {s['gap_p99_ms_steady']['median']} ms "
        f"(max {s['gap_p99_ms_steady']['max']}), daemon CPU "
        f"{s['daemon_cpu_util_steady']['median']}, load generator CPU "
        f"{s['loadgen_cpu_util_steady']['median']}, other processes "
        f"{s['other_cpu_util_steady']['median']}",
        f"daemon {'DIED during the load, ' if d['died_during_load'] else ''}"
        f"exit {d['exit_code']}, {d['log_problems']['count']} WARNING/ERROR log lines; "
        f"report {p['out']}, plot {report['png']}",
    ):
        say(line)


# --------------------------------------------------------------------------- entry point
def require_matplotlib() -> None:
    """Fail before a half-hour run, not after it, if the plot cannot be drawn."""
    try:
        import matplotlib
    except ImportError:
        sys.exit(f"soak: matplotlib is missing; {INSTALL_HINT}")
    matplotlib.use("Agg")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    p.add_argument("--minutes", type=float, default=30.0, help="length of the load (default 30)")
    p.add_argument(
        "--streams",
        type=int,
        default=500,
        help="paced streams held open through the daemon, i.e. the load (default 500): "
        "streams x 1000 / token-delay-ms tokens/s. The soak runs at half the paced maximum, "
        "which the operator sets: half the concurrency bench.py's paced scenario sustains "
        "on this machine",
    )
    p.add_argument("--tokens", type=int, default=200, help="tokens per reply (default 200)")
    p.add_argument(
        "--token-delay-ms", type=float, default=20.0, help="upstream pause per token (default 20)"
    )
    p.add_argument(
        "--interval", type=float, default=10.0, help="seconds between samples (default 10)"
    )
    p.add_argument(
        "--warmup",
        type=float,
        default=None,
        help="seconds left out of the growth figures (default 10 %% of the run)",
    )
    p.add_argument(
        "--drain-limit",
        type=float,
        default=300.0,
        help="seconds the WAL backlog may take to reach zero after the load (default 300)",
    )
    p.add_argument("--out", type=Path, default=Path("soak.json"), help="the JSON report")
    p.add_argument("--png", type=Path, default=Path("soak.png"), help="the plot")
    p.add_argument("--database-url", default="", help="the daemon's store (default: SQLite)")
    p.add_argument("--tmp-dir", default=None, help="where the WAL and SQLite files go")
    p.add_argument("--keep-tmp", action="store_true")
    p.add_argument(
        "--setting",
        type=_setting,
        action="append",
        default=[],
        metavar="NAME=VALUE",
        help="a daemon setting, e.g. gap_scan_schedule='*/5 * * * *' (repeatable)",
    )
    args = p.parse_args(argv)
    args.seconds = args.minutes * 60
    if args.warmup is None:
        args.warmup = args.seconds / 10
    if args.streams < 1 or args.tokens < 1 or args.interval <= 0:
        p.error("--streams and --tokens must be >= 1, --interval > 0")
    if not 0 <= args.warmup < args.seconds - args.interval * MEDIAN_OF:
        p.error(f"--warmup must leave at least {MEDIAN_OF} intervals of the run after it")
    return args


def _setting(text: str) -> tuple[str, str]:
    name, sep, value = text.partition("=")
    if not sep or not name:
        raise argparse.ArgumentTypeError(f"expected NAME=VALUE, got {text!r}")
    return name, value


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    require_matplotlib()
    tmp = Path(tempfile.mkdtemp(prefix="llmsvc-soak-", dir=args.tmp_dir))
    started = time.perf_counter()
    try:
        report = uvloop.run(soak(args, tmp))
    finally:
        if args.keep_tmp:
            say(f"kept {tmp}")
        else:
            shutil.rmtree(tmp, ignore_errors=True)
    report["machine"]["loadavg_at_end"] = [round(x, 2) for x in os.getloadavg()]
    report["wall_s"] = round(time.perf_counter() - started, 1)
    report["png"] = str(args.png)
    args.out.write_text(json.dumps(report, indent=1, allow_nan=False) + "\n")
    plot(report, args.png)
    tell(report)


if __name__ == "__main__":
    main()

#!/usr/bin/env python3
"""llmsvc beside other gateways, each in front of the same local upstream, in one run.

Not a test, and nothing of any peer is in this repository: each peer is a command the
operator gives, installed wherever they like. The script starts the local OpenAI-wire
upstream (tests/upstreams/openai_upstream.py), an llmsvc daemon (SQLite, defaults) and every
peer, then measures, interleaved round by round with the order rotated:

1. added latency, non-streaming, concurrency 1: p50/p99 of each gateway minus the
   upstream called directly in the same round;
2. CPU per streamed token: utime+stime of each gateway's whole process tree (from
   /proc) over a streaming run and what follows it (llmsvc's flush of the run's tokens;
   any peer's after-the-stream work, read once its CPU stops rising).

The upstream paces streamed tokens (1 ms each by default), so every token arrives in its
own read, as from a real provider, and per-token costs cannot hide in big batches.
Ratios are medians of per-round ratios, so a noisy shared machine hurts each side alike.

A peer command may use `{port}` (a free port it must listen on), `{upstream}` (the
upstream's base URL, also in the environment as BENCH_UPSTREAM_URL, for config files) and
`{upstream_port}`;
`--header NAME=FIELD:VALUE` adds a header to each request sent to that peer. Header values
are not recorded in the report.

Usage:
    .venv/bin/python benchmarks/bench_peers.py [--quick] [--out peers.json] \\
        --peer 'litellm=/path/litellm --config cfg.yaml --host 127.0.0.1 --port {port}' \\
        --header 'litellm=Authorization:Bearer KEY' --version litellm=1.2.3 \\
        --peer 'portkey=node /path/start-server.js --port={port} --headless' \\
        --header 'portkey=x-portkey-provider:openai' \\
        --header 'portkey=x-portkey-custom-host:{upstream}' \\
        --peer 'relay=python benchmarks/relay_floor.py
                --port {port} --upstream-port {upstream_port}'
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import shlex
import shutil
import signal
import subprocess
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, NoReturn

import aiohttp
import uvloop
from benchkit import (
    CLK_TCK,
    EDGE,
    MODEL,
    PACKAGES,
    TOKEN_MARK,
    Endpoint,
    Proc,
    Raw,
    add,
    chat_body,
    chat_url,
    complete,
    free_port,
    log,
    log_tail,
    machine_info,
    open_token_rows,
    pct,
    per_round,
    proc_cpu_s,
    processes,
    rotated,
    spawn_daemon,
    spawn_upstream,
    stream_load,
    summary,
    upstream_provider,
    wait_drained,
    wait_ready,
    write_report,
)

LLMSVC = "llmsvc"


@dataclass
class Peer:
    """A gateway under test: its command and the headers each request to it carries."""

    name: str
    command: str
    headers: dict[str, str] = field(default_factory=dict)
    version: str = ""


@dataclass
class Gateway:
    """A running gateway: where to send requests, and the process whose tree is its CPU."""

    name: str
    endpoint: Endpoint
    proc: Proc
    group: bool  # a peer runs in a session of its own: signals go to its whole group

    @property
    def pid(self) -> int:
        return self.proc.pid

    def terminate(self) -> None:
        """SIGTERM, as a service manager stops it (systemd signals the whole group)."""
        if self.group:
            os.killpg(self.pid, signal.SIGTERM)
        else:
            os.kill(self.pid, signal.SIGTERM)


def descendants(root: int) -> list[int]:
    """The process and every live descendant (a peer may run workers under a launcher)."""
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat", "rb") as f:
                ppid = int(f.read().rsplit(b")", 1)[1].split()[1])
        except (FileNotFoundError, ProcessLookupError):
            continue
        children.setdefault(ppid, []).append(int(entry))
    found, todo = [], [root]
    while todo:
        pid = todo.pop()
        found.append(pid)
        todo.extend(children.get(pid, []))
    return found


def tree_cpu_s(root: int) -> float:
    total = 0.0
    for pid in descendants(root):
        with contextlib.suppress(FileNotFoundError, ProcessLookupError):  # it just exited
            total += proc_cpu_s(pid)
    return total


async def settled_cpu_s(root: int, limit_s: float = 15) -> float:
    """The tree's CPU once it stops rising: work a gateway does after the last byte counts."""
    deadline = time.monotonic() + limit_s
    last = tree_cpu_s(root)
    while time.monotonic() < deadline:
        await asyncio.sleep(0.5)
        now = tree_cpu_s(root)
        if now - last < 1.5 / CLK_TCK:
            return now
        last = now
    return last


def split_pair(text: str) -> tuple[str, str]:
    name, sep, rest = text.partition("=")
    if not sep or not name or not rest:
        raise argparse.ArgumentTypeError(f"expected NAME=VALUE, got {text!r}")
    return name, rest


def peers_from(args: argparse.Namespace, error: Callable[[str], NoReturn]) -> list[Peer]:
    """The peers the arguments describe; `error` reports a bad one (argparse: exit 2)."""
    peers = {name: Peer(name, command) for name, command in args.peer}
    for kind, pairs in (("header", args.header), ("version", args.version)):
        for name, value in pairs:
            if name not in peers:
                error(f"--{kind} for {name!r}, which is no --peer")
            if kind == "version":
                peers[name].version = value
                continue
            field_name, sep, field_value = value.partition(":")
            if not sep:
                error(f"--header {name}={value!r} needs FIELD:VALUE")
            peers[name].headers[field_name.strip()] = field_value.strip()
    if LLMSVC in peers or "direct" in peers:
        error("'llmsvc' and 'direct' name the built-in endpoints: choose another --peer name")
    return list(peers.values())


def spawn_peer(tmp: Path, peer: Peer, upstream_port: int) -> tuple[Proc, dict[str, str]]:
    """Start a peer in its own session (so its whole group can be stopped); its headers."""
    port, upstream_url = free_port(), f"http://127.0.0.1:{upstream_port}/v1"
    fill = {"port": str(port), "upstream": upstream_url, "upstream_port": str(upstream_port)}
    command = [part.format(**fill) for part in shlex.split(peer.command)]
    env = {**os.environ, "BENCH_UPSTREAM_URL": upstream_url}
    logfile = tmp / f"{peer.name}.log"
    with logfile.open("wb") as out:
        popen = subprocess.Popen(
            command,
            env=env,
            stdin=subprocess.DEVNULL,
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    headers = {k: v.format(**fill) for k, v in peer.headers.items()}
    return Proc(peer.name, popen, port, logfile), headers


def stop_group(proc: Proc) -> None:
    """SIGTERM to the peer's process group, then SIGKILL to whatever of it lingers."""
    if proc.popen.poll() is None:
        os.killpg(proc.pid, signal.SIGTERM)
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.popen.wait(20)
    with contextlib.suppress(ProcessLookupError):  # the group is gone: nothing lingers
        os.killpg(proc.pid, signal.SIGKILL)
    proc.popen.wait(10)


async def wait_serving(proc: Proc, ep: Endpoint, limit_s: float = 180) -> None:
    """Until one chat completion succeeds through the peer (some take long to import)."""
    deadline = time.monotonic() + limit_s
    body = chat_body(MODEL, 4, stream=False)
    while True:
        try:
            async with ep.session.post(ep.url, data=body) as resp:
                if resp.status == 200:
                    return
                detail = f"HTTP {resp.status}: {(await resp.read())[:300]!r}"
        except aiohttp.ClientError as e:
            detail = repr(e)
        if proc.popen.poll() is not None or time.monotonic() > deadline:
            raise RuntimeError(f"{proc.name} did not serve ({detail}):\n{log_tail(proc.log)}")
        await asyncio.sleep(0.5)


def new_session(headers: dict[str, str]) -> aiohttp.ClientSession:
    connector = aiohttp.TCPConnector(limit=0, keepalive_timeout=3)
    return aiohttp.ClientSession(
        connector=connector,
        timeout=aiohttp.ClientTimeout(total=300),
        headers={"Content-Type": "application/json", **headers},
    )


async def phase_latency(
    direct: Endpoint, gateways: list[Gateway], rounds: int, n: int
) -> dict[str, Any]:
    """Non-streaming, one request at a time: what each hop adds to a call."""
    raw: Raw = {}
    eps = [direct, *(g.endpoint for g in gateways)]
    body = chat_body(MODEL, 16, stream=False)
    for r in range(rounds):
        for ep in rotated(eps, r):
            lats = [await complete(ep, body) for _ in range(n)]
            add(raw, f"{ep.name}_p50_ms", pct(lats, 0.5) * 1e3)
            add(raw, f"{ep.name}_p99_ms", pct(lats, 0.99) * 1e3)
        for g in gateways:
            for q in ("p50", "p99"):
                added = raw[f"{g.name}_{q}_ms"][-1] - raw[f"direct_{q}_ms"][-1]
                add(raw, f"{g.name}_added_{q}_ms", added)
        ours = raw[f"{LLMSVC}_added_p50_ms"][-1]
        for g in gateways:
            if g.name != LLMSVC:
                theirs = raw[f"{g.name}_added_p50_ms"][-1]
                add(raw, f"{g.name}_over_llmsvc_added_p50", theirs / ours if ours > 0 else None)
        log(
            f"latency round {r + 1}/{rounds}: "
            + ", ".join(f"{g.name} +{raw[f'{g.name}_added_p50_ms'][-1]:.2f} ms" for g in gateways)
        )
    return {"requests_per_round": n, "rounds": rounds, **summary(raw), "per_round": per_round(raw)}


async def phase_stream_cpu(
    gateways: list[Gateway], database_url: str, rounds: int, conc: int, tokens: int, per: int
) -> dict[str, Any]:
    """Streams at concurrency: each gateway's CPU per token, its own and what follows."""
    raw: Raw = {}
    rows = await open_token_rows(database_url)
    try:
        for r in range(rounds):
            for g in rotated(gateways, r):
                await stream_load(g.endpoint, 1, conc, 1, limit_s=60)  # open the pool first
                cpu0 = await settled_cpu_s(g.pid)
                since, t0 = datetime.now(UTC), time.perf_counter()
                got = await stream_load(g.endpoint, tokens, conc, per, limit_s=600)
                t_stop = time.perf_counter()
                if g.name == LLMSVC:  # its CPU includes the flush of this run's tokens
                    drain, seen = await wait_drained(rows, since, got.tokens, t_stop, 120)
                    if drain is None:
                        log(f"llmsvc: {seen} of {got.tokens} token rows stored after 120 s")
                cpu = await settled_cpu_s(g.pid) - cpu0
                add(raw, f"{g.name}_cpu_us_per_token", cpu / got.tokens * 1e6)
                add(raw, f"{g.name}_tokens_per_s", got.tokens / (t_stop - t0))
                add(raw, f"{g.name}_ttft_p50_ms", pct(got.ttfts, 0.5) * 1e3)
            ours = raw[f"{LLMSVC}_cpu_us_per_token"][-1]
            for g in gateways:
                if g.name != LLMSVC:
                    theirs = raw[f"{g.name}_cpu_us_per_token"][-1]
                    ratio = theirs / ours if ours > 0 else None  # CPU comes in 10 ms ticks
                    add(raw, f"{g.name}_over_llmsvc_cpu_per_token", ratio)
            log(
                f"stream cpu round {r + 1}/{rounds}: "
                + ", ".join(
                    f"{g.name} {raw[f'{g.name}_cpu_us_per_token'][-1]:.0f} us/tok" for g in gateways
                )
            )
    finally:
        await rows.close()
    return {
        "concurrency": conc,
        "tokens_per_reply": tokens,
        "streams_per_run": conc * per,
        "rounds": rounds,
        **summary(raw, 2),
        "per_round": per_round(raw, 2),
    }


@dataclass
class Watched:
    """What a client got from one stream its gateway was told to stop during."""

    tokens: int
    ending: str  # "done" ([DONE] arrived), "error_event" (an SSE error), "cut" (neither)


async def watch_stream(ep: Endpoint, body: bytes) -> Watched:
    tokens, tail, last = 0, b"", bytearray()
    with contextlib.suppress(aiohttp.ClientError, TimeoutError):
        async with ep.session.post(ep.url, data=body) as resp:
            async for chunk in resp.content.iter_any():
                tokens += chunk.count(TOKEN_MARK) + (tail + chunk[:EDGE]).count(TOKEN_MARK)
                tail = (tail + chunk)[-EDGE:]
                last = (last + chunk)[-4096:]
    if last.rstrip().endswith(b"data: [DONE]"):
        return Watched(tokens, "done")
    return Watched(tokens, "error_event" if b'"error"' in last else "cut")


async def phase_sigterm(
    gateways: list[Gateway], database_url: str, streams: int, tokens: int, after_s: float
) -> dict[str, Any]:
    """Each gateway in turn: `streams` long streams, SIGTERM `after_s` into them, and what
    each client then got; for llmsvc also how many of the tokens sent are stored."""
    out: dict[str, Any] = {
        "streams": streams,
        "tokens_per_reply": tokens,
        "sigterm_after_s": after_s,
    }
    body = chat_body(MODEL, tokens, stream=True)
    rows = await open_token_rows(database_url)
    try:
        for g in gateways:
            since = datetime.now(UTC)
            watching = [asyncio.create_task(watch_stream(g.endpoint, body)) for _ in range(streams)]
            await asyncio.sleep(after_s)
            t0 = time.perf_counter()
            g.terminate()
            try:
                code: int | None = await asyncio.to_thread(g.proc.popen.wait, 120)
            except subprocess.TimeoutExpired:
                code = None
            exit_s = time.perf_counter() - t0
            got = await asyncio.gather(*watching)
            entry: dict[str, Any] = {
                "exit_code": code,
                "exit_s_after_sigterm": round(exit_s, 2),
                "streams_by_ending": {
                    e: sum(w.ending == e for w in got) for e in ("done", "error_event", "cut")
                },
                "tokens_received": sum(w.tokens for w in got),
            }
            if g.name == LLMSVC:
                entry["tokens_stored"] = await rows.count_since(since)
            log(f"sigterm {g.name}: {entry}")
            out[g.name] = entry
    finally:
        await rows.close()
    return out


@dataclass
class Sessions:
    """Every client session of the run, closed together."""

    open: list[aiohttp.ClientSession] = field(default_factory=list)

    def new(self, headers: dict[str, str]) -> aiohttp.ClientSession:
        self.open.append(session := new_session(headers))
        return session

    async def close(self) -> None:
        for session in self.open:
            await session.close()


async def run(args: argparse.Namespace, tmp: Path) -> dict[str, Any]:
    peers: list[Peer] = args.peers
    report: dict[str, Any] = {
        "benchmark": "benchmarks/bench_peers.py",
        "machine": machine_info(tmp, PACKAGES),
        "upstream_token_delay_ms": args.token_delay_ms,
        "peers": {
            p.name: {"command": p.command, "headers": sorted(p.headers), "version": p.version}
            for p in peers
        },
    }
    sessions = Sessions()
    with processes() as procs:
        procs.append(up := spawn_upstream(tmp, "upstream", args.token_delay_ms))
        database_url = f"sqlite:///{tmp / 'llmsvc.db'}"
        daemon = spawn_daemon(tmp, database_url, [upstream_provider("fast", up, MODEL)])
        procs.append(daemon)
        started: list[tuple[Proc, dict[str, str]]] = []
        try:
            for peer in peers:
                started.append(spawn_peer(tmp, peer, up.port))
            await wait_ready(daemon)
            direct = Endpoint("direct", chat_url(up), sessions.new({}), MODEL)
            gateways = [
                Gateway(
                    LLMSVC,
                    Endpoint(LLMSVC, chat_url(daemon), sessions.new({}), MODEL),
                    daemon,
                    False,
                )
            ]
            for proc, headers in started:
                ep = Endpoint(proc.name, chat_url(proc), sessions.new(headers), MODEL)
                await wait_serving(proc, ep)
                gateways.append(Gateway(proc.name, ep, proc, True))
            log("all serving: " + ", ".join(f"{g.name} pid {g.pid}" for g in gateways))
            for ep in (direct, *(g.endpoint for g in gateways)):  # warm every path
                for _ in range(30):
                    await complete(ep, chat_body(MODEL, 16, stream=False))
            report["latency_nonstream_c1"] = await phase_latency(
                direct, gateways, args.rounds, args.latency_n
            )
            report["stream_cpu"] = await phase_stream_cpu(
                gateways,
                database_url,
                args.rounds,
                args.stream_concurrency,
                args.stream_tokens,
                args.streams_per_worker,
            )
            if args.sigterm_streams > 0:  # last: it stops every gateway
                report["sigterm_mid_stream"] = await phase_sigterm(
                    gateways, database_url, args.sigterm_streams, args.sigterm_tokens, 1.0
                )
        finally:
            await sessions.close()
            for proc, _ in started:
                stop_group(proc)
    report["machine"]["loadavg_at_end"] = [round(x, 2) for x in os.getloadavg()]
    return report


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    p.add_argument("--quick", action="store_true", help="small counts: a smoke run, not figures")
    p.add_argument("--out", type=Path, default=Path("peers.json"))
    p.add_argument("--peer", type=split_pair, action="append", default=[], help="NAME=COMMAND")
    p.add_argument(
        "--header", type=split_pair, action="append", default=[], help="NAME=FIELD:VALUE"
    )
    p.add_argument("--version", type=split_pair, action="append", default=[], help="NAME=TEXT")
    p.add_argument("--rounds", type=int, help="interleaved rounds per phase")
    p.add_argument("--token-delay-ms", type=float, default=1.0, help="upstream pacing")
    p.add_argument("--stream-concurrency", type=int, default=16)
    p.add_argument("--stream-tokens", type=int, default=200, help="tokens per streamed reply")
    p.add_argument("--sigterm-streams", type=int, default=4, help="0 skips the SIGTERM phase")
    p.add_argument("--sigterm-tokens", type=int, default=3000, help="tokens per such stream")
    p.add_argument("--tmp-dir", default=None, help="where the WAL and SQLite files go")
    args = p.parse_args(argv)
    args.peers = peers_from(args, p.error)
    args.rounds = args.rounds or (1 if args.quick else 5)
    args.latency_n = 30 if args.quick else 300
    args.streams_per_worker = 1 if args.quick else 8
    return args


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    tmp = Path(tempfile.mkdtemp(prefix="llmsvc-peers-", dir=args.tmp_dir))
    started = time.perf_counter()
    try:
        report = uvloop.run(run(args, tmp))
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    report["wall_s"] = round(time.perf_counter() - started, 1)
    write_report(report, args.out)


if __name__ == "__main__":
    main()

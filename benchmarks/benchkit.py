"""What the benchmarks share, so none imports another: machine facts, scratch databases,
the JSON report, the fake upstream and the daemon as child processes, HTTP load, the drain check.

Imported by every benchmark (each runs as `python benchmarks/NAME.py`, so this folder is on
sys.path).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import math
import os
import platform
import re
import select
import signal
import socket
import sqlite3
import statistics
import subprocess
import sys
import time
import uuid
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime
from importlib import metadata
from pathlib import Path
from typing import Any, Protocol
from urllib.parse import urlsplit, urlunsplit

import aiohttp
import asyncpg

from llmsvc.config import Settings
from llmsvc.gateway.journal import Journal
from llmsvc.wal.writer import WalWriter

ROOT = Path(__file__).resolve().parent.parent
CLK_TCK = os.sysconf("SC_CLK_TCK")
UPSTREAM_SCRIPT = ROOT / "tests" / "upstreams" / "openai_upstream.py"
MODEL = "gpt-test"
MESSAGES = [{"role": "user", "content": "Write a long story about a durable log."}]
JSON_HEADERS = {"Content-Type": "application/json"}
# Every token event, from the upstream and from the daemon, has this; the role event does not.
TOKEN_MARK = b'{"content":"'
EDGE = len(TOKEN_MARK) - 1
Raw = dict[str, list[float]]  # metric -> one value per round


# Versions recorded with the figures.
PACKAGES = (
    "aiohttp",
    "uvicorn",
    "httptools",
    "uvloop",
    "orjson",
    "sqlalchemy",
    "aiosqlite",
    "asyncpg",
)


def log(message: str) -> None:
    print(f"bench: {message}", file=sys.stderr, flush=True)


# --------------------------------------------------------------------------- machine facts
def machine_busy_s() -> float:
    """CPU seconds the whole machine spent busy (all cores), from /proc/stat."""
    with open("/proc/stat") as f:
        ticks = [int(x) for x in f.readline().split()[1:9]]
    return (sum(ticks) - ticks[3] - ticks[4]) / CLK_TCK  # minus idle and iowait


def close_report(report: dict[str, Any], started: float, busy0: float) -> dict[str, Any]:
    """The report with how busy the machine was over the run (`machine_busy_s` at its start:
    `busy0`), its load at the end and the run's wall time (`started`: perf_counter)."""
    wall = time.perf_counter() - started
    report["machine"]["busy_cores_mean"] = round((machine_busy_s() - busy0) / wall, 2)
    report["machine"]["loadavg_at_end"] = [round(x, 2) for x in os.getloadavg()]
    report["wall_s"] = round(wall, 1)
    return report


def fs_type(path: Path) -> str:
    """The filesystem the WAL lives on: fsync on tmpfs would be free and the figure void."""
    best, kind = "", "?"
    with open("/proc/mounts") as f:
        for line in f:
            mount, fstype = line.split()[1:3]
            if str(path.resolve()).startswith(mount) and len(mount) > len(best):
                best, kind = mount, fstype
    return kind


def commit_of(tree: Path) -> str:
    """The short commit a tree's checkout is at ("?" outside a git checkout)."""
    done = subprocess.run(
        ["git", "-C", str(tree), "rev-parse", "--short", "HEAD"], capture_output=True, text=True
    )
    return done.stdout.strip() or "?"


def tree_arg(text: str) -> tuple[str, Path]:
    """`--tree name=path` (argparse's type): the name and the tree's resolved path."""
    name, _, path = text.partition("=")
    if not name or not path:
        raise argparse.ArgumentTypeError(f"{text!r}: want name=path")
    return name, Path(path).resolve()


def machine_info(tmp: Path, packages: tuple[str, ...]) -> dict[str, Any]:
    """What the figures depend on, so runs on different machines can be compared."""
    with open("/proc/cpuinfo") as f:
        model = next((ln.split(":", 1)[1].strip() for ln in f if ln.startswith("model name")), "?")
    with open("/proc/meminfo") as f:
        mem_kib = int(next(ln.split()[1] for ln in f if ln.startswith("MemTotal")))
    git = subprocess.run(
        ["git", "-C", str(ROOT), "rev-parse", "--short", "HEAD"], capture_output=True, text=True
    )
    dirty = subprocess.run(
        ["git", "-C", str(ROOT), "status", "--porcelain", "--untracked-files=no"],
        capture_output=True,
        text=True,
    )
    return {
        "nproc": os.cpu_count(),
        "cpus_usable": len(os.sched_getaffinity(0)),
        "cpu_model": model,
        "mem_gib": round(mem_kib / 2**20, 1),
        "python": platform.python_version(),
        "kernel": platform.release(),
        "loadavg_at_start": [round(x, 2) for x in os.getloadavg()],
        "tmp_dir_fs": fs_type(tmp),
        "llmsvc_commit": git.stdout.strip() + ("-dirty" if dirty.stdout.strip() else ""),
        "versions": {p: metadata.version(p) for p in packages},
    }


def plain_pg_url(url: str) -> str:
    """A URL asyncpg accepts, whatever driver suffix the caller used."""
    scheme, sep, rest = url.partition("://")
    return "postgresql" + sep + rest if scheme.startswith("postgres") else url


def identifier(text: str) -> str:
    """A scratch database's name goes into DROP DATABASE: only plain identifiers."""
    if not re.fullmatch(r"[a-z_][a-z0-9_]{0,62}", text):
        raise argparse.ArgumentTypeError("a lower-case SQL identifier")
    return text


async def _admin(pg_url: str, *statements: str) -> None:
    conn = await asyncpg.connect(plain_pg_url(pg_url), timeout=10)
    try:
        for sql in statements:
            await conn.execute(sql)
    finally:
        await conn.close()


async def pg_scratch(pg_url: str, name: str) -> str:
    """A fresh, empty scratch database on the server; returns its SQLAlchemy (asyncpg) URL."""
    await _admin(pg_url, f"DROP DATABASE IF EXISTS {name} WITH (FORCE)", f"CREATE DATABASE {name}")
    parts = urlsplit(plain_pg_url(pg_url))
    return urlunsplit(parts._replace(scheme="postgresql+asyncpg", path=f"/{name}"))


async def pg_drop_scratch(pg_url: str, name: str) -> None:
    await _admin(pg_url, f"DROP DATABASE IF EXISTS {name} WITH (FORCE)")


def write_report(report: dict[str, Any], out: Path) -> None:
    """Print the JSON report and write it to `out`."""
    text = json.dumps(report, indent=1, allow_nan=False)
    print(text)
    out.write_text(text + "\n")


# --------------------------------------------------------------------------- small helpers
def proc_cpu_s(pid: int, tid: int | None = None) -> float:
    """utime+stime of a whole process (all threads), or of one thread, in seconds."""
    path = f"/proc/{pid}/stat" if tid is None else f"/proc/{pid}/task/{tid}/stat"
    with open(path, "rb") as f:
        fields = f.read().rsplit(b")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / CLK_TCK


def pct(values: Sequence[float], q: float) -> float:
    """Nearest-rank percentile: an observed value, no interpolation."""
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, math.ceil(q * len(ordered)) - 1))]


def med(values: Sequence[float | None]) -> float | None:
    present = [v for v in values if v is not None]
    return statistics.median(present) if present else None


def rnd(value: float | None, digits: int = 3) -> float | None:
    return None if value is None else round(value, digits)


def add(raw: Raw, key: str, value: float | None) -> None:
    raw.setdefault(key, []).append(math.nan if value is None else value)


def summary(raw: Raw, digits: int = 3) -> dict[str, float | None]:
    """Median of each metric over rounds (NaN marks a round that produced no value)."""
    return {k: rnd(med([x for x in v if not math.isnan(x)]), digits) for k, v in raw.items()}


def per_round(raw: Raw, digits: int = 3) -> dict[str, list[float | None]]:
    """The raw values for the report, a missing value as null (JSON has no NaN)."""
    return {k: [None if math.isnan(x) else round(x, digits) for x in v] for k, v in raw.items()}


def rotated(items: Sequence[Any], r: int) -> list[Any]:
    """Alternate the order each round so neither side always runs first."""
    k = r % len(items)
    return [*items[k:], *items[:k]]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def read_bytes(path: Path) -> bytes:
    try:
        return path.read_bytes()
    except FileNotFoundError:
        return b""


def log_tail(path: Path, lines: int = 15) -> str:
    return "\n".join(read_bytes(path).decode(errors="replace").splitlines()[-lines:])


# --------------------------------------------------------------------------- processes
@dataclass
class Proc:
    name: str
    popen: subprocess.Popen[bytes]
    port: int
    log: Path
    flush_process: bool = False  # a daemon whose batches its flush process writes

    @property
    def pid(self) -> int:
        return self.popen.pid


def spawn_upstream(tmp: Path, name: str, delay_ms: float) -> Proc:
    """The fast local upstream; it prints `LISTENING <port>` once it accepts connections."""
    logfile = tmp / f"{name}.log"
    cmd = [sys.executable, str(UPSTREAM_SCRIPT), "--port", "0", "--token-delay-ms", str(delay_ms)]
    with logfile.open("wb") as err:
        popen = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=err)
    assert popen.stdout is not None
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        if select.select([popen.stdout], [], [], 0.1)[0]:
            line = popen.stdout.readline()
            if line.startswith(b"LISTENING "):
                return Proc(name, popen, int(line.split()[1]), logfile)
            if not line:
                break
        elif popen.poll() is not None:
            break
    stop_proc(popen)
    raise RuntimeError(f"{name} did not start:\n{log_tail(logfile)}")


def spawn_daemon(
    tmp: Path,
    database_url: str,
    providers: list[dict[str, Any]],
    routes: dict[str, list[str]] | None = None,
    settings: dict[str, str] | None = None,
) -> Proc:
    """`llmsvc run` in `write` mode; stderr goes to a file (a full pipe would stall it).

    A failover costs one refused connection, then the next target: no retry.
    `settings` are further LLMSVC_* variables.
    """
    port = free_port()  # `ready` logs the configured port, so 0 cannot be used here
    env = {k: v for k, v in os.environ.items() if not k.startswith("LLMSVC_")}
    env.update(
        LLMSVC_DATABASE_URL=database_url,
        LLMSVC_WAL_DIR=str(tmp / "wal"),
        LLMSVC_WAL_SYNC="write",
        LLMSVC_HOST="127.0.0.1",
        LLMSVC_PORT=str(port),
        LLMSVC_PROVIDERS=json.dumps(providers),
        LLMSVC_LOG_LEVEL="INFO",
        LLMSVC_METRICS_PORT="0",
        LLMSVC_ROUTES=json.dumps(routes or {}),
        LLMSVC_RETRIES_PER_TARGET="0",
        # Keep the dead target's circuit closed: every failover request pays the failover.
        LLMSVC_CIRCUIT_FAILURE_THRESHOLD="1000000",
        LLMSVC_CIRCUIT_WINDOW="1000000",
    )
    env.update(settings or {})
    binary = Path(sys.executable).parent / "llmsvc"
    cmd = [str(binary), "run"] if binary.exists() else [sys.executable, "-m", "llmsvc.cli", "run"]
    logfile = tmp / "daemon.log"
    with logfile.open("wb") as err:
        popen = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=err)
    flush_process = env.get("LLMSVC_FLUSH_PROCESS", "true") != "false"
    return Proc("daemon", popen, port, logfile, flush_process)


async def start_variants(
    tmp: Path,
    database_url: str,
    upstream: Proc,
    variants: dict[str, dict[str, str]],
    procs: list[Proc],
) -> dict[str, Proc]:
    """One ready daemon per variant in front of `upstream`, each with its own home (and
    SQLite file, unless `database_url` is given) and its LLMSVC_* settings; each is also
    added to `procs`, so `processes()` stops it."""
    daemons = {}
    for name, settings in variants.items():
        home = tmp / name
        home.mkdir()
        url = database_url or f"sqlite:///{home / 'llmsvc.db'}"
        providers = [upstream_provider("fast", upstream, MODEL)]
        procs.append(daemon := spawn_daemon(home, url, providers, settings=settings))
        await wait_ready(daemon)
        daemons[name] = daemon
    return daemons


async def wait_ready(proc: Proc, limit_s: float = 60) -> None:
    """Until the daemon serves, its boot's catch-up with the database is done and its flush
    process writes the batches: a benchmark measures the steady state, with the store
    migrated and the previous WAL replayed."""
    deadline = time.monotonic() + limit_s
    lines = [b"ready host=", b"boot: caught up with the"]
    lines += [b"flush process ready"] if proc.flush_process else []
    while not all(line in read_bytes(proc.log) for line in lines):
        if proc.popen.poll() is not None or time.monotonic() > deadline:
            raise RuntimeError(f"the daemon did not become ready:\n{log_tail(proc.log)}")
        await asyncio.sleep(0.05)


def stop_proc(popen: subprocess.Popen[bytes], timeout: float = 30) -> int | None:
    """SIGTERM, then SIGKILL if it does not exit in time; returns the exit code."""
    if popen.poll() is None:
        popen.send_signal(signal.SIGTERM)
        try:
            popen.wait(timeout)
        except subprocess.TimeoutExpired:
            popen.kill()
            popen.wait(10)
    if popen.stdout is not None:
        popen.stdout.close()
    return popen.returncode


@contextlib.contextmanager
def processes() -> Iterator[list[Proc]]:
    """Every child process is stopped, whatever happens, by its own pid."""
    procs: list[Proc] = []
    try:
        yield procs
    finally:
        for proc in reversed(procs):
            stop_proc(proc.popen)


def upstream_provider(name: str, up: Proc, model: str) -> dict[str, Any]:
    return {
        "name": name,
        "kind": "openai",
        "base_url": f"http://127.0.0.1:{up.port}/v1",
        "api_key": "sk-bench",
        "models": [model],
    }


def chat_url(proc: Proc) -> str:
    """Chat completions on the upstream or a daemon."""
    return f"http://127.0.0.1:{proc.port}/v1/chat/completions"


# --------------------------------------------------------------------------- load generator
def chat_body(model: str, tokens: int, stream: bool) -> bytes:
    body: dict[str, Any] = {"model": model, "messages": MESSAGES, "max_tokens": tokens}
    if stream:
        body["stream"] = True
    return json.dumps(body).encode()


@dataclass
class Endpoint:
    """One place load goes: the upstream itself, or the daemon in front of it."""

    name: str
    url: str
    session: aiohttp.ClientSession
    model: str


def new_session() -> aiohttp.ClientSession:
    # keep-alive shorter than uvicorn's 5 s, so an idle pooled connection is never
    # reused just as the server closes it
    connector = aiohttp.TCPConnector(limit=0, keepalive_timeout=3)
    return aiohttp.ClientSession(connector=connector, timeout=aiohttp.ClientTimeout(total=300))


async def complete(ep: Endpoint, body: bytes) -> float:
    """One non-streaming request; returns its latency in seconds."""
    t0 = time.perf_counter()
    async with ep.session.post(ep.url, data=body, headers=JSON_HEADERS) as resp:
        data = await resp.read()
    elapsed = time.perf_counter() - t0
    if resp.status != 200 or b'"content":"t0 ' not in data:
        raise RuntimeError(f"{ep.name}: HTTP {resp.status}: {data[:300]!r}")
    return elapsed


async def latency_rounds(
    direct: Endpoint,
    via: Endpoint,
    body: bytes,
    rounds: int,
    n: int,
    concurrency: int,
    daemon_cpu_s: Callable[[], float],
    also: Sequence[Endpoint] = (),
) -> Raw:
    """Whole requests, directly and through the daemon (`via`) in interleaved rounds, `n` a
    round from `concurrency` clients at once: each side's p50 and p99, what the daemon adds,
    and its CPU per request (the flush of a round's requests may land in the next). `also`:
    further hops (a relay) measured in the same rounds, each with what it adds."""
    raw: Raw = {}
    for r in range(rounds):
        for ep in rotated([direct, via, *also], r):
            cpu0 = daemon_cpu_s()
            lats: list[float] = []

            async def client(ep: Endpoint = ep, lats: list[float] = lats) -> None:
                for _ in range(n // concurrency):
                    lats.append(await complete(ep, body))

            await asyncio.gather(*(client() for _ in range(concurrency)))
            add(raw, f"{ep.name}_p50_ms", pct(lats, 0.5) * 1e3)
            add(raw, f"{ep.name}_p99_ms", pct(lats, 0.99) * 1e3)
            if ep is via:
                add(raw, "daemon_cpu_us_per_request", (daemon_cpu_s() - cpu0) / len(lats) * 1e6)
        for q in ("p50", "p99"):
            direct_ms = raw[f"{direct.name}_{q}_ms"][-1]
            add(raw, f"added_{q}_ms", raw[f"{via.name}_{q}_ms"][-1] - direct_ms)
            for hop in also:
                add(raw, f"{hop.name}_added_{q}_ms", raw[f"{hop.name}_{q}_ms"][-1] - direct_ms)
    return raw


@dataclass
class Streamed:
    ttft: float
    tokens: int
    reads: int


async def stream(ep: Endpoint, body: bytes, expect: int) -> Streamed:
    """One streaming request, counting token events without parsing them (cheap)."""
    t0 = time.perf_counter()
    ttft, tokens, reads, tail = 0.0, 0, 0, b""
    async with ep.session.post(ep.url, data=body, headers=JSON_HEADERS) as resp:
        if resp.status != 200:
            raise RuntimeError(f"{ep.name}: HTTP {resp.status}: {(await resp.read())[:300]!r}")
        async for chunk in resp.content.iter_any():
            reads += 1
            # a mark split across reads is found in tail + head of the next read
            tokens += chunk.count(TOKEN_MARK) + (tail + chunk[:EDGE]).count(TOKEN_MARK)
            tail = chunk[-EDGE:] if len(chunk) >= EDGE else (tail + chunk)[-EDGE:]
            if not ttft and tokens:
                ttft = time.perf_counter() - t0
    if tokens != expect or not tail.endswith(b"data: [DONE]\n\n"[-EDGE:]):
        raise RuntimeError(f"{ep.name}: {tokens} tokens of {expect}, or no [DONE]")
    return Streamed(ttft, tokens, reads)


@dataclass
class LoadResult:
    tokens: int = 0
    reads: int = 0
    ttfts: list[float] = field(default_factory=list)


async def stream_load(
    ep: Endpoint, tokens: int, conc: int, per_worker: int, limit_s: float
) -> LoadResult:
    """`conc` workers, each streaming `per_worker` replies back to back."""
    body, out = chat_body(ep.model, tokens, stream=True), LoadResult()

    async def worker() -> None:
        for _ in range(per_worker):
            got = await stream(ep, body, tokens)
            out.tokens += got.tokens
            out.reads += got.reads
            out.ttfts.append(got.ttft)

    await asyncio.wait_for(asyncio.gather(*(worker() for _ in range(conc))), limit_s)
    return out


# --------------------------------------------------------------------------- drain check
class TokenRows(Protocol):
    async def count_since(self, since: datetime) -> int: ...
    async def close(self) -> None: ...


# Token rows of the attempts started since a moment: the run's own rows, found through the
# primary key, so the poll stays cheap however large the table has grown.
COUNT_SINCE = (
    "SELECT count(*) FROM llm_token_log WHERE attempt_id IN "
    "(SELECT id FROM llm_attempts WHERE started_at >= {})"
)


class SqliteRows:
    """Read-only; SQLite's own WAL mode lets it read while the daemon writes."""

    def __init__(self, path: str) -> None:
        self.conn = sqlite3.connect(f"file:{path}?mode=ro", uri=True, timeout=30)

    async def count_since(self, since: datetime) -> int:
        # SQLAlchemy stores timestamps on SQLite as naive UTC text in this layout
        stamp = since.astimezone(UTC).strftime("%Y-%m-%d %H:%M:%S.%f")
        return int(self.conn.execute(COUNT_SINCE.format("?"), (stamp,)).fetchone()[0])

    async def close(self) -> None:
        self.conn.close()


class PostgresRows:
    def __init__(self, conn: asyncpg.Connection) -> None:
        self.conn = conn

    async def count_since(self, since: datetime) -> int:
        return int(await self.conn.fetchval(COUNT_SINCE.format("$1"), since))

    async def close(self) -> None:
        await self.conn.close()


async def open_token_rows(database_url: str) -> TokenRows:
    if database_url.startswith("sqlite"):
        return SqliteRows(database_url.partition(":///")[2])
    return PostgresRows(await asyncpg.connect(plain_pg_url(database_url), timeout=10))


async def wait_drained(
    rows: TokenRows, since: datetime, expect: int, t_stop: float, limit_s: float
) -> tuple[float | None, int]:
    """Seconds from the end of the load until the run's token rows are all committed."""
    while True:
        seen = await rows.count_since(since)
        elapsed = time.perf_counter() - t_stop
        if seen >= expect:
            return elapsed, seen
        if elapsed > limit_s:
            return None, seen
        await asyncio.sleep(0.01)


# --------------------------------------------------------------------------- WAL
async def prewrite_wal(wal_dir: Path, streams: int, tokens: int) -> tuple[uuid.UUID, Any]:
    """A WAL as the gateway writes it: per stream a start, token batches, the two ends."""
    instance = uuid.uuid4()
    writer = WalWriter(wal_dir, instance, replace(Settings().wal_policy(), sync="write"))
    writer.open(asyncio.get_running_loop(), lambda exc: None)
    journal = Journal(writer)
    fut: asyncio.Future[int] | None = None
    for s in range(streams):
        request, attempt = uuid.uuid4(), uuid.uuid4()
        journal.request_start(request, uuid.uuid4(), MODEL, True, MESSAGES, {"max_tokens": tokens})
        journal.attempt_start(attempt, request, 1, "upstream", MODEL)
        for first in range(0, tokens, 50):
            texts = [f"t{i} " for i in range(first, min(tokens, first + 50))]
            journal.tokens(attempt.bytes, first, texts)
        journal.attempt_end(
            attempt, status="completed", http_status=200, token_count=tokens, first_token_ts=None
        )
        fut = journal.request_end(request, status="completed", completion_tokens=tokens)
        if s % 20 == 19:
            await asyncio.shield(fut)
    if fut is not None:
        await asyncio.shield(fut)
    await writer.close()
    return instance, writer.end

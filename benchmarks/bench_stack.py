#!/usr/bin/env python3
"""Pick llmsvc's HTTP server stack and HTTP client library by measuring them.

Not a test: a one-shot benchmark that prints (and writes) JSON. The hot-path
budget in ARCHITECTURE.md is ~25 us of CPU per token, so the figure that
matters most is CPU per request / per event, read from /proc/<pid>/stat for
each server subprocess and from time.process_time() inside each client
subprocess. The machine is small and noisy, so every stack runs in the same
invocation, interleaved round by round (rotating order), and results are
medians; ratios are medians of per-round paired ratios.

Usage:  .venv/bin/python benchmarks/bench_stack.py [--rounds 7] [--out bench-stack.json]
The ``serve`` and ``client`` sub-commands are internal (run as subprocesses).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import re
import socket
import statistics
import subprocess
import sys
import time
from collections.abc import Awaitable, Callable, Iterator
from importlib import metadata
from typing import Any

import orjson
import uvloop

EVENT = b'data: {"choices":[{"delta":{"content":"tok"}}]}\n\n'
N_EVENTS = 1000
BATCH = 50  # batched variant: N_EVENTS // BATCH writes of BATCH events
REQ_BODY = orjson.dumps(
    {"model": "m-1", "messages": [{"role": "user", "content": "hello there"}], "stream": False}
)
SERVERS = ("uvicorn_asgi", "uvicorn_starlette", "aiohttp_web")
# llmsvc_read: llmsvc's own upstream client (providers/upstream_http.py), which replaced aiohttp's
CLIENTS = ("aiohttp_iter_any", "httpx2_aiter_raw", "httpx2_aiter_bytes", "llmsvc_read")
CLK_TCK = os.sysconf("SC_CLK_TCK")
SCRIPT = os.path.abspath(__file__)

Scope = dict[str, Any]
Message = dict[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
Rounds = dict[str, dict[str, list[float]]]  # name -> metric -> one value per round


# --------------------------------------------------------------------------- server side
def small_reply(req: bytes) -> bytes:
    """Parse the request and build a ~300-byte completion, as the gateway would."""
    body = orjson.loads(req)
    return orjson.dumps(
        {
            "id": "chatcmpl-0123456789abcdef",
            "object": "chat.completion",
            "created": 1700000000,
            "model": body["model"],
            "choices": [
                {
                    "index": 0,
                    "message": {"role": "assistant", "content": "Hello! How can I help today?"},
                    "finish_reason": "stop",
                }
            ],
            "usage": {"prompt_tokens": 11, "completion_tokens": 9, "total_tokens": 20},
            "system_fingerprint": "fp_bench",
        }
    )


def stream_chunks(path: str) -> tuple[bytes, int, float]:
    """Map a stream path to (chunk, chunk count, pause per chunk in s)."""
    if path == "/stream/batched":
        return EVENT * BATCH, N_EVENTS // BATCH, 0.0
    if path == "/stream/paced":  # 1 ms apart: the client sees ~one event per read, like upstream
        return EVENT, N_EVENTS, 0.001
    return EVENT, N_EVENTS, 0.0


STREAM_PATHS = ("/stream", "/stream/batched", "/stream/paced")
SSE_HEADERS = [(b"content-type", b"text/event-stream"), (b"cache-control", b"no-cache")]


async def bare_asgi(scope: Scope, receive: Receive, send: Send) -> None:
    """Bare ASGI callable: the thinnest stack uvicorn can run."""
    if scope["type"] != "http":
        return
    body = b""
    while True:
        msg = await receive()
        body += msg.get("body", b"")
        if not msg.get("more_body"):
            break
    path = scope["path"]
    if path == "/small":
        out = small_reply(body)
        headers = [(b"content-type", b"application/json"), (b"content-length", b"%d" % len(out))]
        await send({"type": "http.response.start", "status": 200, "headers": headers})
        await send({"type": "http.response.body", "body": out})
        return
    chunk, count, pause = stream_chunks(path)
    await send({"type": "http.response.start", "status": 200, "headers": SSE_HEADERS})
    for _ in range(count):
        await send({"type": "http.response.body", "body": chunk, "more_body": True})
        if pause:
            await asyncio.sleep(pause)
    await send({"type": "http.response.body", "body": b""})


def starlette_app() -> Any:
    """Starlette with plain Routes and no middleware: the framework tax alone."""
    from starlette.applications import Starlette
    from starlette.requests import Request
    from starlette.responses import Response, StreamingResponse
    from starlette.routing import Route

    async def small(request: Request) -> Response:
        return Response(small_reply(await request.body()), media_type="application/json")

    async def stream(request: Request) -> StreamingResponse:
        chunk, count, pause = stream_chunks(request.url.path)

        async def gen() -> Any:
            for _ in range(count):
                yield chunk
                if pause:
                    await asyncio.sleep(pause)

        return StreamingResponse(gen(), media_type="text/event-stream")

    routes = [Route("/small", small, methods=["POST"])]
    routes += [Route(p, stream, methods=["POST"]) for p in STREAM_PATHS]
    return Starlette(routes=routes)


async def run_aiohttp(sock: socket.socket) -> None:
    """aiohttp.web on uvloop, access log off, serving the inherited socket."""
    from aiohttp import web

    async def small(request: web.Request) -> web.Response:
        return web.Response(body=small_reply(await request.read()), content_type="application/json")

    async def stream(request: web.Request) -> web.StreamResponse:
        await request.read()
        chunk, count, pause = stream_chunks(request.path)
        resp = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await resp.prepare(request)
        for _ in range(count):
            await resp.write(chunk)
            if pause:
                await asyncio.sleep(pause)
        await resp.write_eof()
        return resp

    app = web.Application()
    app.router.add_post("/small", small)
    for p in STREAM_PATHS:
        app.router.add_post(p, stream)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    await web.SockSite(runner, sock).start()
    await asyncio.Event().wait()


def serve(stack: str, fd: int) -> None:
    """Serve one stack on an inherited listening socket (no port race)."""
    sock = socket.socket(fileno=fd)
    if stack == "aiohttp_web":
        uvloop.run(run_aiohttp(sock))
        return
    import uvicorn

    app = bare_asgi if stack == "uvicorn_asgi" else starlette_app()
    config = uvicorn.Config(
        app, http="httptools", loop="uvloop", lifespan="off", access_log=False, log_level="warning"
    )
    uvicorn.Server(config).run(sockets=[sock])


# --------------------------------------------------------------------------- load generator
class RawConn:
    """Minimal keep-alive HTTP/1.1 client, so the load generator costs as little as possible."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader, self.writer, self.buf = reader, writer, bytearray()

    @classmethod
    async def open(cls, port: int) -> RawConn:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        writer.transport.get_extra_info("socket").setsockopt(
            socket.IPPROTO_TCP, socket.TCP_NODELAY, 1
        )
        return cls(reader, writer)

    async def _fill(self) -> None:
        data = await self.reader.read(262144)
        if not data:
            raise ConnectionError("server closed the connection")
        self.buf += data

    async def request(self, raw: bytes) -> int:
        """Send one request; return the decoded body length."""
        self.writer.write(raw)
        buf = self.buf
        while (end := buf.find(b"\r\n\r\n")) < 0:
            await self._fill()
        head = bytes(buf[:end]).lower()
        if not head.startswith(b"http/1.1 200"):
            raise RuntimeError(head[:80])
        pos = end + 4
        if b"transfer-encoding: chunked" in head:
            total = 0
            while True:
                while (eol := buf.find(b"\r\n", pos)) < 0:
                    await self._fill()
                size = int(buf[pos:eol], 16)
                pos = eol + 2 + size + 2  # data + CRLF; for size 0 the final CRLF (no trailers)
                while len(buf) < pos:
                    await self._fill()
                total += size
                if size == 0:
                    break
        else:
            i = head.index(b"content-length:") + 15
            j = head.find(b"\r\n", i)
            total = int(head[i : j if j >= 0 else None])
            pos += total
            while len(buf) < pos:
                await self._fill()
        del buf[:pos]
        return total

    def close(self) -> None:
        self.writer.close()


def http_req(path: str) -> bytes:
    """Pre-encoded POST request."""
    return (
        b"POST %s HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
        b"Content-Length: %d\r\n\r\n%s" % (path.encode(), len(REQ_BODY), REQ_BODY)
    )


def proc_cpu_s(pid: int) -> float:
    """utime+stime of a process from /proc/<pid>/stat, in seconds (10 ms ticks)."""
    with open(f"/proc/{pid}/stat", "rb") as f:
        fields = f.read().rsplit(b")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / CLK_TCK


async def load(
    port: int, pid: int, path: str, conc: int, per_conn: int, expect: int
) -> dict[str, float]:
    """Drive `conc` connections x `per_conn` requests; return wall, server CPU, latencies."""
    raw = http_req(path)
    conns = [await RawConn.open(port) for _ in range(conc)]
    await asyncio.gather(*(c.request(raw) for c in conns))  # warm the connections
    lats: list[float] = []

    async def worker(c: RawConn) -> None:
        for _ in range(per_conn):
            t = time.perf_counter()
            n = await c.request(raw)
            lats.append(time.perf_counter() - t)
            if n != expect:
                raise RuntimeError(f"{path}: body {n} bytes, expected {expect}")

    cpu0, lg0, t0 = proc_cpu_s(pid), time.process_time(), time.perf_counter()
    await asyncio.gather(*(worker(c) for c in conns))
    wall, lg, cpu = time.perf_counter() - t0, time.process_time() - lg0, proc_cpu_s(pid) - cpu0
    for c in conns:
        c.close()
    return {"wall": wall, "cpu": cpu, "lg_cpu": lg, "p50": statistics.median(lats)}


# --------------------------------------------------------------------------- client side
async def client_main(variant: str, port: int, n_small: int, n_burst: int, n_paced: int) -> None:
    """Measure one client library in its own process; print one JSON line."""
    lib, reader = variant.split("_", 1)
    base = f"http://127.0.0.1:{port}"
    hdr = {"content-type": "application/json"}
    if lib == "aiohttp":
        import aiohttp

        session = aiohttp.ClientSession(
            connector=aiohttp.TCPConnector(limit=64), timeout=aiohttp.ClientTimeout(total=60)
        )

        async def small() -> None:
            async with session.post(base + "/small", data=REQ_BODY, headers=hdr) as r:
                orjson.loads(await r.read())

        async def stream(path: str) -> int:
            n = 0
            async with session.post(base + path, data=REQ_BODY, headers=hdr) as r:
                async for chunk in r.content.iter_any():
                    n += len(chunk)
            return n

        close: Callable[[], Awaitable[None]] = session.close
    elif lib == "llmsvc":
        from llmsvc.providers.upstream_http import UpstreamClient

        upstream = UpstreamClient(10, 60, tls=False)

        async def small() -> None:
            r = await upstream.post(base + "/small", REQ_BODY, hdr)
            try:
                orjson.loads(await r.body(1 << 24))
            finally:
                r.release()

        async def stream(path: str) -> int:
            n = 0
            r = await upstream.post(base + path, REQ_BODY, hdr)
            try:
                while chunk := await r.read():
                    n += len(chunk)
            finally:
                r.release()
            return n

        close = upstream.close
    else:
        import httpx2

        client = httpx2.AsyncClient(limits=httpx2.Limits(max_connections=64), timeout=60)

        async def small() -> None:
            r = await client.post(base + "/small", content=REQ_BODY, headers=hdr)
            orjson.loads(r.content)

        async def stream(path: str) -> int:
            n = 0
            async with client.stream("POST", base + path, content=REQ_BODY, headers=hdr) as r:
                it = r.aiter_raw() if reader == "aiter_raw" else r.aiter_bytes()
                async for chunk in it:
                    n += len(chunk)
            return n

        close = client.aclose

    for _ in range(30):
        await small()
    lats: list[float] = []
    c0 = time.process_time()
    for _ in range(n_small):
        t = time.perf_counter()
        await small()
        lats.append(time.perf_counter() - t)
    small_cpu = time.process_time() - c0

    async def streams(path: str, conc: int, total: int) -> float:
        await asyncio.gather(*(small() for _ in range(conc)))  # open `conc` pooled conns
        c0 = time.process_time()
        got = 0
        for _ in range(total // conc):
            got += sum(await asyncio.gather(*(stream(path) for _ in range(conc))))
        cpu = time.process_time() - c0
        if got != (total // conc) * conc * N_EVENTS * len(EVENT):
            raise RuntimeError(f"{variant} {path}: short read")
        return cpu / ((total // conc) * conc * N_EVENTS)

    out = {
        "small_c1_p50_us": statistics.median(lats) * 1e6,
        "small_cpu_us_per_req": small_cpu / n_small * 1e6,
        "stream_burst_cpu_us_per_event": await streams("/stream", 4, n_burst) * 1e6,
        "stream_paced_cpu_us_per_event": await streams("/stream/paced", 16, n_paced) * 1e6,
    }
    await close()
    print(json.dumps(out))


# --------------------------------------------------------------------------- orchestration
def start_server(stack: str) -> tuple[subprocess.Popen[bytes], int]:
    """Spawn one server subprocess on a fresh listening socket; return (proc, port)."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind(("127.0.0.1", 0))
    sock.listen(1024)
    port = sock.getsockname()[1]
    cmd = [sys.executable, SCRIPT, "serve", stack, str(sock.fileno())]
    proc = subprocess.Popen(cmd, pass_fds=[sock.fileno()])
    sock.close()
    return proc, port


async def wait_ready(port: int, proc: subprocess.Popen[bytes]) -> None:
    """The socket listens before the child accepts, so wait for a real response."""
    deadline = time.monotonic() + 20
    while True:
        try:
            c = await RawConn.open(port)
            await asyncio.wait_for(c.request(http_req("/small")), 2)
            c.close()
            return
        except (TimeoutError, OSError):
            if proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"server on port {port} did not come up") from None
            await asyncio.sleep(0.1)


def rotated(items: tuple[str, ...], r: int) -> Iterator[str]:
    """Rotate the order each round so no stack always runs first or last."""
    k = r % len(items)
    yield from items[k:] + items[:k]


def summarize(rounds: Rounds, base: str, keys: set[str]) -> dict[str, Any]:
    """Medians per metric plus median paired ratio vs `base` (ratio > 1: more than base)."""
    out: dict[str, Any] = {}
    for name, metrics in rounds.items():
        out[name] = {k: round(statistics.median(v), 2) for k, v in metrics.items()}
    ratios: dict[str, dict[str, float]] = {}
    for name, metrics in rounds.items():
        if name == base:
            continue
        ratios[name] = {
            k: round(statistics.median(a / b for a, b in zip(v, rounds[base][k], strict=True)), 3)
            for k, v in metrics.items()
            if k in keys and all(rounds[base][k])
        }
    out[f"ratio_vs_{base}"] = ratios
    return out


def machine_info() -> dict[str, Any]:
    """nproc, CPU model and library versions, so figures can be compared across machines."""
    with open("/proc/cpuinfo") as f:
        model = next((ln.split(":", 1)[1].strip() for ln in f if ln.startswith("model name")), "?")
    pkgs = ("uvicorn", "httptools", "uvloop", "starlette", "aiohttp", "httpx2", "orjson")
    return {
        "nproc": len(os.sched_getaffinity(0)),
        "cpu_model": model,
        "python": platform.python_version(),
        "versions": {p: metadata.version(p) for p in pkgs},
    }


async def bench(args: argparse.Namespace) -> dict[str, Any]:
    """Run every server and client variant, interleaved, and return the JSON report."""
    t_start = time.perf_counter()
    procs = {s: start_server(s) for s in SERVERS}
    try:
        for proc, port in procs.values():
            await wait_ready(port, proc)
        small_len = len(small_reply(REQ_BODY))
        ev_len = N_EVENTS * len(EVENT)
        # (metric prefix, path, concurrency, requests per connection, body size, units/request)
        scenarios = [
            ("small_c1", "/small", 1, args.small_c1, small_len, 1),
            ("small_c32", "/small", 32, args.small_c32 // 32, small_len, 1),
            ("stream_token_c32", "/stream", 32, args.stream_token // 32, ev_len, N_EVENTS),
            ("stream_batch_c32", "/stream/batched", 32, args.stream_batch // 32, ev_len, N_EVENTS),
        ]
        srv: Rounds = {s: {} for s in SERVERS}
        for r in range(args.rounds):
            for label, path, conc, per_conn, expect, units in scenarios:
                for stack in rotated(SERVERS, r):
                    proc, port = procs[stack]
                    m = await load(port, proc.pid, path, conc, per_conn, expect)
                    n = conc * per_conn
                    unit = "req" if units == 1 else "event"
                    rate = n * units / m["wall"]
                    put = srv[stack].setdefault
                    put(f"{label}_{unit}s_per_s", []).append(rate)
                    put(f"{label}_srv_cpu_us_per_{unit}", []).append(m["cpu"] / (n * units) * 1e6)
                    put(f"{label}_srv_cpu_util", []).append(m["cpu"] / m["wall"])
                    put(f"{label}_loadgen_cpu_util", []).append(m["lg_cpu"] / m["wall"])
                    if conc == 1:
                        put(f"{label}_p50_us", []).append(m["p50"] * 1e6)
            print(f"server round {r + 1}/{args.rounds} done", file=sys.stderr)

        cli: Rounds = {c: {} for c in CLIENTS}
        target_port = procs["uvicorn_asgi"][1]
        for r in range(args.rounds):
            for variant in rotated(CLIENTS, r):
                cmd = [sys.executable, SCRIPT, "client", variant]
                cmd += [str(target_port), str(args.cli_small), str(args.cli_burst)]
                cmd.append(str(args.cli_paced))
                res = await asyncio.to_thread(
                    subprocess.run, cmd, capture_output=True, check=True, timeout=120
                )
                for k, v in json.loads(res.stdout).items():
                    cli[variant].setdefault(k, []).append(v)
            print(f"client round {r + 1}/{args.rounds} done", file=sys.stderr)
    finally:
        for proc, _ in procs.values():
            proc.terminate()
        for proc, _ in procs.values():
            try:
                proc.wait(10)
            except subprocess.TimeoutExpired:
                proc.kill()

    srv_lower = {k for m in srv.values() for k in m if "cpu_us" in k or "p50" in k}
    srv_higher = {k for m in srv.values() for k in m if k.endswith("_per_s")}
    cli_keys = {k for m in cli.values() for k in m}
    return {
        "machine": machine_info(),
        "params": {
            **{k: v for k, v in vars(args).items() if k not in ("cmd", "out")},
            "events_per_stream": N_EVENTS,
            "batched_writes": N_EVENTS // BATCH,
            "small_body_bytes": len(small_reply(REQ_BODY)),
            "event_bytes": len(EVENT),
            "cpu_clock_ticks_per_s": CLK_TCK,
        },
        "notes": (
            "medians over rounds (raw values in per_round); ratio_* = median of per-round "
            "paired ratios vs the base (>1 means larger than base); srv_cpu (user+sys, incl. "
            "loopback TCP work) from /proc/<pid>/stat; client CPU from "
            "process_time in a per-variant subprocess against uvicorn_asgi; paced stream = "
            "1 ms between events so reads carry ~1 event, as from a real upstream"
        ),
        "servers": summarize(srv, "uvicorn_asgi", srv_lower | srv_higher),
        "clients": summarize(cli, "aiohttp_iter_any", cli_keys),
        "per_round": {
            name: {k: [round(x, 2) for x in v] for k, v in metrics.items() if "util" not in k}
            for name, metrics in (srv | cli).items()
        },
        "wall_s": round(time.perf_counter() - t_start, 1),
    }


def main() -> None:
    """Dispatch: orchestrator by default; `serve` / `client` are the child roles."""
    if len(sys.argv) > 1 and sys.argv[1] == "serve":
        serve(sys.argv[2], int(sys.argv[3]))
        return
    if len(sys.argv) > 1 and sys.argv[1] == "client":
        variant, port, n_small, n_burst, n_paced = sys.argv[2], *map(int, sys.argv[3:7])
        uvloop.run(client_main(variant, port, n_small, n_burst, n_paced))
        return
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", default="bench-stack.json")
    p.add_argument("--rounds", type=int, default=7)
    p.add_argument("--small-c1", type=int, default=3000, help="requests per round, conc 1")
    p.add_argument("--small-c32", type=int, default=6400, help="requests per round, conc 32")
    p.add_argument("--stream-token", type=int, default=96, help="streams/round, 1000 writes")
    p.add_argument("--stream-batch", type=int, default=960, help="streams/round, 20 writes")
    p.add_argument("--cli-small", type=int, default=500, help="client /small requests")
    p.add_argument("--cli-burst", type=int, default=24, help="client unpaced streams (conc 4)")
    p.add_argument("--cli-paced", type=int, default=16, help="client paced streams (conc 16)")
    args = p.parse_args()
    report = uvloop.run(bench(args))
    # indented for reading, but each per-round list of numbers kept on one line
    text = re.sub(
        r"\[\s+([^\[\]{}]*?)\s+\]",
        lambda m: "[" + " ".join(m.group(1).split()) + "]",
        json.dumps(report, indent=1),
    )
    print(text)
    with open(args.out, "w") as f:
        f.write(text + "\n")


if __name__ == "__main__":
    main()

"""The API port's HTTP/1.1 protocol alone, llmsvc trees side by side: CPU per request, memory
per open stream.

A daemon's figures carry the whole request (routing, the journal, the upstream) and this
machine's noise is larger than the protocol's share of them, so the protocol is measured on
its own here: one connection made by uvicorn.Server's config and state as serving.py makes
it, a transport that only counts what is written, and an ASGI app that answers at once.

- `request`: one keep-alive connection, a chat request's bytes fed at a time, answered as
  the gateway answers a whole reply (head and body in one write where the tree can). CPU
  per request over `--requests`, process time.
- `stream`: `--streams` connections each with a request whose app has begun a streamed
  reply and waits, as a pumped stream does. The Python heap (tracemalloc) per connection.

Each tree runs in a subprocess of its own (its path first on PYTHONPATH), in turn, the
order turned each round.

Usage:  .venv/bin/python benchmarks/bench_http_protocol.py --tree base=/path/to/worktree
            --tree new=. [--rounds 6] --out x.json
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
from pathlib import Path

from benchkit import commit_of, log

CHILD = r"""
import asyncio, json, sys, time, tracemalloc
import uvicorn
from uvicorn.server import ServerState
from llmsvc.gateway.http_protocol import HttpLimits, protocol_class
try:
    from llmsvc.gateway.http_request import reply_writer
except ImportError:  # a tree from before the protocol was llmsvc's own
    from llmsvc.gateway.http_protocol import reply_writer

REQUEST = (
    b"POST /v1/chat/completions HTTP/1.1\r\nhost: 127.0.0.1:8080\r\n"
    b"user-agent: OpenAI/Python 1.0\r\naccept: application/json\r\n"
    b"content-type: application/json\r\nauthorization: Bearer sk-llmsvc-xxxxxxxxxxxx\r\n"
    b"content-length: 75\r\n\r\n"
    b'{"model":"mock","messages":[{"role":"user","content":"hi"}],"stream":false}'
)
BODY = b'{"id":"chatcmpl-1","object":"chat.completion","choices":[]}'
HEADERS = [
    (b"content-type", b"application/json"),
    (b"content-length", str(len(BODY)).encode()),
    (b"x-request-id", b"0b6c2b1e-5b1f-4d55-9a0c-3f1d1e6e8a11"),
]


class Transport:
    def __init__(self):
        self.bytes = 0
        self.closing = False
    def write(self, data):
        self.bytes += len(data)
    def write_eof(self):
        pass
    def close(self):
        self.closing = True
    def is_closing(self):
        return self.closing
    def pause_reading(self):
        pass
    def resume_reading(self):
        pass
    def get_extra_info(self, name, default=None):
        return {"sockname": ("127.0.0.1", 8080), "peername": ("127.0.0.1", 50000)}.get(
            name, default
        )


async def whole(scope, receive, send):
    while (await receive()).get("more_body"):
        pass
    if reply_writer(scope)(200, list(HEADERS), BODY, False) is None:
        await send({"type": "http.response.start", "status": 200, "headers": HEADERS})
        await send({"type": "http.response.body", "body": BODY})


forever = None


async def streaming(scope, receive, send):
    while (await receive()).get("more_body"):
        pass
    headers = [(b"content-type", b"text/event-stream")]
    if not reply_writer(scope)(200, headers, b"data: {}\n\n", True):
        await send({"type": "http.response.start", "status": 200, "headers": headers})
        await send({"type": "http.response.body", "body": b"data: {}\n\n", "more_body": True})
    await forever


def server(app):
    limits = HttpLimits(16384, 30.0, 60.0, 1_000_000, lambda reason: None)
    config = uvicorn.Config(app, http=protocol_class(limits), lifespan="off", log_config=None,
                            interface="asgi3", proxy_headers=False)
    config.load()
    state = ServerState()
    state.default_headers = [(b"date", b"Mon, 07 Dec 2026 07:00:00 GMT")]
    return config, state


def connection(config, state):
    protocol = config.http_protocol_class(config, state, {})
    protocol.connection_made(Transport())
    return protocol


async def per_request(count):
    config, state = server(whole)
    protocol = connection(config, state)
    for _ in range(200):  # warm
        protocol.data_received(REQUEST)
        while state.tasks:
            await asyncio.gather(*state.tasks)
    start = time.process_time()
    for _ in range(count):
        protocol.data_received(REQUEST)
        while state.tasks:
            await asyncio.gather(*state.tasks)
    return (time.process_time() - start) / count * 1e6


async def per_stream(count):
    global forever
    forever = asyncio.get_running_loop().create_future()
    config, state = server(streaming)
    kept = [connection(config, state) for _ in range(10)]  # warm: classes, caches
    for p in kept:
        p.data_received(REQUEST.replace(b'"stream":false', b'"stream":true '))
    await asyncio.sleep(0)
    tracemalloc.start()
    before = tracemalloc.take_snapshot()
    for _ in range(count):
        p = connection(config, state)
        p.data_received(REQUEST.replace(b'"stream":false', b'"stream":true '))
        kept.append(p)
    for _ in range(3):
        await asyncio.sleep(0)
    after = tracemalloc.take_snapshot()
    grown = sum(s.size_diff for s in after.compare_to(before, "filename"))
    tracemalloc.stop()
    return grown / count


async def main():
    requests, streams = int(sys.argv[1]), int(sys.argv[2])
    print(json.dumps({
        "cpu_us_per_request": round(await per_request(requests), 2),
        "heap_bytes_per_stream": round(await per_stream(streams), 1),
    }))


import uvloop
uvloop.run(main())
"""


def run_tree(path: Path, requests: int, streams: int) -> dict[str, float]:
    env = dict(os.environ, PYTHONPATH=str(path.resolve()))
    out = subprocess.run(
        [sys.executable, "-c", CHILD, str(requests), str(streams)],
        env=env,
        cwd=path,  # `-c` puts the working directory first on sys.path
        check=True,
        capture_output=True,
        text=True,
    ).stdout
    result: dict[str, float] = json.loads(out.splitlines()[-1])
    return result


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--tree", action="append", required=True, help="name=path, twice or more")
    p.add_argument("--rounds", type=int, default=6)
    p.add_argument("--requests", type=int, default=20_000)
    p.add_argument("--streams", type=int, default=2_000)
    p.add_argument("--out", type=Path, required=True)
    args = p.parse_args()
    trees = [(name, Path(path)) for name, path in (t.split("=", 1) for t in args.tree)]
    runs: dict[str, list[dict[str, float]]] = {name: [] for name, _ in trees}
    for round_ in range(args.rounds):
        turn = trees[round_ % len(trees) :] + trees[: round_ % len(trees)]
        for name, path in turn:
            result = run_tree(path, args.requests, args.streams)
            runs[name].append(result)
            log(f"round {round_} {name}: {result}")
    summary = {
        name: {
            "commit": commit_of(path),
            **{key: statistics.median(r[key] for r in runs[name]) for key in runs[name][0]},
        }
        for name, path in trees
    }
    for name, figures in summary.items():
        log(f"{name}: {figures}")
    args.out.write_text(json.dumps({"summary": summary, "runs": runs}, indent=2) + "\n")


if __name__ == "__main__":
    main()

"""A py-spy profile of the daemon summed by part of llmsvc, main thread only.

Each sample counts for the innermost frame that belongs to a part in PARTS;
one with none below uvloop's `run_forever` is the loop's own work (socket
reads and writes, epoll, callbacks in C). Record a profile with

    py-spy record --nonblocking --threads -r 200 -f raw -o daemon.raw -p <daemon pid> -d 20

under load, then:  python benchmarks/profile_parts.py daemon.raw[.gz]

`--nonblocking` matters under paced streams: py-spy otherwise stops the daemon for
each sample, a batch's WAL write then ends after the next upstream read, and the
pump hands that read to the task: the profile shows the task's path carrying the
tokens the pump carries when nothing watches (BENCHMARKS.md, "Conversations across
workers"). Its idle threads may count as busy: read the main thread.
"""

from __future__ import annotations

import argparse
import collections
import gzip
from pathlib import Path

LOOP = "loop internals (syscalls, callbacks in C)"
# Matched against each frame's "function (file:line)", innermost first; first part wins.
PARTS: list[tuple[str, tuple[str, ...]]] = [
    ("logging (the access line)", ("logging/__init__", "llmsvc/logs.py")),
    ("the flusher, on the loop", ("llmsvc/store/", "sqlalchemy/")),
    ("journal and WAL append", ("llmsvc/wal/", "llmsvc/gateway/journal.py")),
    (
        "client write (ASGI send, or llmsvc's own)",
        (
            "RequestResponseCycle.send",  # uvicorn's protocol, in trees before 66b64d2
            "._write_body",
            "._write_reply",
            "Request.send",  # gateway/http_request.py
            "Request.write",
            "Request.reply",
        ),
    ),
    ("wire encoding", ("gateway/sse.py", "gateway/wire.py", "_wire.py")),
    ("upstream read and parse", ("llmsvc/providers/",)),
    (
        "request parse and admission",
        (
            "gateway/request.py",
            "pydantic",
            "Gateway.admit",
            "http_protocol.py",
            "http_request.py",
            "HttpToolsProtocol",
        ),
    ),
    (
        "exchange bookkeeping",
        ("gateway/chat.py", "gateway/app.py", "gateway/router.py", "accounting.py", "metrics.py"),
    ),
]


def part_of(frames: list[str]) -> str:
    for frame in reversed(frames):
        for part, marks in PARTS:
            if any(mark in frame for mark in marks):
                return part
    return LOOP


def shares(path: Path) -> tuple[int, list[tuple[str, float]]]:
    """The main thread's samples and each part's share of them, largest first."""
    opener = gzip.open if path.suffix == ".gz" else open
    counts: collections.Counter[str] = collections.Counter()
    with opener(path, "rt") as lines:
        for line in lines:
            stack, _, n = line.rstrip().rpartition(" ")
            frames = stack.split(";")
            if "MainThread" in frames[0]:
                counts[part_of(frames[1:])] += int(n)
    total = sum(counts.values())
    return total, [(part, 100 * n / total) for part, n in counts.most_common()]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("profile", type=Path, help="py-spy's raw output (-f raw), or it gzipped")
    total, parts = shares(parser.parse_args().profile)
    print(f"main-thread samples: {total}")
    for part, share in parts:
        print(f"{share:5.1f} %  {part}")


if __name__ == "__main__":
    main()

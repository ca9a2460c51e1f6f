#!/usr/bin/env python3
"""How long a conversation's next turn waits with `workers = 2`, for llmsvc trees side by side.

Not a test: one run that prints (and writes) JSON. Each tree runs a supervisor of two
workers with the mock provider (the tree imported by PYTHONPATH, this tree's virtualenv).
A Responses turn is made, then continued by `previous_response_id`, each on a new
connection with the official `openai` SDK, so the kernel gives about half the
continuations to the worker that did not answer the turn. Figures: the continuation's
latency (p50, p90, max), and that of a continuation of an id that never was (answered
400 "not found"), the trees' rounds interleaved.

Usage:  .venv/bin/python benchmarks/bench_continuations.py --tree base=/path/to/main
            --tree now=. [--rounds 2] [--turns 60] [--out bench-continuations.json]
"""

from __future__ import annotations

import argparse
import asyncio
import os
import shutil
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

import openai
from benchkit import (
    PACKAGES,
    Proc,
    commit_of,
    machine_info,
    pct,
    processes,
    rotated,
    spawn_daemon,
    tree_arg,
    wait_ready,
    write_report,
)

MOCK = [{"name": "mock", "kind": "mock", "models": ["mock"]}]
UNKNOWN = "resp_" + "0" * 32


def turns(daemon: Proc, n: int) -> dict[str, float]:
    """`n` continuations and 10 of an unknown id, each on a new connection (blocking)."""

    def client() -> openai.OpenAI:
        return openai.OpenAI(base_url=f"http://127.0.0.1:{daemon.port}/v1", api_key="-")

    continued, unknown = [], []
    for i in range(n):
        with client() as c:
            first = c.responses.create(model="mock", input=f"turn {i}", max_output_tokens=2)
        with client() as c:
            t0 = time.perf_counter()
            c.responses.create(
                model="mock", input="on", previous_response_id=first.id, max_output_tokens=2
            )
            continued.append(time.perf_counter() - t0)
    for _ in range(10):
        with client() as c:
            t0 = time.perf_counter()
            try:
                c.responses.create(model="mock", input="on", previous_response_id=UNKNOWN)
            except openai.BadRequestError:
                unknown.append(time.perf_counter() - t0)
    if len(unknown) != 10:
        raise RuntimeError("a continuation of an unknown id was not refused as not found")
    return {
        "continuation_p50_ms": pct(continued, 0.5) * 1e3,
        "continuation_p90_ms": pct(continued, 0.9) * 1e3,
        "continuation_max_ms": max(continued) * 1e3,
        "unknown_id_p50_ms": pct(unknown, 0.5) * 1e3,
    }


async def run(args: argparse.Namespace) -> dict[str, Any]:
    tmp = Path(tempfile.mkdtemp(prefix="llmsvc-continuations-"))
    # The daemons start here: a tree before 06a79db starts its workers with `python -m`,
    # which would import the llmsvc of a source tree it was started in.
    os.chdir(tmp)
    trees: dict[str, Path] = dict(args.tree)
    runs: dict[str, list[dict[str, float]]] = {name: [] for name in trees}
    try:
        await rounds(args, tmp, trees, runs)
        machine = machine_info(tmp, PACKAGES)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)  # the daemons' WALs and SQLite files
    return {
        "machine": machine,
        "turns_per_round": args.turns,
        "trees": {
            name: {
                "path": str(path),
                "commit": commit_of(path),
                **{
                    key: round(statistics.median(run[key] for run in runs[name]), 2)
                    for key in runs[name][0]
                },
                "runs": runs[name],
            }
            for name, path in trees.items()
        },
    }


async def rounds(
    args: argparse.Namespace,
    tmp: Path,
    trees: dict[str, Path],
    runs: dict[str, list[dict[str, float]]],
) -> None:
    """A supervisor of two workers per tree, then `args.rounds` rounds of turns on each."""
    with processes() as procs:
        daemons = {}
        for name, path in trees.items():
            home = tmp / name
            home.mkdir()
            settings = {"PYTHONPATH": str(path), "LLMSVC_WORKERS": "2"}
            procs.append(
                daemon := spawn_daemon(home, f"sqlite:///{home / 'db'}", MOCK, None, settings)
            )
            await wait_ready(daemon)
            daemons[name] = daemon
        await asyncio.sleep(2)  # both workers of each tree serving
        for r in range(args.rounds):
            for name in rotated(list(trees), r):
                got = await asyncio.to_thread(turns, daemons[name], args.turns)
                runs[name].append(got)
                print(f"round {r} {name}: {got}", flush=True)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--tree", type=tree_arg, action="append", required=True, help="name=path")
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--turns", type=int, default=60, help="continuations per round")
    p.add_argument("--out", type=Path, default=Path("bench-continuations.json"))
    args = p.parse_args()
    out = args.out.resolve()  # before the run leaves the working directory
    write_report(asyncio.run(run(args)), out)


if __name__ == "__main__":
    main()

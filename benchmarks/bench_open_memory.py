"""Resident memory per open stream, two llmsvc trees side by side: `bench_scale.py`'s `open`
scenario (5,000 streams at 1 token/s, plateau minus idle), interleaved.

The upstream called directly, a daemon running a base tree (e.g. a worktree of main) and a
daemon running this tree, each measured in turn on freshly started processes, the order
rotated each round, so the comparison is made in one run on one machine state. The base
daemon imports llmsvc from `--base` (PYTHONPATH); both use this tree's virtualenv and packages.

Usage:  .venv/bin/python benchmarks/bench_open_memory.py --base /path/to/main --out x.json
        [--rounds 2] [--streams 5000] [--tokens 60] [--stagger-s 10]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import shutil
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

from bench_scale import (
    PATH,
    Side,
    _open_load,
    _sample_open,
    measured,
    open_fds,
    start_daemon,
    tree_rss_kib,
)
from benchkit import (
    MODEL,
    PACKAGES,
    chat_body,
    commit_of,
    log,
    machine_info,
    processes,
    rotated,
    spawn_upstream,
)
from loadgen import StreamStats, request_bytes

HERE = Path(__file__).resolve().parents[1]


async def open_run(
    args: argparse.Namespace, side: Side, watched: Any, port: int, up: Any
) -> dict[str, Any]:
    """One `open` measure of one side: idle figures, then the streams, sampled each second."""
    await asyncio.sleep(args.settle_s)
    idle_rss, idle_fds = tree_rss_kib(watched.pid), open_fds(watched.pid)
    samples: list[tuple[float, int, int, int]] = []
    stats = StreamStats()
    request = request_bytes("127.0.0.1", port, PATH, chat_body(MODEL, args.tokens, True))
    sampler = asyncio.create_task(_sample_open(stats, watched, samples))
    n = args.streams
    got = await measured(
        side, up, "", lambda: _open_load(port, n, request, args.tokens, args.stagger_s, stats)
    )
    sampler.cancel()
    full = [s for s in samples if s[1] >= n]
    plateau = statistics.median(s[2] for s in full) if full else None
    return {
        "streams": got["streams"],
        "errors": got["errors"],
        "first_errors": got["first_errors"],
        "ttft_p50_ms": got["ttft_p50_ms"],
        "cpu_us_per_token": got.get("cpu_us_per_token"),
        "seconds_with_all_open": len(full),
        "idle_rss_mib": round(idle_rss / 1024, 1),
        "plateau_rss_mib": None if plateau is None else round(plateau / 1024, 1),
        "rss_kib_per_open_stream": None if plateau is None else round((plateau - idle_rss) / n, 2),
        "idle_fds": idle_fds,
        "plateau_fds": statistics.median(s[3] for s in full) if full else None,
        "loadavg_after": [round(x, 2) for x in os.getloadavg()],
        "samples": samples,
    }


async def run(args: argparse.Namespace) -> dict[str, Any]:
    tmp = Path(tempfile.mkdtemp(prefix="llmsvc-openmem-", dir=args.tmp_dir))
    base = Path(args.base)
    report: dict[str, Any] = {
        "machine": machine_info(tmp, PACKAGES),
        "base": {"tree": str(base), "commit": commit_of(base)},
        "branch": {"tree": str(HERE), "commit": commit_of(HERE)},
        "streams": args.streams,
        "tokens_per_stream": args.tokens,
        "token_delay_ms": 1000.0,
        "stagger_s": args.stagger_s,
    }
    runs: dict[str, list[dict[str, Any]]] = {"direct": [], "daemon_base": [], "daemon_branch": []}
    started = time.perf_counter()
    base_env = {"PYTHONPATH": str(base)}
    for r in range(args.rounds):
        for name in rotated(list(runs), r):
            # Fresh processes for every measure: memory freed after a run is not given back
            # to the system, so a second run's "idle" would already hold the first's peak.
            with processes() as procs:
                procs.append(up := spawn_upstream(tmp, f"upstream-{r}-{name}", 1000.0))
                watched, side = up, Side("direct", None)
                if name != "direct":
                    home = f"{name}-{r}"
                    env = base_env if name == "daemon_base" else {}
                    procs.append(watched := await start_daemon(tmp, home, "", up, env))
                    side = Side(name, watched)
                got = await open_run(args, side, watched, watched.port, up)
            runs[name].append(got)
            log(
                f"round {r} {name}: served {got['streams']} errors {got['errors']} "
                f"rss/stream {got['rss_kib_per_open_stream']} KiB "
                f"(idle {got['idle_rss_mib']} MiB, plateau {got['plateau_rss_mib']} MiB)"
            )
    for name, side_runs in runs.items():
        values = [r["rss_kib_per_open_stream"] for r in side_runs if r["rss_kib_per_open_stream"]]
        report[name] = {
            "rss_kib_per_open_stream_median": round(statistics.median(values), 2)
            if values
            else None,
            "rss_kib_per_open_stream_runs": values,
            "runs": side_runs,
        }
    report["machine"]["loadavg_at_end"] = [round(x, 2) for x in os.getloadavg()]
    report["wall_s"] = round(time.perf_counter() - started, 1)
    shutil.rmtree(tmp, ignore_errors=True)
    return report


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--base", required=True, help="the tree whose llmsvc the base daemon runs")
    parser.add_argument("--out", required=True)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--streams", type=int, default=5000)
    parser.add_argument("--tokens", type=int, default=60)
    parser.add_argument("--stagger-s", type=float, default=10.0)
    parser.add_argument("--settle-s", type=float, default=2.0)
    parser.add_argument("--tmp-dir", default=None)
    args = parser.parse_args()
    args.base = os.path.realpath(args.base)
    report = asyncio.run(run(args))
    Path(args.out).write_text(json.dumps(report, indent=1) + "\n")
    for name in ("direct", "daemon_base", "daemon_branch"):
        log(f"{name}: {report[name]['rss_kib_per_open_stream_median']} KiB per open stream")


if __name__ == "__main__":
    main()

"""The hot path against its floor: every figure of issue 19, each beside its reference.

Run as ``benchmarks/bench.py --floor``. Each row is a ratio or a difference
measured in one run, with the reference interleaved in the same rounds, so the
rows hold on any machine (this one is shared and noisy):

1. non-streaming added latency p50 and p99 at concurrency 1, 4 and 16: the
   daemon in front of the fast upstream against that upstream called directly,
   beside what `relay_floor.py` adds in the same rounds (the least any hop adds)
   and what `journal_floor.py` adds (the least a hop that journals each request adds);
2. paced streams (300 at 50 tokens/s, arriving at once): daemon CPU per token
   against `relay_floor.py` (a raw TCP relay that neither parses nor stores), and
   beside `journal_floor.py` (the same relay journaling every token in the WAL);
3. the same runs' added time to first token, daemon and relay;
4. resident memory per open stream (5,000 open at 1 token/s), daemon against
   the upstream serving them directly;
5. an instant upstream, c=100 with 1000-token replies: daemon CPU per token
   including the flush (no reference: the target is absolute).

The scenarios are bench_scale's; this module picks their sizes, adds the
latency at several concurrencies, and prints the table.
"""

from __future__ import annotations

import argparse
import functools
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any

import bench_scale
from benchkit import (
    MODEL,
    PACKAGES,
    chat_body,
    chat_url,
    close_report,
    complete,
    latency_rounds,
    log,
    machine_busy_s,
    machine_info,
    new_session,
    per_round,
    processes,
    spawn_upstream,
    summary,
)
from benchkit import Endpoint as Target

CONCURRENCIES = (1, 4, 16)
# Issue 19's targets: added ms, a ratio to the relay, ms, KiB and µs, each an upper bound.
TARGETS = {
    "latency_p50": 0.3,  # ms added at every concurrency
    "latency_p99": 1.0,
    "paced_cpu_over_relay": 2.0,
    "paced_added_ttft_p50_ms": 10.0,
    "open_rss_kib_per_stream": 16.0,
    "instant_cpu_us_per_token": 4.0,
}
# The targets BENCHMARKS.md proposes where the cannot be met by any hop on this
# machine: at c=4 and 16 what llmsvc adds beyond a relay that journals each request and
# token (journal_floor.py) measured in the same rounds, since that floor alone misses the
# issue's bounds there, and the paced CPU against the same floor instead of a relay that
# stores nothing.
PROPOSED = {"beyond_journal_p50": 0.3, "beyond_journal_p99": 1.0, "paced_cpu_over_journal": 1.5}


async def phase_latency(args: argparse.Namespace, tmp: Path) -> dict[str, Any]:
    """Whole replies, direct and through the daemon interleaved, at each concurrency."""
    out: dict[str, Any] = {}
    with processes() as procs:
        procs.append(up := spawn_upstream(tmp, "upstream-latency", 0.0))
        daemon = await bench_scale.start_daemon(tmp, "daemon-latency", args.database_url, up, {})
        procs.append(daemon)
        procs.append(relay := bench_scale.spawn_relay(tmp, up))
        procs.append(journal := bench_scale.spawn_relay(tmp, up, journaled=True))
        sessions = [new_session() for _ in range(4)]
        try:
            direct = Target("direct", chat_url(up), sessions[0], MODEL)
            via = Target("daemon", chat_url(daemon), sessions[1], MODEL)
            hops = [
                Target("relay", chat_url(relay), sessions[2], MODEL),
                Target("journal", chat_url(journal), sessions[3], MODEL),
            ]
            body = chat_body(MODEL, 16, stream=False)
            daemon_cpu_s = functools.partial(bench_scale.tree_cpu_s, daemon.pid)
            for target in (direct, via, *hops):  # warm every path: imports, pools, caches
                for _ in range(64):
                    await complete(target, body)
            for c in CONCURRENCIES:
                raw = await latency_rounds(
                    direct, via, body, args.rounds, args.latency_n, c, daemon_cpu_s, hops
                )
                got = out[f"c{c}"] = {**summary(raw), "per_round": per_round(raw)}
                log(f"latency c={c}: added p50 {got['added_p50_ms']} ms "
                    f"p99 {got['added_p99_ms']} ms; relay_floor.py "
                    f"+{got['relay_added_p50_ms']} / +{got['relay_added_p99_ms']} ms; "
                    f"journal_floor.py +{got['journal_added_p50_ms']} / "
                    f"+{got['journal_added_p99_ms']} ms")  # fmt: skip
        finally:
            for session in sessions:
                await session.close()
    out["requests_per_round"] = args.latency_n
    return out


def configure(args: argparse.Namespace) -> None:
    """bench_scale's scenarios at the issue's sizes; `--quick` shrinks them to seconds."""
    args.paced_streams_sweep = "20" if args.quick else "300"
    args.workers_sweep = "1"
    bench_scale.configure(args)
    args.paced_stagger_s = 0.0  # the streams arrive at once
    # Quick: enough requests that their CPU spans several of /proc's 10 ms ticks (32 at
    # ~0.3 ms each could read as none).
    args.latency_n = 300 if args.quick else 2000


def table(report: dict[str, Any]) -> list[dict[str, Any]]:
    """The issue's rows: the figure, its reference from the same run, the target, met."""
    rows: list[dict[str, Any]] = []

    def row(figure: str, ours: Any, reference: str, target: str, met: bool | None) -> None:
        rows.append(dict(figure=figure, llmsvc=ours, reference=reference, target=target, met=met))

    latency = report["latency"]
    for c in CONCURRENCIES:
        got = latency[f"c{c}"]
        p50, p99 = got["added_p50_ms"], got["added_p99_ms"]
        row(
            f"non-streaming c={c}, added p50 / p99 (ms)",
            f"+{p50} / +{p99}",
            f"direct p50 {got['direct_p50_ms']} / p99 {got['direct_p99_ms']}; relay_floor.py "
            f"+{got.get('relay_added_p50_ms')} / +{got.get('relay_added_p99_ms')}; "
            f"journal_floor.py +{got.get('journal_added_p50_ms')} / "
            f"+{got.get('journal_added_p99_ms')}; daemon CPU "
            f"{got['daemon_cpu_us_per_request']} µs per request",
            f"<= +{TARGETS['latency_p50']} / +{TARGETS['latency_p99']}",
            p50 is not None
            and p99 is not None
            and p50 <= TARGETS["latency_p50"]
            and p99 <= TARGETS["latency_p99"],
        )
    paced = next(iter(report["paced"].values()))
    ratio = paced.get("daemon_over_relay_cpu")
    row(
        f"paced, {paced['streams']} streams at 50 tokens/s: CPU per token (µs)",
        paced.get("daemon_cpu_us_per_token"),
        f"relay_floor.py {paced.get('relay_cpu_us_per_token')} (ratio {ratio}); "
        f"journal_floor.py {paced.get('journal_cpu_us_per_token')} "
        f"(ratio {paced.get('daemon_over_journal_cpu')})",
        f"<= {TARGETS['paced_cpu_over_relay']}x the relay",
        ratio is not None and ratio <= TARGETS["paced_cpu_over_relay"],
    )
    relay_added = _added(paced, "relay")
    row(
        f"added time to first token, {paced['streams']} paced streams at once, p50 (ms)",
        paced.get("added_ttft_p50_ms"),
        f"relay_floor.py +{relay_added}",
        f"<= +{TARGETS['paced_added_ttft_p50_ms']}",
        (paced.get("added_ttft_p50_ms") or 1e9) <= TARGETS["paced_added_ttft_p50_ms"],
    )
    opened = report["open"]
    per_stream = opened["daemon"]["rss_kib_per_open_stream"]
    row(
        f"resident memory per open stream, {opened['streams']} open (KiB)",
        per_stream,
        f"the upstream directly {opened['direct']['rss_kib_per_open_stream']}",
        f"<= {TARGETS['open_rss_kib_per_stream']}",
        per_stream is not None and per_stream <= TARGETS["open_rss_kib_per_stream"],
    )
    instant = report["instant"].get("daemon_w1_cpu_us_per_token")
    serving = report["instant"].get("daemon_w1_serving_cpu_us_per_token")
    flush = None if instant is None or serving is None else round(instant - serving, 3)
    row(
        "instant upstream, CPU per token including the flush (µs)",
        instant,
        f"of which the flush process {flush}",
        f"<= {TARGETS['instant_cpu_us_per_token']}",
        instant is not None and instant <= TARGETS["instant_cpu_us_per_token"],
    )
    return rows


def proposed(report: dict[str, Any]) -> list[dict[str, Any]]:
    """The proposed targets' rows, in `table`'s shape."""
    rows: list[dict[str, Any]] = []
    for c in CONCURRENCIES[1:]:
        got = report["latency"][f"c{c}"]
        p50, p99 = (
            round(got[f"added_{q}_ms"] - got[f"journal_added_{q}_ms"], 3) for q in ("p50", "p99")
        )
        rows.append(
            dict(
                figure=f"non-streaming c={c}, added beyond journal_floor.py's, p50 / p99 (ms)",
                llmsvc=f"+{p50} / +{p99}",
                reference=f"journal_floor.py +{got['journal_added_p50_ms']} / "
                f"+{got['journal_added_p99_ms']}",
                target=f"<= +{PROPOSED['beyond_journal_p50']} / +{PROPOSED['beyond_journal_p99']}",
                met=p50 <= PROPOSED["beyond_journal_p50"] and p99 <= PROPOSED["beyond_journal_p99"],
            )
        )
    paced = next(iter(report["paced"].values()))
    ratio = paced.get("daemon_over_journal_cpu")
    rows.append(
        dict(
            figure=f"paced, {paced['streams']} streams: CPU per token over journal_floor.py's",
            llmsvc=ratio,
            reference=f"journal_floor.py {paced.get('journal_cpu_us_per_token')} µs",
            target=f"<= {PROPOSED['paced_cpu_over_journal']}x",
            met=ratio is not None and ratio <= PROPOSED["paced_cpu_over_journal"],
        )
    )
    return rows


def _added(paced: dict[str, Any], side: str) -> float | None:
    hop, direct = paced.get(f"{side}_ttft_p50_ms"), paced.get("direct_ttft_p50_ms")
    return None if hop is None or direct is None else round(hop - direct, 3)


def print_table(rows: list[dict[str, Any]]) -> None:
    lines = ["| figure | llmsvc | reference (same run) | target | met |", "|---|---|---|---|---|"]
    for r in rows:
        cells = [r["figure"], r["llmsvc"], r["reference"], r["target"], "yes" if r["met"] else "no"]
        lines.append("| " + " | ".join(map(str, cells)) + " |")
    log("\n" + "\n".join(lines))


async def run(args: argparse.Namespace) -> dict[str, Any]:
    configure(args)
    started, busy0 = time.perf_counter(), machine_busy_s()
    tmp = Path(tempfile.mkdtemp(prefix="llmsvc-floor-", dir=args.tmp_dir))
    report: dict[str, Any] = {"machine": machine_info(tmp, PACKAGES)}
    try:
        log("floor: latency")
        report["latency"] = await phase_latency(args, tmp)
        for name in ("paced", "open", "instant"):
            log(f"floor: {name}")
            report[name] = await getattr(bench_scale, f"phase_{name}")(args, tmp)
    finally:
        if not args.keep_tmp:
            shutil.rmtree(tmp, ignore_errors=True)
    report["table"] = table(report)
    print_table(report["table"])
    report["proposed"] = proposed(report)
    print_table(report["proposed"])
    return close_report(report, started, busy0)

"""benchmarks/bench.py end to end with tiny counts: the report has its shape and its figures.

Not a performance check (the counts are far too small for that): it keeps the benchmark
runnable as the daemon changes, so the real run is never the first to find it broken.
"""

from __future__ import annotations

import json
import signal
import subprocess
import sys
from pathlib import Path
from typing import Any

import openai
import pytest
from daemon_process import UpstreamProcess
from postgres import opted_out, unique_dbname

from llmsvc.wal import HEADER_SIZE
from llmsvc.wal.codec import RecordType, decode, decode_json, decode_token

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "bench.py"


def positive(value: Any) -> bool:
    return isinstance(value, int | float) and value > 0


def non_negative(value: Any) -> bool:
    return isinstance(value, int | float) and value >= 0


@pytest.fixture
def pg_url(request: pytest.FixtureRequest) -> str:
    """The suite's PostgreSQL, or '' on the explicit opt-out (the bench then records a skip)."""
    if opted_out():
        return ""
    return str(request.getfixturevalue("pg_cluster").url())


def test_bench_runs_and_reports_every_figure(tmp_path: Path, pg_url: str) -> None:
    out = tmp_path / "bench.json"
    cmd = [sys.executable, str(SCRIPT), "--quick", "--out", str(out), "--tmp-dir", str(tmp_path)]
    cmd += ["--concurrency", "2,4", "--tokens", "5,20", "--paced-concurrency", "2"]
    cmd += ["--sustained-seconds", "0.5", "--pg-url", pg_url]
    cmd += ["--pg-scratch-db", unique_dbname("llmsvc_bench")]
    res = subprocess.run(cmd, capture_output=True, timeout=90)
    assert res.returncode == 0, res.stderr.decode(errors="replace")[-4000:]
    report = json.loads(out.read_text())
    assert json.loads(res.stdout) == report

    assert positive(report["machine"]["nproc"])
    assert report["daemon"]["exit_code"] == 0
    latency = report["latency_nonstream_c1"]
    for key in ("direct_p50_ms", "direct_p99_ms", "daemon_p50_ms", "daemon_p99_ms"):
        assert positive(latency[key]), key
    assert isinstance(latency["added_p50_ms"], float)
    failover = report["failover_nonstream_c1"]
    assert positive(failover["failover_p50_ms"])
    assert positive(failover["served_p50_ms"])
    assert isinstance(failover["added_p50_ms"], float)
    ttft = report["ttft_stream_c1"]
    assert positive(ttft["direct_ttft_p50_ms"])
    assert positive(ttft["daemon_ttft_p50_ms"])

    assert set(report["streaming"]) == {"c2_t5", "c2_t20", "c4_t5", "c4_t20"}
    runs = [*report["streaming"].values(), *report["streaming_paced"].values()]
    runs = [r for r in runs if isinstance(r, dict)]
    for run in runs:
        for key in (
            "direct_tokens_per_s",
            "daemon_tokens_per_s",
            "daemon_over_direct_tokens_per_s",
        ):
            assert positive(run[key]), key
        # CPU is read in 10 ms ticks: a tiny run may cost zero of them
        assert non_negative(run["daemon_cpu_us_per_token"])
        assert non_negative(run["daemon_drain_s"])
    sustained = report["sustained_target_rate"]
    assert positive(sustained["daemon_tokens_per_s"])
    assert non_negative(sustained["daemon_drain_s"])

    for mode in ("write", "fsync"):
        assert positive(report["wal_appends"][mode]["appends_per_s"]), mode
    flush = report["flush"]
    assert positive(flush["sqlite"]["rows_per_s"])
    if pg_url:
        assert positive(flush["postgresql"]["rows_per_s"]), flush["postgresql"]
    else:
        assert "error" in flush["postgresql"]

    for name, verdict in report["targets"].items():
        assert isinstance(verdict["met"], bool), name
        if name != "daemon_tokens_per_s_c100_t1000":  # that scenario is not in a tiny run
            assert verdict["reached"] is not None, name


def test_the_floor_table_runs_and_reports_every_row(tmp_path: Path) -> None:
    """`--floor`: latency at three concurrencies, paced, open and instant streams, one table."""
    out = tmp_path / "floor.json"
    cmd = [sys.executable, str(SCRIPT), "--floor", "--quick", "--out", str(out)]
    cmd += ["--tmp-dir", str(tmp_path), "--pg-url", ""]
    res = subprocess.run(cmd, capture_output=True, timeout=240)
    assert res.returncode == 0, res.stderr.decode(errors="replace")[-4000:]
    report = json.loads(out.read_text())

    for c in (1, 4, 16):
        latency = report["latency"][f"c{c}"]
        for q in ("p50", "p99"):
            assert positive(latency[f"direct_{q}_ms"])
            assert positive(latency[f"daemon_{q}_ms"])
            assert isinstance(latency[f"added_{q}_ms"], float)
            for hop in ("relay", "journal"):
                assert positive(latency[f"{hop}_{q}_ms"])
                assert isinstance(latency[f"{hop}_added_{q}_ms"], float)
        assert positive(latency["daemon_cpu_us_per_request"])

    paced = report["paced"]["streams_20"]
    for side in ("direct", "relay", "journal", "daemon"):
        assert paced[f"{side}_errors"] == 0, paced[f"{side}_first_errors"]
        assert positive(paced[f"{side}_tokens_per_s"]), side
        assert positive(paced[f"{side}_ttft_p50_ms"]), side
    assert positive(paced["daemon_cpu_us_per_token"])
    assert non_negative(paced["relay_cpu_us_per_token"])  # CPU comes in 10 ms ticks: maybe 0
    assert non_negative(paced["journal_cpu_us_per_token"])
    assert isinstance(paced["added_ttft_p50_ms"], float)
    assert non_negative(paced["daemon_drain_s"])

    opened = report["open"]
    for side in ("daemon", "direct"):
        assert (opened[side]["streams"], opened[side]["errors"]) == (50, 0), opened[side]
        assert opened[side]["most_open_at_once"] > 0
    assert positive(opened["daemon"]["loop_lag_probes"])
    assert positive(opened["daemon"]["loop_lag_p99_le_s"])

    assert report["instant"]["daemon_w1_errors"] == 0
    assert positive(report["instant"]["daemon_w1_cpu_us_per_token"])

    rows = report["table"]
    assert len(rows) == 7  # three latency rows, paced CPU, TTFT, memory, instant
    assert all(row["llmsvc"] is not None and isinstance(row["met"], bool) for row in rows)
    assert "| non-streaming c=16, added p50 / p99 (ms) |" in res.stderr.decode()
    proposed = report["proposed"]  # c=4 and c=16 beyond the journal floor, paced over it
    assert [row["figure"].split(",")[0] for row in proposed] == [
        "non-streaming c=4",
        "non-streaming c=16",
        "paced",
    ]
    assert all(row["llmsvc"] is not None and isinstance(row["met"], bool) for row in proposed)


def test_the_journal_floor_relays_each_reply_once_it_is_in_its_wal(tmp_path: Path) -> None:
    """The floor the daemon is measured against stores what it relays, as the daemon does: a
    stream's tokens and a whole reply's text, each between its request's start and end."""
    script = SCRIPT.parent / "journal_floor.py"
    wal = tmp_path / "wal"
    messages: Any = [{"role": "user", "content": "hi"}]
    with UpstreamProcess(token_delay_ms=1) as upstream:
        cmd = [sys.executable, str(script), "--upstream-port", str(upstream.port)]
        with subprocess.Popen([*cmd, "--wal-dir", str(wal)], stdout=subprocess.PIPE) as relay:
            try:
                assert relay.stdout is not None
                port = int(relay.stdout.readline().split()[1])
                client = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="unused")
                chunks = client.chat.completions.create(
                    model="m", messages=messages, stream=True, max_tokens=7
                )
                streamed = [c.choices[0].delta.content for c in chunks if c.choices]
                whole = client.chat.completions.create(model="m", messages=messages, max_tokens=5)
                client.close()
            finally:
                relay.send_signal(signal.SIGTERM)
            assert relay.wait(10) == 0
    [segment] = wal.glob("*.wal")
    records = decode(segment.read_bytes(), HEADER_SIZE).records
    kinds = [kind for kind, _ in records]
    starts = [RecordType.REQUEST_START, RecordType.ATTEMPT_START]
    ends = [RecordType.ATTEMPT_END, RecordType.REQUEST_END]
    assert kinds == [*starts, *[RecordType.TOKEN] * 7, *ends, *starts, RecordType.TOKEN, *ends]
    texts = [decode_token(payload)[2] for kind, payload in records if kind == RecordType.TOKEN]
    assert texts == [*(text for text in streamed if text), whole.choices[0].message.content]
    assert [decode_json(records[i][1])["stream"] for i in (0, 11)] == [True, False]


def test_the_scale_scenarios_run_and_report_their_figures(tmp_path: Path) -> None:
    """Two workers and a throttled database; paced, open and instant streams are the floor's."""
    out = tmp_path / "scale.json"
    cmd = [sys.executable, str(SCRIPT), "--scale", "--quick", "--out", str(out)]
    cmd += ["--tmp-dir", str(tmp_path), "--scale-phases", "instant,throttled"]
    cmd += ["--workers-sweep", "2"]
    res = subprocess.run(cmd, capture_output=True, timeout=240)
    assert res.returncode == 0, res.stderr.decode(errors="replace")[-4000:]
    report = json.loads(out.read_text())

    instant = report["instant"]
    assert instant["daemon_w2_errors"] == 0
    assert positive(instant["daemon_w2_cpu_us_per_token"])
    assert positive(instant["daemon_w2_share_of_direct_tokens_per_s"])

    throttled = report["throttled"]
    assert throttled["errors"] == 0
    assert throttled["tokens"] > 0
    assert any(s["throttled"] for s in throttled["samples"])
    assert throttled["drained"] is True


def test_the_keys_and_rate_limit_modes_run_and_report_their_figures(tmp_path: Path) -> None:
    """On SQLite only: test_limits holds the limits on PostgreSQL; this runs the bench's code."""
    out = tmp_path / "limits.json"
    cmd = [sys.executable, str(SCRIPT), "--auth-compare", "--limit-accuracy", "--quick"]
    cmd += ["--out", str(out), "--tmp-dir", str(tmp_path), "--pg-url", ""]
    cmd += ["--rpm", "600", "--burst", "20", "--window", "2"]  # the burst spent in 1 s
    res = subprocess.run(cmd, capture_output=True, timeout=120)
    assert res.returncode == 0, res.stderr.decode(errors="replace")[-4000:]
    report = json.loads(out.read_text())

    auth = report["auth_compare_nonstream_c1"]
    for key in ("direct_p50_ms", "none_p50_ms", "keys_p50_ms", "keys_p99_ms"):
        assert positive(auth[key]), key
    assert isinstance(auth["keys_minus_none_p50_ms"], float)
    accuracy = report["limit_accuracy"]
    assert "postgresql" not in accuracy
    run = accuracy["sqlite"]
    assert run["daemon_exit_code"] == 0
    for part in ("burst_spent", "window", "whole_run"):
        assert run[part]["other"] == 0, part
        assert run[part]["accepted"] + run[part]["refused_429"] == run[part]["offered"]
    assert run["window"]["refused_429"] > 0  # 3x the rate: some are refused
    assert len(run["stored_by_worker"]) == 2  # both workers served


def test_the_opentelemetry_mode_runs_and_every_span_reaches_the_receiver(tmp_path: Path) -> None:
    out = tmp_path / "otel.json"
    cmd = [sys.executable, str(SCRIPT), "--otel-compare", "--quick", "--pg-url", ""]
    cmd += ["--out", str(out), "--tmp-dir", str(tmp_path)]
    res = subprocess.run(cmd, capture_output=True, timeout=120)
    assert res.returncode == 0, res.stderr.decode(errors="replace")[-4000:]
    otel = json.loads(out.read_text())["otel_compare_nonstream_c1"]
    for key in ("direct_p50_ms", "otel_off_p50_ms", "otel_on_p50_ms", "otel_dead_p50_ms"):
        assert positive(otel[key]), key
    assert isinstance(otel["added_p50_otel_on_over_off"], float)
    assert otel["spans_received"] == otel["spans_expected_otel_on"]  # two per request


def test_the_tail_mode_runs_every_flush_variant_beside_the_upstream(tmp_path: Path) -> None:
    out = tmp_path / "tail.json"
    cmd = [sys.executable, str(SCRIPT), "--tail-compare", "--quick", "--pg-url", ""]
    cmd += ["--out", str(out), "--tmp-dir", str(tmp_path)]
    res = subprocess.run(cmd, capture_output=True, timeout=120)
    assert res.returncode == 0, res.stderr.decode(errors="replace")[-4000:]
    tail = json.loads(out.read_text())["tail_compare_nonstream_c1"]
    assert positive(tail["direct_p99_ms"])
    for name in ("flushing", "flush_in_daemon", "flush_idle"):
        assert positive(tail[f"{name}_p99_ms"]), name
        assert positive(tail[f"{name}_cpu_us_per_request"]), name
        assert 0 <= tail[f"{name}_over_2ms_pct"] <= 100, name
    batches = json.loads(out.read_text())["flush_batch_costs"]
    assert batches["records"] == 5 * batches["requests"]  # start, attempt, token, two ends
    per_record = list(batches["cpu_us_per_record"].values())
    assert len(per_record) == 4
    assert all(positive(us) for us in per_record)


def test_the_peer_comparison_runs_and_reports_its_figures(tmp_path: Path) -> None:
    """benchmarks/bench_peers.py with the repository's own relay as the one peer."""
    out = tmp_path / "peers.json"
    benchmarks = SCRIPT.parent
    relay = f"relay={sys.executable} {benchmarks / 'relay_floor.py'} --port {{port}}"
    cmd = [sys.executable, str(benchmarks / "bench_peers.py"), "--quick", "--out", str(out)]
    cmd += ["--tmp-dir", str(tmp_path), "--peer", relay + " --upstream-port {upstream_port}"]
    cmd += ["--stream-concurrency", "2", "--stream-tokens", "20"]
    # a stream of 1,500 tokens at >= 1 ms each is still open when SIGTERM comes at 1 s
    cmd += ["--sigterm-streams", "1", "--sigterm-tokens", "1500"]
    res = subprocess.run(cmd, capture_output=True, timeout=120)
    assert res.returncode == 0, res.stderr.decode(errors="replace")[-4000:]
    report = json.loads(out.read_text())

    assert sorted(report["peers"]) == ["relay"]
    latency = report["latency_nonstream_c1"]
    for key in ("direct_p50_ms", "llmsvc_p50_ms", "relay_p50_ms"):
        assert positive(latency[key]), key
    assert isinstance(latency["llmsvc_added_p50_ms"], float)
    assert "relay_over_llmsvc_added_p50" in latency
    cpu = report["stream_cpu"]
    assert non_negative(cpu["llmsvc_cpu_us_per_token"])  # CPU comes in 10 ms ticks: maybe 0
    assert positive(cpu["relay_tokens_per_s"])
    stopped = report["sigterm_mid_stream"]
    ours, relay_got = stopped["llmsvc"], stopped["relay"]
    assert ours["exit_code"] == 0
    assert ours["streams_by_ending"] == {"done": 1, "error_event": 0, "cut": 0}
    assert ours["tokens_received"] == ours["tokens_stored"] == 1500
    assert relay_got["streams_by_ending"]["cut"] == 1
    assert relay_got["tokens_received"] < 1500


def test_the_console_bench_fills_a_store_and_times_every_page(tmp_path: Path, pg_url: str) -> None:
    """benchmarks/bench_console.py on 2,000 requests: filled, migrated, every page answered."""
    if not pg_url:
        pytest.skip("the console bench needs PostgreSQL")
    out = tmp_path / "console.json"
    cmd = [sys.executable, str(SCRIPT.parent / "bench_console.py"), "--pg-url", pg_url]
    cmd += ["--db", unique_dbname("llmsvc_bench_console"), "--requests", "2000", "--tokens", "5"]
    cmd += ["--repeats", "1", "--out", str(out), "--tmp-dir", str(tmp_path)]
    res = subprocess.run(cmd, capture_output=True, timeout=60)
    assert res.returncode == 0, res.stderr.decode(errors="replace")[-4000:]
    report = json.loads(out.read_text())

    assert report["store"]["requests"] == 2000
    assert report["store"]["attempts"] == 2200  # a tenth with a failed attempt first
    assert report["store"]["token_rows"] == 10_000
    assert report["migrated"]["from"] is None
    assert report["daemon_exit"] == 0
    assert {"requests_deep_page", "filter_metadata", "request_with_timeline", "health"} <= set(
        report["pages"]
    )
    for name, page in report["pages"].items():
        assert 0 < page["median_ms"] <= page["max_ms"], name


def test_a_profile_is_summed_by_the_innermost_part_of_each_main_thread_sample(
    tmp_path: Path,
) -> None:
    """benchmarks/profile_parts.py over a py-spy raw file: other threads are left out, and a
    sample in logging under the exchange counts as logging, not as the exchange."""
    loop = "thread (1): MainThread;<module> (llmsvc:8);run_forever (loop.c:1)"
    exchange = "Exchange.run (llmsvc/gateway/chat.py:216)"
    raw = tmp_path / "daemon.raw"
    raw.write_text(
        f"{loop} 5\n"
        f"{loop};{exchange} 3\n"
        f"{loop};{exchange};FieldLogger.log (llmsvc/logs.py:74) 2\n"
        "thread (2): wal-writer;WalWriter._run (llmsvc/wal/writer.py:254) 40\n"
    )
    script = SCRIPT.parent / "profile_parts.py"
    res = subprocess.run([sys.executable, str(script), str(raw)], capture_output=True, text=True)
    assert res.returncode == 0, res.stderr
    assert res.stdout.splitlines() == [
        "main-thread samples: 10",
        " 50.0 %  loop internals (syscalls, callbacks in C)",
        " 30.0 %  exchange bookkeeping",
        " 20.0 %  logging (the access line)",
    ]


def test_the_token_index_bench_reports_every_case(tmp_path: Path) -> None:
    """benchmarks/bench_token_index.py with a few thousand tokens: every case, its figures,
    and an index that costs written bytes beyond its table's."""
    out = tmp_path / "token-index.json"
    cmd = [sys.executable, str(SCRIPT.parent / "bench_token_index.py")]
    cmd += ["--tokens", "3000", "--rounds", "1", "--out", str(out)]
    res = subprocess.run(cmd, capture_output=True, timeout=60)
    assert res.returncode == 0, res.stderr.decode(errors="replace")[-4000:]
    cases = json.loads(out.read_text())["cases"]
    assert len(cases) == 6
    for figures in cases.values():
        assert positive(figures["cpu_us_per_token"])
        assert positive(figures["bytes_written_per_token"])
    for rounds in (2, 8):
        indexed = cases[f"time-ordered ids, indexed, {rounds} rounds/commit"]
        bare = cases[f"time-ordered ids, no index, {rounds} rounds/commit"]
        assert bare["bytes_written_per_token"] < indexed["bytes_written_per_token"]


def test_the_flush_rows_bench_stores_each_trees_requests(tmp_path: Path, pg_url: str) -> None:
    """benchmarks/bench_flush_rows.py with a few hundred requests, this tree twice: a figure
    for each tree, into PostgreSQL (SQLite on the explicit opt-out)."""
    repo = SCRIPT.parents[1]
    out = tmp_path / "flush-rows.json"
    cmd = [sys.executable, str(SCRIPT.parent / "bench_flush_rows.py"), "--rounds", "1"]
    cmd += ["--tree", f"a={repo}", "--tree", f"b={repo}", "--requests", "300"]
    cmd += ["--pg-url", pg_url] if pg_url else []
    res = subprocess.run([*cmd, "--out", str(out)], capture_output=True, timeout=120)
    assert res.returncode == 0, res.stderr.decode(errors="replace")[-4000:]
    report = json.loads(out.read_text())
    assert report["store"] == ("postgresql" if pg_url else "sqlite")
    assert [len(tree["cpu_us_per_request"]) for tree in report["trees"].values()] == [1, 1]
    assert all(positive(t["cpu_us_per_request_median"]) for t in report["trees"].values())

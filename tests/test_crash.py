"""benchmarks/crash_test.py, short: SIGKILL the daemon under streaming clients, a few times a mode.

Clients stream by every streaming API (chat completions, Responses, Anthropic Messages), each
held to the same check.

The full run (25 iterations, 20 clients) is the script's default; this keeps it runnable and
holds the promise on every suite run: no token a client received is lost or stored twice,
and, with callers' keys (`--keys`), every key's and team's spend is the sum over its stored
requests, each counted once under its key, interrupted ones with their counted tokens.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "crash_test.py"
APIS = ("chat", "responses", "messages")

pytestmark = pytest.mark.timeout(120)


def crash_run(tmp_path: Path, where: list[str], sync: str, *options: str) -> dict[str, Any]:
    """The script's report; its exit status must agree with it."""
    out = tmp_path / "crash.json"
    cmd = [sys.executable, str(SCRIPT), *where, "--out", str(out), "--sync", sync, *options]
    res = subprocess.run(cmd, capture_output=True, timeout=110, check=False)
    report: dict[str, Any] = json.loads(out.read_text())
    assert json.loads(res.stdout) == report
    assert res.returncode == 0, json.dumps(report, indent=1)[-6000:]
    assert report["ok"] is True
    assert set(report["modes"]) == ({"write", "fsync"} if sync == "both" else {sync})
    return report


def assert_nothing_lost(mode: dict[str, Any], iterations: int, least_requests: int) -> None:
    assert mode["iterations"] == iterations
    assert mode["tokens_lost"] == 0
    assert mode["tokens_different"] == 0
    assert mode["duplicates"] == 0
    assert mode["gaps"] == 0
    assert mode["failures"] == []
    assert mode["requests_checked"] >= least_requests
    assert mode["tokens_checked"] > 0
    assert mode["marked_interrupted_at_boot"] > 0  # the restart's boot did the recovery
    assert set(mode["requests_by_api"]) == set(APIS)  # every streaming API was checked


def test_kill_9_under_keys_loses_and_duplicates_nothing_and_keeps_spend_exact(
    tmp_path: Path, postgres_url: str
) -> None:
    report = crash_run(
        tmp_path,
        ["--database-url", postgres_url],
        "fsync",  # SQLite's run below covers "write"; the suite's time is short
        *("--iterations", "2", "--clients", "8", "--seed", "4", "--keys", "4", "--teams", "2"),
        *("--kill-min", "2.0", "--kill-max", "3.0"),  # as on SQLite below: at 0.3 s, a slower
        # machine's clients had not all had their first answer (14 of 16 requests)
        *("--apis", ",".join(APIS)),
    )
    counted: dict[str, int] = {}
    for mode in report["modes"].values():
        assert_nothing_lost(mode, 2, 2 * 8)  # each client got its first request
        keyed = mode["keys"]
        assert len(keyed["spend"]["key"]) == 4
        assert len(keyed["spend"]["team"]) == 2
        assert sum(k["cost"] for k in keyed["spend"]["key"].values()) > 0
        assert keyed["client_usage_checked"] > 0
        for source, n in keyed["interrupted_counted_by"].items():
            counted[source] = counted.get(source, 0) + n
    # Streams cut by the kill were counted at the restart, by the tokenizer (gpt-4o-mini)
    # and one per delta (mock, which no tokenizer fits).
    assert counted.get("tokenizer", 0) > 0
    assert counted.get("deltas", 0) > 0


def test_kill_9_under_keys_on_sqlite_keeps_spend_exact(tmp_path: Path) -> None:
    report = crash_run(
        tmp_path,
        ["--sqlite"],
        "write",  # the default; PostgreSQL's run covers both, and the suite's time is short
        *("--iterations", "1", "--clients", "6", "--seed", "5", "--keys", "3", "--teams", "2"),
        *("--kill-min", "2.0", "--kill-max", "3.0"),  # one kill a mode: late enough for every
        # client to have begun on a loaded machine (the daemon's flush process starts then too)
        *("--apis", ",".join(APIS)),
    )
    for mode in report["modes"].values():
        assert_nothing_lost(mode, 1, 1)
        assert len(mode["keys"]["spend"]["key"]) == 3
        assert sum(k["requests"] for k in mode["keys"]["spend"]["team"].values()) > 0

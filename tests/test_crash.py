"""scripts/crash_test.py, short: SIGKILL the daemon under 8 streaming clients, 3 times a mode.

The full run (25 iterations, 20 clients) is the script's default; this keeps it runnable and
holds the promise on every suite run: no token a client received is lost or stored twice.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "crash_test.py"

pytestmark = pytest.mark.timeout(120)


def test_kill_9_under_load_loses_and_duplicates_nothing(tmp_path: Path, postgres_url: str) -> None:
    out = tmp_path / "crash.json"
    cmd = [sys.executable, str(SCRIPT), "--database-url", postgres_url, "--out", str(out)]
    cmd += ["--iterations", "3", "--clients", "8", "--sync", "both", "--seed", "4"]
    began = time.monotonic()
    res = subprocess.run(cmd, capture_output=True, timeout=110, check=False)
    took = time.monotonic() - began
    report = json.loads(out.read_text())
    assert json.loads(res.stdout) == report
    assert res.returncode == 0, json.dumps(report, indent=1)[-6000:]
    assert report["ok"] is True
    assert set(report["modes"]) == {"write", "fsync"}
    for mode in report["modes"].values():
        assert mode["iterations"] == 3
        assert mode["tokens_lost"] == 0
        assert mode["tokens_different"] == 0
        assert mode["duplicates"] == 0
        assert mode["gaps"] == 0
        assert mode["failures"] == []
        assert mode["requests_checked"] >= 3 * 8  # every client got at least its first request
        assert mode["tokens_checked"] > 0
        assert mode["marked_interrupted_at_boot"] > 0  # the restart's boot did the recovery
    assert took < 60, f"the short crash run took {took:.1f}s"

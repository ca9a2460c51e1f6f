"""What the benchmark scripts share: machine facts, scratch databases, the JSON report.

Imported by benchmarks/bench.py and benchmarks/bench_recovery.py (run as
`python benchmarks/NAME.py`, so this folder is on sys.path).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import subprocess
from importlib import metadata
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import asyncpg

ROOT = Path(__file__).resolve().parent.parent
CLK_TCK = os.sysconf("SC_CLK_TCK")


def machine_busy_s() -> float:
    """CPU seconds the whole machine spent busy (all cores), from /proc/stat."""
    with open("/proc/stat") as f:
        ticks = [int(x) for x in f.readline().split()[1:9]]
    return (sum(ticks) - ticks[3] - ticks[4]) / CLK_TCK  # minus idle and iowait


def fs_type(path: Path) -> str:
    """The filesystem the WAL lives on: fsync on tmpfs would be free and the figure void."""
    best, kind = "", "?"
    with open("/proc/mounts") as f:
        for line in f:
            mount, fstype = line.split()[1:3]
            if str(path.resolve()).startswith(mount) and len(mount) > len(best):
                best, kind = mount, fstype
    return kind


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

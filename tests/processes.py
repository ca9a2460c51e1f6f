"""Processes as /proc shows them: a process's children by command line, whether one runs."""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path
from typing import Any


def children(pid: int, marker: str) -> list[int]:
    """The children of `pid` whose command line holds `marker`."""
    found = []
    for task in Path(f"/proc/{pid}/task").iterdir():
        for child in (task / "children").read_text().split():
            try:
                cmdline = Path(f"/proc/{child}/cmdline").read_bytes()
            except FileNotFoundError:
                continue
            if marker.encode() in cmdline:
                found.append(int(child))
    return found


def alive(pid: int) -> bool:
    """Running: not gone, and not a zombie left for its parent to reap."""
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except FileNotFoundError:
        return False
    return state != "Z"


def wait_until(check: Callable[[], Any], what: str, timeout: float = 15.0) -> Any:
    """`check`'s first true answer, polled; an assertion naming `what` past `timeout`."""
    deadline = time.monotonic() + timeout
    while not (found := check()):
        assert time.monotonic() < deadline, f"not within {timeout} s: {what}"
        time.sleep(0.05)
    return found

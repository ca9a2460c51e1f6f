"""Checking that llmsvc's state is private: what the tests of modes 0700/0600 share."""

from __future__ import annotations

import stat
from pathlib import Path


def assert_private(root: Path) -> list[str]:
    """Every directory from `root` down is 0700 and every file 0600; their relative names."""
    found = []
    for path in [root, *sorted(root.rglob("*"))]:
        mode = stat.S_IMODE(path.lstat().st_mode)
        expected = 0o700 if path.is_dir() else 0o600
        assert mode == expected, f"{path} is {mode:o}, not {expected:o}"
        found.append(str(path.relative_to(root)))
    return found

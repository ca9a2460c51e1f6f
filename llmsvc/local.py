"""What a daemon keeps beside its WAL so that it can start and serve without the database.

`checkpoint`: the last LSN the database committed for this instance, rewritten
after commits (at most once a second). It is only a hint, read at boot before
the database answers: repair uses it to tell records lost from records already
stored. A value lower than the database's is safe (replay is idempotent), and
boot's catch-up loads the real checkpoint before it replays anything.

`provider_switches.json`: the providers an operator disabled, rewritten when a
switch changes, so a boot without the database still honours them.

`api_keys.json`: the callers' keys and teams as last read (`llmsvc.keytable`): ids,
names, limits and the SHA-256 of each secret, never a secret, so a restart
while the database is away still authenticates, revocations included.

All are written to a temporary file and renamed: a reader sees the old value
or the new one, and one it cannot parse counts as absent.
"""

from __future__ import annotations

import contextlib
import os
from pathlib import Path
from typing import Any

import orjson

from llmsvc import private
from llmsvc.logs import logger
from llmsvc.wal import list_segments

log = logger(__name__)

CHECKPOINT_FILE = "checkpoint"
SWITCHES_FILE = "provider_switches.json"
KEYS_FILE = "api_keys.json"


def read_checkpoint(wal_dir: Path) -> int:
    """The checkpoint hint: the file's, and never below the log's first segment.

    Segments go (housekeeping) only once the database holds their records, so
    the LSN before the first one left is a checkpoint the database had reached.
    """
    segments = list_segments(wal_dir)
    floor = segments[0].first_lsn - 1 if segments else 0
    try:
        return max(floor, int((wal_dir / CHECKPOINT_FILE).read_text()))
    except (OSError, ValueError):
        return floor


def write_checkpoint(wal_dir: Path, lsn: int) -> None:
    _replace(wal_dir / CHECKPOINT_FILE, f"{lsn}\n".encode())


def read_disabled(wal_dir: Path) -> set[str]:
    """The providers an operator had disabled when this instance last knew."""
    try:
        found = orjson.loads((wal_dir / SWITCHES_FILE).read_bytes())
        return {name for name in found["disabled"] if isinstance(name, str)}
    except (OSError, orjson.JSONDecodeError, KeyError, TypeError):
        return set()


def write_disabled(wal_dir: Path, disabled: set[str]) -> None:
    _replace(wal_dir / SWITCHES_FILE, orjson.dumps({"disabled": sorted(disabled)}))


def read_keys(wal_dir: Path) -> dict[str, Any]:
    """The keys and teams this instance last read: `{"keys": [...], "teams": [...]}`."""
    try:
        found = orjson.loads((wal_dir / KEYS_FILE).read_bytes())
    except (OSError, orjson.JSONDecodeError):
        return {}
    return found if isinstance(found, dict) else {}


def write_keys(wal_dir: Path, keys: list[dict[str, Any]], teams: list[dict[str, Any]]) -> None:
    _replace(wal_dir / KEYS_FILE, orjson.dumps({"keys": keys, "teams": teams}))


def _replace(path: Path, data: bytes) -> None:
    """Write `data` to `path` by rename; a failure is logged (the file is only a hint)."""
    tmp = path.with_name(f"{path.name}.tmp")
    try:
        with os.fdopen(private.open_file(tmp, os.O_WRONLY | os.O_TRUNC), "wb") as f:
            f.write(data)
        os.replace(tmp, path)
    except OSError as exc:
        log.warning("not written", file=path, error=exc.strerror or exc)
        with contextlib.suppress(OSError):
            tmp.unlink()

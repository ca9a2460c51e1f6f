"""What a daemon keeps beside its WAL to start without the database: read back, or absent."""

from __future__ import annotations

import uuid
from pathlib import Path

from llmsvc.local import (
    CHECKPOINT_FILE,
    SWITCHES_FILE,
    read_checkpoint,
    read_disabled,
    write_checkpoint,
    write_disabled,
)
from llmsvc.wal.segment import create_segment


def test_the_checkpoint_hint_is_the_files_and_never_below_the_first_segment(
    wal_dir: Path,
) -> None:
    assert read_checkpoint(wal_dir) == 0
    write_checkpoint(wal_dir, 41)
    assert read_checkpoint(wal_dir) == 41
    (wal_dir / CHECKPOINT_FILE).write_text("4")  # torn by a power loss
    create_segment(wal_dir, uuid.uuid4(), 1001)  # housekeeping removed 1..1000: stored
    assert read_checkpoint(wal_dir) == 1000
    (wal_dir / CHECKPOINT_FILE).write_text("")
    assert read_checkpoint(wal_dir) == 1000


def test_provider_switches_round_trip_and_an_unreadable_copy_counts_as_none(
    wal_dir: Path,
) -> None:
    assert read_disabled(wal_dir) == set()
    write_disabled(wal_dir, {"b", "a"})
    assert read_disabled(wal_dir) == {"a", "b"}
    (wal_dir / SWITCHES_FILE).write_text('{"disabled": [1, "a"')
    assert read_disabled(wal_dir) == set()

"""Directories llmsvc creates are 0700 (each one, not just the last), its files 0600."""

from __future__ import annotations

import stat
from pathlib import Path

import pytest
import sqlalchemy as sa
from private_state import assert_private

from llmsvc import private
from llmsvc.store.engine import create_engine

pytestmark = pytest.mark.usefixtures("umask_022")


def test_every_missing_parent_is_created_private_and_an_existing_one_is_left(
    tmp_path: Path,
) -> None:
    shared = tmp_path / "shared"
    shared.mkdir(mode=0o755)
    made = private.make_dirs(shared / "a" / "b" / "c")
    assert made == shared / "a" / "b" / "c"
    assert assert_private(shared / "a") == [".", "b", "b/c"]
    assert stat.S_IMODE(shared.stat().st_mode) == 0o755  # not ours to change
    private.make_dirs(made)  # already there


def test_a_file_in_the_way_of_a_directory_is_an_error(tmp_path: Path) -> None:
    (tmp_path / "file").write_text("")
    with pytest.raises(NotADirectoryError):
        private.make_dirs(tmp_path / "file")
    with pytest.raises(NotADirectoryError):
        private.make_dirs(tmp_path / "file" / "sub")


def test_an_existing_file_keeps_its_contents(tmp_path: Path) -> None:
    path = tmp_path / "kept"
    path.write_text("data")
    private.create_file(path)
    assert path.read_text() == "data"


async def test_the_sqlite_database_and_its_side_files_are_private(tmp_path: Path) -> None:
    """SQLite gives -wal and -shm the database file's mode, so that file is made 0600 first."""
    state = tmp_path / "new" / "state"
    engine = create_engine(f"sqlite+aiosqlite:///{state / 'llmsvc.db'}")
    try:
        async with engine.begin() as conn:
            await conn.execute(sa.text("CREATE TABLE t (x INTEGER)"))
            await conn.execute(sa.text("INSERT INTO t VALUES (1)"))
            # while a connection is open, the -wal and -shm files exist
            assert assert_private(tmp_path / "new") == [
                ".",
                "state",
                "state/llmsvc.db",
                "state/llmsvc.db-shm",
                "state/llmsvc.db-wal",
            ]
    finally:
        await engine.dispose()

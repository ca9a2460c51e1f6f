"""Directories llmsvc creates are 0700 (each one, not just the last), its files 0600."""

from __future__ import annotations

import sqlite3
import stat
import subprocess
import sys
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


def test_an_engine_made_beside_open_connections_leaves_their_sqlite_locks(tmp_path: Path) -> None:
    """Closing any descriptor of a file drops every POSIX lock the process holds on it. An
    engine made while this process's connections use the database (the flusher's own) once
    opened the file to create it: another process's connection then closed as if it were
    the last, and deleted the WAL this process's connections went on writing to."""
    path = tmp_path / "llmsvc.db"
    ours = sqlite3.connect(path)
    ours.execute("PRAGMA journal_mode=WAL")
    ours.execute("CREATE TABLE t (x)")
    ours.execute("INSERT INTO t VALUES (1)")
    ours.commit()
    ours.execute("SELECT * FROM t").fetchall()  # it holds its shared lock from here on

    create_engine(f"sqlite+aiosqlite:///{path}")
    other = "import sqlite3, sys; c = sqlite3.connect(sys.argv[1]); c.execute('SELECT 1')"
    other += "; c.close()"
    subprocess.run([sys.executable, "-c", other, str(path)], check=True)

    assert Path(f"{path}-wal").exists()  # not taken for the last connection's to delete
    ours.execute("INSERT INTO t VALUES (2)")
    ours.commit()
    theirs = sqlite3.connect(path)
    assert theirs.execute("SELECT count(*) FROM t").fetchone() == (2,)  # our commit is seen
    theirs.close()
    ours.close()

"""Creating llmsvc's directories and files private to its user: they hold prompts and replies.

Every directory llmsvc creates is 0700, each missing parent too (`mkdir`'s
`parents=True` gives only the last one the mode), and every file 0600, whichever
command creates it first. SQLite gives its `-wal`, `-shm` and `-journal` files
the database file's mode, so the database file is created here before SQLite
opens it. What already exists is left as the operator made it.
"""

from __future__ import annotations

import contextlib
import os
from pathlib import Path

DIR_MODE = 0o700
FILE_MODE = 0o600


def make_dirs(path: Path) -> Path:
    """Create `path` and each missing parent, every one 0700; return `path`."""
    missing = []
    for directory in (path, *path.parents):
        if directory.exists():
            break
        missing.append(directory)
    for directory in reversed(missing):
        try:
            directory.mkdir(mode=DIR_MODE)
        except FileExistsError:  # another process made it meanwhile
            if not directory.is_dir():
                raise
    if not path.is_dir():
        raise NotADirectoryError(f"{path} is not a directory")
    return path


def open_file(path: Path | str, flags: int) -> int:
    """`os.open` with `flags`, creating the file 0600 if it is missing."""
    return os.open(path, flags | os.O_CREAT, FILE_MODE)


def create_file(path: Path | str) -> None:
    """Create an empty 0600 file unless one is there (its contents and mode are kept).

    One that is there is not opened: closing any descriptor of a file drops every
    POSIX lock this process holds on it, and SQLite's locks on a database in use are
    those (another process could then take itself for the last user and delete the
    `-wal` our connections still write to)."""
    with contextlib.suppress(FileExistsError):
        os.close(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, FILE_MODE))

"""`llmsvc run` with an injectable fsync failure or flush hang, for tests only.

A real disk rarely fails an fsync on cue, so this wrapper replaces `os.fdatasync`
(what the WAL writer and its syncer call) before starting the daemon: while the file
named by the environment variable FAULT_FSYNC_TRIGGER exists, every call fails with
EIO, as a failing disk would report it; until then the real call runs. The daemon is
otherwise `llmsvc run` unchanged, in its own process.

FAULT_FLUSH_HANG names a file while whose existence every flush to the database
hangs (a database that stopped answering).

Usage:  FAULT_FSYNC_TRIGGER=/path/to/trigger python tests/fault_daemon.py
        FAULT_FLUSH_HANG=/path/to/trigger python tests/fault_daemon.py
"""

from __future__ import annotations

import asyncio
import errno
import os
import sys
import threading
from pathlib import Path

TRIGGER_ENV = "FAULT_FSYNC_TRIGGER"
HANG_ENV = "FAULT_FLUSH_HANG"
INJECTED = "fault_daemon: fdatasync failed with EIO (injected)"


def inject_fsync_failure(trigger: Path) -> None:
    """Make `os.fdatasync` fail with EIO whenever `trigger` exists; say so once on stderr."""
    real = os.fdatasync
    said = threading.Event()

    def fdatasync(fd: int) -> None:
        if trigger.exists():
            if not said.is_set():
                said.set()
                print(f"{INJECTED} fd={fd}", file=sys.stderr, flush=True)
            raise OSError(errno.EIO, os.strerror(errno.EIO))
        real(fd)

    os.fdatasync = fdatasync


def inject_flush_hang(trigger: Path) -> None:
    """Make every flush hang, as on a database that stopped answering, while `trigger` exists.

    The patch is this process's, so the flusher writes here, not from its flush process
    (test_stall.py stalls a real PostgreSQL under the flush process).
    """
    from llmsvc.store import flusher

    os.environ["LLMSVC_FLUSH_PROCESS"] = "false"

    real = flusher.write_batch

    async def write_batch(*args: object) -> None:
        while trigger.exists():  # noqa: ASYNC110, ASYNC240 - polling the test's trigger file
            await asyncio.sleep(0.05)
        await real(*args)  # type: ignore[arg-type]

    flusher.write_batch = write_batch  # type: ignore[assignment]


def main() -> int:
    trigger = os.environ.get(TRIGGER_ENV)
    hang = os.environ.get(HANG_ENV)
    if not trigger and not hang:
        print(f"fault_daemon: set {TRIGGER_ENV} or {HANG_ENV} to a trigger file", file=sys.stderr)
        return 2
    if trigger:
        inject_fsync_failure(Path(trigger))
    if hang:
        inject_flush_hang(Path(hang))
    from llmsvc.cli import main as llmsvc_main

    return llmsvc_main(["run"])


if __name__ == "__main__":
    sys.exit(main())

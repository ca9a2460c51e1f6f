"""`llmsvc run` with an injectable fsync failure, for tests only.

A real disk rarely fails an fsync on cue, so this wrapper replaces `os.fdatasync`
(what the WAL writer and its syncer call) before starting the daemon: while the file
named by the environment variable FAULT_FSYNC_TRIGGER exists, every call fails with
EIO, as a failing disk would report it; until then the real call runs. The daemon is
otherwise `llmsvc run` unchanged, in its own process.

Usage:  FAULT_FSYNC_TRIGGER=/path/to/trigger python tests/fault_daemon.py
"""

from __future__ import annotations

import errno
import os
import sys
import threading
from pathlib import Path

TRIGGER_ENV = "FAULT_FSYNC_TRIGGER"
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


def main() -> int:
    trigger = os.environ.get(TRIGGER_ENV)
    if not trigger:
        print(f"fault_daemon: set {TRIGGER_ENV} to the trigger file's path", file=sys.stderr)
        return 2
    inject_fsync_failure(Path(trigger))
    from llmsvc.cli import main as llmsvc_main

    return llmsvc_main(["run"])


if __name__ == "__main__":
    sys.exit(main())

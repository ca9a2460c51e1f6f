"""Cutting off a torn tail, keeping the cut bytes aside for inspection."""

from __future__ import annotations

import logging
import os
import shutil

from llmsvc.wal.codec import Stop
from llmsvc.wal.reader import Scan
from llmsvc.wal.segment import fsync_dir

log = logging.getLogger(__name__)


def repair_tail(scan: Scan) -> None:
    """Copy the bytes after the last valid record to `<segment>.broken`, then truncate.

    Only for the newest segment, where an unfinished write is what a crash
    leaves. Nothing is deleted: the cut bytes stay beside the log.
    """
    path = scan.segment.path
    broken = path.with_name(path.name + ".broken")
    n = 1
    while broken.exists():
        broken = path.with_name(f"{path.name}.broken.{n}")
        n += 1
    with path.open("rb") as src, broken.open("wb") as dst:
        src.seek(scan.end)
        shutil.copyfileobj(src, dst)
        dst.flush()
        os.fsync(dst.fileno())
    with path.open("r+b") as f:
        f.truncate(scan.end)
        os.fsync(f.fileno())
    fsync_dir(path.parent)
    level = logging.WARNING if scan.stop in (Stop.PARTIAL, Stop.ZEROS) else logging.ERROR
    log.log(
        level,
        "wal tail repaired segment=%s offset=%d cut_bytes=%d reason=%s kept=%s",
        path.name,
        scan.end,
        scan.size - scan.end,
        scan.stop.name.lower(),
        broken.name,
    )

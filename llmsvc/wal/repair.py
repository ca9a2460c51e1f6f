"""Making the log readable end to end at boot, keeping aside whatever is cut.

The end of the newest segment is where a crash stops a write: whatever fails
its checks there is copied to `<segment>.broken` and cut off (a checksum
failure rather than a partial frame or zeros is logged as an error). Anything
else is damage a crash does not explain — a bad frame in an older segment, a
header of another instance, a file that cannot be read, a segment overlapping
another — and goes to `quarantine/`: whole files are moved there, cut bytes copied
there. Nothing is deleted, nothing invalid is replayed, and every finding is
logged and returned so it can be counted and stored.
"""

from __future__ import annotations

import logging
import os
import shutil
import uuid
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from llmsvc import private
from llmsvc.logs import logger
from llmsvc.wal.codec import Stop
from llmsvc.wal.errors import Corruption, Damage
from llmsvc.wal.reader import Scan, scan_segment
from llmsvc.wal.segment import Segment, fsync_dir, list_segments

log = logger(__name__)

QUARANTINE_DIR = "quarantine"


@dataclass(frozen=True, slots=True)
class Finding:
    """One thing repair found in a segment and what it did about it."""

    segment: str
    kind: Damage
    reason: str
    action: str  # cut, quarantined
    kept: str  # where the cut bytes or the file went, relative to the WAL directory
    offset: int = 0  # where a cut began
    bytes: int = 0  # how many bytes were cut or moved


@dataclass
class Repairs:
    """What a boot found in the log; `lost` is LSN ranges above the checkpoint now gone."""

    findings: list[Finding] = field(default_factory=list)
    lost: list[tuple[int, int]] = field(default_factory=list)
    newest: Scan | None = None  # the last segment left, as repaired: where appends go on

    @property
    def clean(self) -> bool:
        return not self.findings and not self.lost

    def counts(self) -> dict[str, int]:
        counts = {kind: 0 for kind in (Damage.TORN_TAIL.value, Damage.CORRUPT.value, "quarantined")}
        for finding in self.findings:
            if finding.kind in (Damage.TORN_TAIL, Damage.CORRUPT):
                counts[finding.kind] += 1
            if finding.action == "quarantined":
                counts["quarantined"] += 1
        counts["lost_records"] = sum(b - a + 1 for a, b in self.lost)
        return counts

    def as_dict(self) -> dict[str, Any]:
        return {
            "findings": [asdict(f) for f in self.findings],
            "lost": self.lost,
            "counts": self.counts(),
        }


def repair_log(wal_dir: Path, instance_id: uuid.UUID, checkpoint: int) -> Repairs:
    """Check every segment; cut, quarantine and report until the log reads cleanly.

    `checkpoint` tells lost records from ones the database already holds.
    Repairs records `newest`, so the writer does not read the segment again.
    """
    repairs = Repairs()
    kept: list[Scan] = []  # the segments left in the log, as scanned
    verdicts: list[tuple[Segment, Scan | tuple[Damage, str]]] = []  # scan, or why it must go
    for segment in list_segments(wal_dir):
        verdict: Scan | tuple[Damage, str]
        try:
            verdict = scan_segment(segment, instance_id)
        except Corruption as exc:
            verdict = Damage.BAD_HEADER, exc.reason
        except OSError as exc:
            verdict = Damage.UNREADABLE, exc.strerror or str(exc)
        if isinstance(verdict, Scan):
            last = kept[-1] if kept else None
            if last and segment.first_lsn < last.segment.first_lsn + last.records:
                inside = f"its first LSN {segment.first_lsn} is inside {last.segment.path.name}"
                verdict = Damage.OVERLAP, inside
            else:
                kept.append(verdict)
        verdicts.append((segment, verdict))
    # Act in log order once the log's newest segment is known: a stray file may sort last.
    for segment, verdict in verdicts:
        if not isinstance(verdict, Scan):
            repairs.findings.append(_quarantine(segment, *verdict))
        elif verdict.stop is not Stop.END:
            repairs.findings.append(_cut(verdict, newest=verdict is kept[-1]))
    expected = checkpoint + 1  # the first LSN the database does not hold
    for scan in kept:
        segment, records = scan.segment, scan.records
        if segment.first_lsn > expected:
            repairs.lost.append((expected, segment.first_lsn - 1))
            log.error(
                "wal records lost lsn=%d..%d: missing before %s and not in the database",
                expected,
                segment.first_lsn - 1,
                segment.path.name,
            )
        expected = max(expected, segment.first_lsn + records)
    repairs.newest = kept[-1] if kept else None
    if not repairs.clean:
        n = repairs.counts()
        log.warning(
            "wal repaired",
            torn_tail=n["torn_tail"],
            corrupt=n["corrupt"],
            quarantined=n["quarantined"],
            lost_records=n["lost_records"],
        )
    return repairs


def _cut(scan: Scan, newest: bool) -> Finding:
    """Copy the bytes after the last valid record aside, then truncate the segment there.

    In the newest segment this is where a crash stopped a write, so the bytes
    stay beside it as `.broken`; in an older one it is damage: quarantine.
    """
    path = scan.segment.path
    torn = scan.stop is not Stop.CORRUPT
    if newest:
        aside = _free_name(path.with_name(path.name + ".broken"))
    else:
        aside = _free_name(_quarantine_dir(path.parent) / f"{path.name}.from-{scan.end}")
    with path.open("rb") as src, os.fdopen(private.open_file(aside, os.O_WRONLY), "wb") as dst:
        src.seek(scan.end)
        shutil.copyfileobj(src, dst)
        dst.flush()
        os.fsync(dst.fileno())
    with path.open("r+b") as f:
        f.truncate(scan.end)
        os.fsync(f.fileno())
    fsync_dir(aside.parent)
    fsync_dir(path.parent)
    finding = Finding(
        path.name,
        Damage.TORN_TAIL if torn else Damage.CORRUPT,
        scan.stop.name.lower(),
        "cut",
        str(aside.relative_to(path.parent)),
        scan.end,
        scan.size - scan.end,
    )
    level = logging.WARNING if torn else logging.ERROR
    log.log(
        level,
        "wal %s",
        "tail repaired" if newest else "corruption cut off",
        segment=finding.segment,
        offset=finding.offset,
        cut_bytes=finding.bytes,
        reason=finding.reason,
        kept=finding.kept,
    )
    return finding


def _quarantine(segment: Segment, kind: Damage, reason: str) -> Finding:
    """Move a whole segment file into quarantine/, out of the log's way."""
    path = segment.path
    target = _free_name(_quarantine_dir(path.parent) / path.name)
    size = path.lstat().st_size
    os.rename(path, target)
    fsync_dir(target.parent)
    fsync_dir(path.parent)
    kept = str(target.relative_to(path.parent))
    log.error("wal segment quarantined", segment=path.name, kind=kind, reason=reason, kept=kept)
    return Finding(path.name, kind, reason, "quarantined", kept, 0, size)


def _quarantine_dir(wal_dir: Path) -> Path:
    path = wal_dir / QUARANTINE_DIR
    return private.make_dirs(path)


def _free_name(path: Path) -> Path:
    """`path`, or `path.1`, `path.2`…: never overwrite what an earlier repair kept."""
    candidate, n = path, 1
    while candidate.exists():
        candidate = path.with_name(f"{path.name}.{n}")
        n += 1
    return candidate


def quarantined(wal_dir: Path) -> list[str]:
    """The files in quarantine/, for `llmsvc check`: each is there until an operator acts."""
    directory = wal_dir / QUARANTINE_DIR
    return sorted(p.name for p in directory.iterdir()) if directory.is_dir() else []

"""The consistency check: is the store what the WAL says it should be?

Run at every boot and by `llmsvc check`. It looks at the schema revision, the
WAL (its valid end, and how far the database checkpoint is behind it),
requests still open, and the token log itself: an attempt whose seqs have
holes, or whose stored row count differs from the count its end record gave,
is reported with its id and the missing seq ranges, never hidden. Each run is
stored in `maintenance_runs`.
"""

from __future__ import annotations

import asyncio
import fcntl
import os
import uuid
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import sqlalchemy as sa
from sqlalchemy.ext.asyncio import AsyncEngine

from llmsvc.errors import WalError
from llmsvc.store.engine import schema_revision
from llmsvc.store.flusher import load_checkpoint
from llmsvc.store.schema import llm_attempts, llm_requests, llm_token_log, maintenance_runs
from llmsvc.wal.codec import Stop
from llmsvc.wal.reader import scan_segment
from llmsvc.wal.segment import INSTANCE_FILE, LOCK_FILE, list_segments

JOB = "check"


@dataclass
class Gap:
    """An attempt whose stored tokens have holes: `missing` is inclusive seq ranges."""

    attempt_id: str
    missing: list[tuple[int, int]]


@dataclass
class CountMismatch:
    attempt_id: str
    recorded: int  # the token count the attempt's end record gave
    stored: int  # rows in llm_token_log


@dataclass
class WalState:
    segments: int = 0
    last_lsn: int = 0
    checkpoint: int = 0
    daemon_running: bool = False
    tail: str = "end"  # how the newest segment ends: end, partial, zeros, corrupt

    @property
    def backlog(self) -> int:
        return max(0, self.last_lsn - self.checkpoint)


@dataclass
class Report:
    schema: tuple[str | None, str]
    wal: WalState | None
    open_requests: int
    gaps: list[Gap] = field(default_factory=list)
    mismatches: list[CountMismatch] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.problems

    def as_dict(self) -> dict[str, Any]:
        found = asdict(self)
        found["ok"] = self.ok
        if self.wal is not None:
            found["wal"]["backlog"] = self.wal.backlog
        return found


async def find_gaps(engine: AsyncEngine) -> list[Gap]:
    """Holes in each attempt's seqs, found by comparing every seq with the one before (LAG)."""
    seq = llm_token_log.c.seq
    ordered = sa.select(
        llm_token_log.c.attempt_id,
        seq,
        sa.func.lag(seq).over(partition_by=llm_token_log.c.attempt_id, order_by=seq).label("prev"),
    ).subquery()
    holes = sa.select(ordered.c.attempt_id, ordered.c.prev, ordered.c.seq).where(
        sa.or_(
            sa.and_(ordered.c.prev.is_(None), ordered.c.seq > 0),
            ordered.c.seq - ordered.c.prev > 1,
        )
    )
    gaps: dict[str, Gap] = {}
    async with engine.connect() as conn:
        for attempt_id, prev, after in await conn.execute(holes):
            start = 0 if prev is None else prev + 1
            gap = gaps.setdefault(str(attempt_id), Gap(str(attempt_id), []))
            gap.missing.append((start, after - 1))
    return list(gaps.values())


async def find_count_mismatches(engine: AsyncEngine) -> list[CountMismatch]:
    """Ended attempts whose stored token rows differ from the count they recorded."""
    stored = sa.func.count(llm_token_log.c.seq)
    query = (
        sa.select(llm_attempts.c.id, llm_attempts.c.token_count, stored)
        .outerjoin(llm_token_log, llm_token_log.c.attempt_id == llm_attempts.c.id)
        .where(llm_attempts.c.token_count.is_not(None))
        .group_by(llm_attempts.c.id, llm_attempts.c.token_count)
        .having(stored != llm_attempts.c.token_count)
    )
    async with engine.connect() as conn:
        rows = await conn.execute(query)
        return [CountMismatch(str(aid), int(recorded), int(n)) for aid, recorded, n in rows]


def wal_state(wal_dir: Path) -> tuple[WalState, uuid.UUID | None]:
    """The WAL's valid end and instance id, read without changing anything.

    A running daemon owns the directory; this only reads it.
    """
    state = WalState(daemon_running=_locked(wal_dir / LOCK_FILE))
    id_file = wal_dir / INSTANCE_FILE
    segments = list_segments(wal_dir) if wal_dir.is_dir() else []
    if not segments or not id_file.exists():
        return state, None
    instance = uuid.UUID(id_file.read_text().strip())
    newest = scan_segment(segments[-1], instance)
    state.segments = len(segments)
    state.last_lsn = segments[-1].first_lsn + newest.records - 1
    state.tail = newest.stop.name.lower() if newest.stop is not Stop.END else "end"
    return state, instance


def _locked(lock_file: Path) -> bool:
    """Whether a daemon holds the WAL directory's lock."""
    try:
        fd = os.open(lock_file, os.O_RDONLY)
    except FileNotFoundError:
        return False
    try:
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
    except BlockingIOError:
        return True
    finally:
        os.close(fd)
    return False


async def run_check(engine: AsyncEngine, wal_dir: Path | None) -> Report:
    current, head = await schema_revision(engine)
    report = Report((current, head), None, 0)
    if current != head:
        report.problems.append(f"schema at {current}, code expects {head}: run `llmsvc migrate`")
        return report
    if wal_dir is not None:
        report.wal = wal = await _wal_with_checkpoint(engine, wal_dir)
        if wal.tail != "end":
            report.problems.append(
                f"the newest WAL segment ends in a {wal.tail} tail; the next boot cuts it off"
            )
        if wal.backlog and not wal.daemon_running:
            report.problems.append(
                f"{wal.backlog} journaled records are not in the database: "
                "start the daemon to replay them"
            )
    async with engine.connect() as conn:
        report.open_requests = int(
            await conn.scalar(
                sa.select(sa.func.count()).where(llm_requests.c.status == "streaming")
            )
            or 0
        )
    report.gaps = await find_gaps(engine)
    report.mismatches = await find_count_mismatches(engine)
    for gap in report.gaps:
        ranges = ", ".join(f"{a}-{b}" if a != b else str(a) for a, b in gap.missing)
        report.problems.append(f"attempt {gap.attempt_id} is missing token seqs {ranges}")
    for m in report.mismatches:
        report.problems.append(
            f"attempt {m.attempt_id} recorded {m.recorded} tokens but {m.stored} are stored"
        )
    return report


async def _wal_with_checkpoint(engine: AsyncEngine, wal_dir: Path) -> WalState:
    try:
        state, instance = await asyncio.to_thread(wal_state, wal_dir)
    except (OSError, ValueError, WalError) as exc:
        raise WalError(f"cannot read the WAL in {wal_dir}: {exc}") from exc
    if instance is not None:
        state.checkpoint = await load_checkpoint(engine, instance)
    return state


async def record_run(
    engine: AsyncEngine,
    report: Report,
    started: datetime,
    instance_id: uuid.UUID | None,
    repaired: dict[str, Any] | None = None,
) -> None:
    """Store a check run: when, what it found, what was repaired."""
    async with engine.begin() as conn:
        await conn.execute(
            sa.insert(maintenance_runs).values(
                job=JOB,
                instance_id=instance_id,
                started_at=started,
                finished_at=datetime.now(UTC),
                status="ok" if report.ok else "problems",
                found=report.as_dict(),
                repaired=repaired or {},
            )
        )


async def history(engine: AsyncEngine, limit: int) -> list[dict[str, Any]]:
    query = (
        sa.select(maintenance_runs)
        .where(maintenance_runs.c.job == JOB)
        .order_by(maintenance_runs.c.id.desc())
        .limit(limit)
    )
    async with engine.connect() as conn:
        return [dict(row._mapping) for row in await conn.execute(query)]

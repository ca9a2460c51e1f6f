"""The consistency check: is the store what the WAL says it should be?

Run at every boot and by `llmsvc check`. It looks at the schema revision, the
WAL (its valid end, and how far the database checkpoint is behind it),
requests still open, and the token log itself: an attempt whose seqs have
holes, or whose stored row count differs from the count its end record gave,
is reported with its id and the missing seq ranges, never hidden.
`check_and_repair` first refills such holes from the WAL segments still on
disk, so only what the WAL no longer holds is reported. Each run is stored in
`maintenance_runs` (job `check` at boot and by hand, `gap-scan` on schedule).
The SQL it runs is the store's (`store.consistency_queries`).
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import multiprocessing
import os
import uuid
from collections.abc import Callable, Iterable, Sequence
from dataclasses import asdict, dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any, TypeVar

from sqlalchemy.ext.asyncio import AsyncEngine

from llmsvc.errors import WalError
from llmsvc.lifetime import die_with
from llmsvc.maintenance.runs import JobResult
from llmsvc.store.batch import Token
from llmsvc.store.consistency_queries import (
    count_mismatches,
    insert_tokens,
    open_requests,
    seq_holes,
)
from llmsvc.store.engine import schema_revision
from llmsvc.store.flusher import load_checkpoint
from llmsvc.store.queries import dead_letters
from llmsvc.wal import (
    QUARANTINE_DIR,
    Damage,
    RecordType,
    Repairs,
    decode_token,
    list_segments,
    lock_holder,
    quarantined,
    read_instance_id,
    scan_log,
    verify_log,
)

Ranges = list[tuple[int, int]]  # inclusive seq ranges


@dataclass
class Gap:
    """An attempt whose stored tokens have holes: `missing` is inclusive seq ranges."""

    attempt_id: str
    missing: Ranges


@dataclass
class CountMismatch:
    attempt_id: str
    recorded: int  # the token count the attempt's end record gave
    stored: int  # rows in llm_token_log
    missing_tail: tuple[int, int] | None = None  # seqs after the last stored one; LAG misses them


@dataclass
class WalState:
    segments: int = 0
    last_lsn: int = 0
    checkpoint: int = 0
    daemon_running: bool = False
    damage: list[str] = field(default_factory=list)  # what `llmsvc wal verify` finds
    quarantined: list[str] = field(default_factory=list)  # files boot repair moved aside

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
    refused: list[dict[str, Any]] = field(default_factory=list)  # unacknowledged dead letters
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
    gaps: dict[str, Gap] = {}
    for attempt_id, prev, after in await seq_holes(engine):
        start = 0 if prev is None else prev + 1
        gap = gaps.setdefault(str(attempt_id), Gap(str(attempt_id), []))
        gap.missing.append((start, after - 1))
    return list(gaps.values())


async def find_count_mismatches(engine: AsyncEngine) -> list[CountMismatch]:
    """Ended attempts whose stored token rows differ from the count they recorded.

    Seqs missing after the last stored one are no hole to LAG; the recorded
    count is what tells them, so they are named here as `missing_tail`.
    """
    mismatches = []
    for aid, recorded, n, last in await count_mismatches(engine):
        tail = (0 if last is None else int(last) + 1, int(recorded) - 1)
        missing_tail = tail if tail[0] <= tail[1] else None
        mismatches.append(CountMismatch(str(aid), int(recorded), int(n), missing_tail))
    return mismatches


def format_ranges(ranges: Iterable[Sequence[int]], sep: str = ", ") -> str:
    """Inclusive seq ranges as an operator reads them: `0, 3-5`."""
    return sep.join(f"{a}-{b}" if a != b else str(a) for a, b in ranges)


def wal_state(wal_dir: Path) -> tuple[WalState, uuid.UUID | None]:
    """The WAL's valid end, its damage and instance id, read without changing anything.

    A running daemon owns the directory and may be writing the newest
    segment, so an unfinished frame at its end is not damage then.
    """
    state = WalState(daemon_running=lock_holder(wal_dir) is not None)
    if not wal_dir.is_dir():
        return state, None
    state.quarantined = quarantined(wal_dir)
    checks = verify_log(wal_dir)
    instance = read_instance_id(wal_dir)
    if not checks or instance is None:
        return state, None
    state.segments = len(checks)
    state.last_lsn = checks[-1].first_lsn + checks[-1].records - 1
    for check in checks:
        writing = state.daemon_running and check is checks[-1]
        expected_tail = check.damage is Damage.TORN_TAIL and check.missing is None
        if check.problem and not (writing and expected_tail):
            state.damage.append(f"WAL segment {check.name}: {check.problem}")
    return state, instance


async def run_check(engine: AsyncEngine, wal_dir: Path | None) -> Report:
    current, head = await schema_revision(engine)
    report = Report((current, head), None, 0)
    if current != head:
        report.problems.append(f"schema at {current}, code expects {head}: run `llmsvc migrate`")
        return report
    if wal_dir is not None:
        report.wal = wal = await _wal_with_checkpoint(engine, wal_dir)
        report.problems.extend(wal.damage)
        if wal.quarantined:
            report.problems.append(
                f"{len(wal.quarantined)} damaged WAL file(s) kept in "
                f"{wal_dir / QUARANTINE_DIR}: {', '.join(wal.quarantined)}; the boot log "
                "says what each was; inspect, then remove them"
            )
        if wal.backlog and not wal.daemon_running:
            report.problems.append(
                f"{wal.backlog} journaled records are not in the database: "
                "start the daemon to replay them"
            )
    report.open_requests = await open_requests(engine)
    report.gaps = await find_gaps(engine)
    report.mismatches = await find_count_mismatches(engine)
    for gap in report.gaps:
        ranges = format_ranges(gap.missing)
        report.problems.append(f"attempt {gap.attempt_id} is missing token seqs {ranges}")
    for m in report.mismatches:
        problem = f"attempt {m.attempt_id} recorded {m.recorded} tokens but {m.stored} are stored"
        if m.missing_tail is not None:
            problem += f"; missing token seqs {format_ranges([m.missing_tail])} at the end"
        report.problems.append(problem)
    report.refused = [
        {k: str(v) if isinstance(v, uuid.UUID | datetime) else v for k, v in letter.items()}
        for letter in await dead_letters(engine)
    ]  # stored in maintenance_runs as JSON
    for letter in report.refused:
        report.problems.append(refusal_problem(letter))
    return report


def refusal_problem(letter: dict[str, Any]) -> str:
    """A record the database refused, in words: what it was, what became of it, why."""
    owner = (
        f"request {letter['request_id']}"
        if letter["request_id"]
        else f"attempt {letter['attempt_id']}"
        if letter["attempt_id"]
        else "an unknown request"
    )
    fate = (
        "stored with the values it refused dropped or replaced"
        if letter["outcome"] == "sanitised"
        else "not stored in the tables"
    )
    return (
        f"the database refused WAL record {letter['lsn']} ({letter['record_type']} of {owner}; "
        f"{letter['reason']}): {fate}; the record is kept whole in llm_dead_letters "
        "(`llmsvc check --acknowledge` once seen)"
    )


async def check_and_repair(
    engine: AsyncEngine, wal_dir: Path | None, wal_repairs: Repairs | None = None
) -> tuple[Report, dict[str, Any]]:
    """Check, refill from the WAL every token hole it still holds, then check again.

    The one entry point of boot and `llmsvc check`, so both repair alike. The
    report names only what could not be refilled; the dict is what was (for
    `record_run`): `{"refilled": [{"attempt_id", "seqs": [[a, b], …], "rows"}]}`,
    and at boot `"wal"`: what repairing the log at open did. Records that
    repair found lost stay a problem of this run.
    """
    repaired: dict[str, Any] = {}
    report = await run_check(engine, wal_dir)
    missing = missing_seqs(report)
    tokens = []
    if missing and wal_dir is not None:
        tokens = await asyncio.to_thread(read_missing_tokens, wal_dir, missing)
    if tokens:
        inserted = await insert_tokens(engine, tokens)
        seqs: dict[str, list[int]] = {}
        for aid, seq, _text, _us in tokens:
            seqs.setdefault(str(uuid.UUID(bytes=aid)), []).append(seq)
        repaired["refilled"] = [
            {"attempt_id": aid, "seqs": _as_ranges(found), "rows": inserted.get(aid, 0)}
            for aid, found in seqs.items()
        ]
        report = await run_check(engine, wal_dir)
    if wal_repairs is not None and not wal_repairs.clean:
        repaired["wal"] = wal_repairs.as_dict()
        for first, last in wal_repairs.lost:
            report.problems.append(
                f"WAL records {first}..{last} were lost to damage before reaching the database"
            )
    return report, repaired


def missing_seqs(report: Report) -> dict[str, Ranges]:
    """Every token hole the report names, by attempt: gaps, and tails only a count reveals."""
    missing = {gap.attempt_id: list(gap.missing) for gap in report.gaps}
    for m in report.mismatches:
        if m.missing_tail is not None:
            missing.setdefault(m.attempt_id, []).append(m.missing_tail)
    return missing


def read_missing_tokens(wal_dir: Path, missing: dict[str, Ranges]) -> list[Token]:
    """The journaled tokens inside `missing`, from every segment still on disk, by (attempt, seq).

    Blocking reads: run it in a worker thread. A segment that cannot be read
    is skipped, so its tokens stay reported as missing rather than guessed at.
    """
    wanted = {uuid.UUID(aid).bytes: ranges for aid, ranges in missing.items()}
    found: dict[tuple[bytes, int], Token] = {}

    def keep(records: list[tuple[int, bytes]]) -> None:
        for rtype, payload in records:
            # A token record starts with its attempt id: test that before decoding the text.
            if rtype != RecordType.TOKEN or payload[:16] not in wanted:
                continue
            token = decode_token(payload)
            aid, seq = token[0], token[1]
            if any(a <= seq <= b for a, b in wanted[aid]):
                found.setdefault((aid, seq), token)

    scan_log(wal_dir, keep)
    return [found[key] for key in sorted(found)]


def _as_ranges(seqs: list[int]) -> list[list[int]]:
    """Sorted seqs as inclusive [start, end] ranges, in the form JSON gives back."""
    ranges: list[list[int]] = []
    for seq in seqs:
        if ranges and ranges[-1][1] == seq - 1:
            ranges[-1][1] = seq
        else:
            ranges.append([seq, seq])
    return ranges


T = TypeVar("T")
# Below this a scan holds the GIL for milliseconds: a thread is cheaper than a child's start.
CHILD_SCAN_BYTES = 16 * 1024 * 1024


def _log_bytes(wal_dir: Path) -> int:
    """The segments' size; one removed meanwhile by housekeeping counts as empty."""
    total = 0
    for segment in list_segments(wal_dir) if wal_dir.is_dir() else []:
        with contextlib.suppress(FileNotFoundError):
            total += segment.path.stat().st_size
    return total


async def in_child_process(fn: Callable[..., T], *args: Any) -> T:
    """Run a whole-WAL scan in a child process of its own.

    Decoding every record is pure Python: in a thread it holds the GIL the
    event loop needs, and each scheduled gap scan stalled streams for up to
    0.85 s (the soak's p99 time to first token). A child costs a start-up
    once per scan and takes none of the loop's time.
    """
    context = multiprocessing.get_context("spawn")  # no fork of a threaded process
    pool = concurrent.futures.ProcessPoolExecutor(
        1, mp_context=context, initializer=die_with, initargs=(os.getpid(),)
    )
    try:
        return await asyncio.get_running_loop().run_in_executor(pool, fn, *args)
    finally:
        pool.shutdown(wait=False)  # the executor reaps the child; the loop does not wait


async def _wal_with_checkpoint(engine: AsyncEngine, wal_dir: Path) -> WalState:
    try:
        scan = in_child_process if _log_bytes(wal_dir) > CHILD_SCAN_BYTES else asyncio.to_thread
        state, instance = await scan(wal_state, wal_dir)
    except (OSError, ValueError, WalError) as exc:
        raise WalError(f"cannot read the WAL in {wal_dir}: {exc}") from exc
    if instance is not None:
        state.checkpoint = await load_checkpoint(engine, instance)
    return state


def as_result(report: Report, repaired: dict[str, Any]) -> JobResult:
    """A check as a maintenance run: what it found, and the token rows it refilled."""
    rows = sum(int(r["rows"]) for r in repaired.get("refilled", []))
    status = "ok" if report.ok else "problems"
    return JobResult(status, rows=rows, found=report.as_dict(), repaired=repaired)


async def gap_scan(engine: AsyncEngine, wal_dir: Path | None) -> JobResult:
    """The scheduled check: refill what the WAL still holds, report the rest."""
    return as_result(*await check_and_repair(engine, wal_dir))

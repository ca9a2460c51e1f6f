"""The flusher: tails the WAL from the checkpoint into the SQL store.

One code path for recovery and steady state: at boot it catches up from the
checkpoint stored in the database; afterwards it follows the writer. Each
batch is one transaction that also moves this instance's checkpoint, so rows
and checkpoint never disagree, and replaying a batch changes nothing (every
insert ignores rows that exist). While the database is down the batch waits in
memory and everything after it waits in the WAL, on disk.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import math
import time
import uuid
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import sqlalchemy as sa
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine

from llmsvc.config import FlushPolicy
from llmsvc.local import write_checkpoint
from llmsvc.logs import logger
from llmsvc.store.batch import (
    ATTEMPT_END_COLUMNS,
    REQUEST_END_COLUMNS,
    Batch,
    Row,
    build_batch,
    driver_values,
)
from llmsvc.store.engine import describe_error
from llmsvc.store.flush_process import ChildConfig, FlushFailed, FlushProcess, FlushProcessGone
from llmsvc.store.refusals import Undecodable, dead_letter_row, fit_batch, refused
from llmsvc.store.schema import (
    llm_attempts,
    llm_dead_letters,
    llm_requests,
    llm_tool_calls,
    wal_checkpoints,
)
from llmsvc.wal import HEADER_SIZE, Position, WalReader, list_segments

log = logger(__name__)

RESTART_SECONDS = 5.0  # between starts of a flush process that ended
# A flush that stored BUSY_RECORDS or more and kept up found the daemon busy, and the
# flusher rests BUSY_REST intervals, not one: each commit rewrites a page of the token index
# per open stream, so a longer rest stores more rows per page rewritten (docs/DECISIONS.md,
# "The store's writes per token"). A reader that needs what was journaled hurries it anyway.
BUSY_RECORDS, BUSY_REST = 500, 4


def _insert(dialect: str, table: sa.Table) -> Any:
    """The dialect's INSERT, which has ON CONFLICT (SQLAlchemy's generic one does not)."""
    return (postgresql if dialect == "postgresql" else sqlite).insert(table)


@functools.cache
def _ignoring(dialect: str, table: sa.Table) -> Any:
    """INSERT … ON CONFLICT DO NOTHING into `table`, built once per dialect: building it
    (and its cache key) each time took more CPU than a small batch's rows."""
    return _insert(dialect, table).on_conflict_do_nothing()


# The columns an end record fills, by table; a request's end keeps an error already there
# (a stand-in's) when it brings none.
END_COLUMNS = {"llm_attempts": ATTEMPT_END_COLUMNS, "llm_requests": REQUEST_END_COLUMNS}
KEPT_IF_NONE = {"llm_requests": "error"}


_SQLITE_TOKENS = (
    "INSERT OR IGNORE INTO llm_token_log (attempt_id, seq, text, created_at) VALUES (?, ?, ?, ?)"
)
_POSTGRES_STAGE = """
CREATE TEMP TABLE IF NOT EXISTS llmsvc_token_stage
    (attempt_id uuid, seq int4, text text, us int8) ON COMMIT DELETE ROWS
"""
_POSTGRES_TOKENS = """
INSERT INTO llm_token_log (attempt_id, seq, text, created_at)
SELECT attempt_id, seq, text, timestamptz 'epoch' + us * interval '1 microsecond'
FROM llmsvc_token_stage
ON CONFLICT DO NOTHING
"""


async def _tokens_sqlite(conn: AsyncConnection, rows: list[Row]) -> None:
    await _executemany(conn, _SQLITE_TOKENS, rows)


async def _executemany(conn: AsyncConnection, statement: str, rows: list[Row]) -> None:
    """One executemany on the driver's connection, in the transaction `conn` has begun."""
    raw = await conn.get_raw_connection()
    await raw.driver_connection.executemany(statement, rows)  # type: ignore[union-attr]


async def _tokens_postgres(conn: AsyncConnection, rows: list[Row]) -> None:
    """COPY into a staging table, then one idempotent INSERT … SELECT.

    Measured by benchmarks/bench_pg_bulk.py: 1.3x an unnest() insert and 1.9x
    executemany at 50,000 rows.
    """
    raw = (await conn.get_raw_connection()).driver_connection
    await raw.execute(_POSTGRES_STAGE)  # type: ignore[union-attr]
    await raw.copy_records_to_table("llmsvc_token_stage", records=rows)  # type: ignore[union-attr]
    await raw.execute(_POSTGRES_TOKENS)  # type: ignore[union-attr]


TOKEN_WRITERS: dict[str, Callable[[AsyncConnection, list[Row]], Awaitable[None]]] = {
    "sqlite": _tokens_sqlite,
    "postgresql": _tokens_postgres,
}


async def write_batch(
    engine: AsyncEngine,
    batch: Batch,
    instance_id: uuid.UUID,
    dead_letters: list[dict[str, Any]] | None = None,
) -> None:
    """Write a batch (and records the database refused, kept whole) and move the checkpoint,
    all in one transaction."""
    async with engine.begin() as conn:
        # The checkpoint goes first: it also opens the driver-level transaction
        # that the raw token insert below joins.
        dialect = conn.dialect.name
        await conn.execute(
            _upsert_checkpoint(dialect),
            {"instance_id": instance_id, "lsn": batch.last_lsn, "updated_at": datetime.now(UTC)},
        )
        if batch.requests:
            await _insert_rows(conn, llm_requests, list(batch.requests.values()))
        if batch.stand_ins:
            await _insert_stand_ins(conn, batch)
        if batch.attempts:
            await _insert_rows(conn, llm_attempts, list(batch.attempts.values()))
        if batch.token_rows:
            await TOKEN_WRITERS[dialect](conn, batch.token_rows)
        if batch.tool_rows:  # rare: tool calls, a statement of their own
            await conn.execute(_ignoring(dialect, llm_tool_calls), batch.tool_rows)
        if batch.attempt_ends:
            await _update_ends(conn, llm_attempts, batch.attempt_ends)
        if batch.request_ends:
            await _update_ends(conn, llm_requests, batch.request_ends)
        if dead_letters:
            await conn.execute(_ignoring(dialect, llm_dead_letters), dead_letters)


async def _insert_rows(conn: AsyncConnection, table: sa.Table, rows: list[dict[str, Any]]) -> None:
    """INSERT … ON CONFLICT DO NOTHING: a row replayed from the WAL is stored once. Through the
    driver, the values formed as SQLAlchemy would bind them (its binding cost a whole
    request's flush more than its four inserts did)."""
    dialect, names = conn.dialect.name, tuple(rows[0])
    values = driver_values(dialect, table, names, rows)
    await _executemany(conn, _insert_sql(dialect, table.name, names), values)


async def _update_ends(conn: AsyncConnection, table: sa.Table, rows: list[dict[str, Any]]) -> None:
    """Fill the END_COLUMNS of the rows whose ids are the `key`s: the ends of starts flushed
    before; through the driver, as `_insert_rows`."""
    dialect, names = conn.dialect.name, (*END_COLUMNS[table.name], "key")
    values = driver_values(dialect, table, names, rows)
    await _executemany(conn, _update_sql(dialect, table.name), values)


def _marks(dialect: str, count: int) -> list[str]:
    """The driver's placeholders: sqlite3's `?`, asyncpg's `$1` on."""
    return ["?"] * count if dialect == "sqlite" else [f"${n}" for n in range(1, count + 1)]


@functools.cache
def _insert_sql(dialect: str, table: str, names: tuple[str, ...]) -> str:
    columns, marks = ", ".join(f'"{n}"' for n in names), ", ".join(_marks(dialect, len(names)))
    return f'INSERT INTO "{table}" ({columns}) VALUES ({marks}) ON CONFLICT DO NOTHING'


@functools.cache
def _update_sql(dialect: str, table: str) -> str:
    """UPDATE … SET each end column WHERE "id" = the key, the last value of a row."""
    kept = KEPT_IF_NONE.get(table)
    columns = END_COLUMNS[table]
    *marks, key = _marks(dialect, len(columns) + 1)
    sets = ", ".join(
        f'"{n}" = coalesce({m}, "{n}")' if n == kept else f'"{n}" = {m}'
        for n, m in zip(columns, marks, strict=True)
    )
    return f'UPDATE "{table}" SET {sets} WHERE "id" = {key}'


async def _insert_stand_ins(conn: AsyncConnection, batch: Batch) -> None:
    """Insert a stand-in for each request that has no row; log the ones that were needed."""
    stmt = _insert(conn.dialect.name, llm_requests).values(list(batch.stand_ins.values()))
    inserted = await conn.execute(stmt.on_conflict_do_nothing().returning(llm_requests.c.id))
    for (request_id,) in inserted:
        log.error(
            "flush: request start record lost, stand-in row stored for its attempt",
            request=request_id,
        )


@functools.cache
def _upsert_checkpoint(dialect: str) -> Any:
    stmt = _insert(dialect, wal_checkpoints)
    return stmt.on_conflict_do_update(
        index_elements=["instance_id"],
        set_={"lsn": stmt.excluded.lsn, "updated_at": stmt.excluded.updated_at},
    )


async def load_checkpoint(engine: AsyncEngine, instance_id: uuid.UUID) -> int:
    async with engine.connect() as conn:
        lsn = await conn.scalar(
            sa.select(wal_checkpoints.c.lsn).where(wal_checkpoints.c.instance_id == instance_id)
        )
    return int(lsn or 0)


@dataclass(slots=True)
class Pending:
    """Records read but not yet committed: LSNs `first_lsn..last_lsn` (the records may end
    before `last_lsn` when repair found the LSNs after them lost)."""

    records: list[tuple[int, bytes]]
    first_lsn: int
    last_lsn: int
    batch: Batch | None = None  # their rows, once built
    count: int = field(init=False)

    def __post_init__(self) -> None:
        self.count = len(self.records)


class Flusher:
    """Moves journaled records into the store, batch by batch, surviving database outages."""

    def __init__(
        self,
        engine: AsyncEngine,
        wal_dir: Path,
        instance_id: uuid.UUID,
        end: Callable[[], Position],
        policy: FlushPolicy,
        *,
        on_batch: Callable[[int, float], None] | None = None,
        process: ChildConfig | None = None,
    ) -> None:
        self.engine = engine
        self.wal_dir = wal_dir
        self.instance_id = instance_id
        self.reader = WalReader(wal_dir, instance_id)
        self.end = end
        self.interval = policy.interval
        self.batch_records = policy.batch_records
        self.checkpoint = 0
        self.committed = Position(0, 0, 1)  # where the first uncommitted record starts
        self.database_ok = True
        self._pending: Pending | None = None
        self._pending_end = self.committed
        self._sealed: tuple[int, dict[int, int]] = (0, {})  # (below, {segment: size})
        self._stop = asyncio.Event()
        self._wake = asyncio.Event()  # ends the interval's wait: `hurry` or `stop`
        # `run` writes its batches in a flush process started with this, when given.
        self.process_config = process
        self.process: FlushProcess | None = None
        self._start_process_at = 0.0  # monotonic time: not before it, after one ended
        self.timeout = policy.timeout
        # Since when (monotonic) the database has not answered: the start of the flush under
        # way, or of the first of the flushes that timed out since it last answered.
        self.waiting_since: float | None = None
        self._hinted = (0, 0.0)  # (lsn, monotonic time) of the last local checkpoint copy
        self.on_batch = on_batch  # told each committed batch's records and seconds (metrics)
        self.errors = 0  # failed batch writes (metrics)
        self.last_flush: float | None = None  # wall time of the last commit
        self.last_check: float | None = None  # wall time the database last answered or failed
        self.last_error: str | None = None  # why the database refused, while it does
        self.caught_up_at: float | None = time.time()  # wall time the backlog was last empty
        self.refused = {"sanitised": 0, "set_aside": 0}  # records the database refused
        self.last_refusal: str | None = None  # the last one, in words

    async def start(self, checkpoint: int | None = None) -> None:
        """Resume after `checkpoint`, by default the one the database holds for this instance."""
        if checkpoint is None:
            checkpoint = await load_checkpoint(self.engine, self.instance_id)
        self.checkpoint = checkpoint
        await self.reader.seek(self.checkpoint + 1)
        self.committed = self.reader.position

    @property
    def caught_up(self) -> bool:
        return self._pending is None and self.checkpoint >= self.end().lsn - 1

    async def flush_once(self) -> int:
        """Write the next batch (or retry the one that failed); return records committed.

        A batch the database refuses for what a record holds is split until
        that record is found (`_isolate`); a batch that fails for any other
        reason (the database is away) is retried whole, and raises here.
        The flush process, while there is one, writes batches no record of
        which was refused; the rest are written here.
        """
        if self.caught_up:  # nothing journaled past the checkpoint: no read, no round trip
            return 0
        started = time.perf_counter()
        if self._pending is None and self.process is not None and self.process.ready:
            n = await self._flush_by_process(self.process, started)
            if n is not None:
                return n
        if self._pending is None:
            if self.reader.position != self.committed:  # a read cut off, or the process's
                await self.reader.resume(self.committed)
            records = await self.reader.read(self.end(), self.batch_records)
            last_lsn = self.reader.position.lsn - 1
            if not records and last_lsn <= self.checkpoint:
                return 0
            # With no records the reader skipped LSNs that repair found lost: the
            # checkpoint moves past them, or the flusher would wait for them forever.
            self._pending = Pending(records, last_lsn - len(records) + 1, last_lsn)
            self._pending_end = self.reader.position
        pending = self._pending
        try:
            if pending.batch is None:  # built once: an outage retries the same rows
                pending.batch = await self._build(pending.records, pending.last_lsn)
            await self._commit(pending.batch)
        except Exception as exc:
            if not refused(exc):
                self._failed(exc)
                raise
            await self._isolate(pending, exc)
        self._pending = None
        return self._committed(pending.count, self._pending_end, started)

    def _committed(self, count: int, end: Position, started: float) -> int:
        """A batch of `count` records, up to `end`, committed with the checkpoint."""
        if self.on_batch is not None:
            self.on_batch(count, time.perf_counter() - started)
        self.committed = end
        self.last_flush, self.last_error = time.time(), None
        if self.checkpoint >= self.end().lsn - 1:
            self.caught_up_at = self.last_flush
        return count

    async def _flush_by_process(self, process: FlushProcess, started: float) -> int | None:
        """The next batch, written by the flush process; None when this one is for the
        daemon to write: a record of it was refused, or the process has ended."""
        try:
            reply = await process.flush(
                self.committed, self.end(), self.batch_records, self.checkpoint
            )
        except FlushProcessGone:  # `_keep_process` replaces it
            return None
        except FlushFailed as exc:
            self.last_check = time.time()
            self._failed(exc)
            raise
        if "refused" in reply:
            return None
        if "last_lsn" not in reply:
            return 0
        self.last_check = time.time()
        self.checkpoint = reply["last_lsn"]
        return self._committed(reply["records"], Position(*reply["end"]), started)

    def writing_process(self) -> int | None:
        """The pid of the flush process if it is the one writing batches now."""
        process = self.process
        return process.pid if process is not None and process.ready and process.alive else None

    async def _keep_process(self) -> None:
        """Start the flush process if it is wanted and not running; replace one that ended
        (not at once: one that cannot run would be started in a loop)."""
        config = self.process_config
        if config is None:
            return
        if self.process is not None:
            if self.process.alive:
                return
            log.error(
                "flush: the flush process ended, flushing in the daemon",
                pid=self.process.pid,
                code=self.process.proc.returncode,
            )
            await self._stop_process(RESTART_SECONDS)
        if time.monotonic() < self._start_process_at:
            return
        try:
            self.process = await FlushProcess.start(config)
        except OSError as exc:
            log.error("flush: the flush process did not start, flushing in the daemon", error=exc)
            self._start_process_at = time.monotonic() + RESTART_SECONDS

    async def _stop_process(self, restart_after: float = 0.0) -> None:
        process, self.process = self.process, None
        self._start_process_at = time.monotonic() + restart_after
        if process is not None:
            await process.close()

    async def _build(self, records: list[tuple[int, bytes]], last_lsn: int) -> Batch:
        """Rows from records: CPU work, on a worker thread. Whatever fails here fails for what
        the records hold, so it counts as a refusal (retrying would fail the same way)."""
        dialect = self.engine.dialect.name
        try:
            return await asyncio.to_thread(
                build_batch, records, last_lsn, self.instance_id, dialect
            )
        except Exception as exc:
            raise Undecodable(f"{type(exc).__name__}: {exc}") from exc

    async def _commit(self, batch: Batch, dead_letters: list[dict[str, Any]] | None = None) -> None:
        """One transaction that stores the batch and moves the checkpoint to its last LSN."""
        try:
            await write_batch(self.engine, batch, self.instance_id, dead_letters)
        finally:
            self.last_check = time.time()
        self.checkpoint = batch.last_lsn

    async def _write(
        self,
        records: list[tuple[int, bytes]],
        last_lsn: int,
        fit: bool = False,
        dead_letters: list[dict[str, Any]] | None = None,
    ) -> None:
        batch = await self._build(records, last_lsn)
        await self._commit(fit_batch(batch) if fit else batch, dead_letters)

    async def _isolate(self, pending: Pending, exc: Exception) -> None:
        """Split a refused batch until each refused record is found and kept aside; store the rest.

        Halves are written in LSN order, each in its own transaction with the
        checkpoint, so what is stored stays a prefix of the log. A refused
        record alone is stored fitted to its columns (and kept whole in
        `llm_dead_letters` as `sanitised`), or failing that only kept there
        (`set_aside`). An outage meanwhile raises; the rest of the batch waits.
        """
        log.warning(
            "flush: the database refused a batch, looking for the records it refuses",
            records=pending.count,
            lsn=f"{pending.first_lsn}..{pending.last_lsn}",
            error=describe_error(exc),
        )
        if not pending.records:  # only the checkpoint moves: nothing in it to refuse
            raise exc
        spans: list[tuple[int, int, Exception | None]] = [(0, len(pending.records), exc)]
        while spans:  # a stack of [lo, hi) spans, the lowest on top; `why` when it was refused
            lo, hi, why = spans.pop()
            if why is not None and hi - lo > 1:
                mid = (lo + hi) // 2
                spans += [(mid, hi, None), (lo, mid, None)]
                continue
            first = pending.first_lsn + lo
            last = first + (hi - lo) - 1 if hi < len(pending.records) else pending.last_lsn
            try:
                if why is None:
                    await self._write(pending.records[lo:hi], last)
                else:
                    await self._keep_aside(pending.records[lo], first, last, why)
            except BaseException as failed:  # a cancel (a flush's bound) too: keep what is done
                if why is None and isinstance(failed, Exception) and refused(failed):
                    spans.append((lo, hi, failed))
                    continue
                if isinstance(failed, Exception):
                    self._failed(failed)
                del pending.records[:lo]  # stored already: a retry starts after them
                pending.first_lsn, pending.batch = first, None
                raise

    async def _keep_aside(
        self, record: tuple[int, bytes], lsn: int, last_lsn: int, why: Exception
    ) -> None:
        """Store a refused record fitted to its columns, or else only as a dead letter."""
        rtype, payload = record
        reason = describe_error(why)
        row = dead_letter_row(self.instance_id, lsn, rtype, payload, "sanitised", reason)
        try:
            await self._write([record], last_lsn, fit=True, dead_letters=[row])
        except Exception as exc:
            if not refused(exc):
                raise
            row["outcome"] = "set_aside"
            await self._write([], last_lsn, dead_letters=[row])
        self.refused[row["outcome"]] += 1
        log.error(
            "flush: record refused by the database, %s",
            "stored sanitised" if row["outcome"] == "sanitised" else "set aside",
            lsn=lsn,
            type=row["record_type"],
            request=row["request_id"] or row["attempt_id"],
            reason=reason,
        )
        self.last_refusal = f"lsn {lsn} ({row['record_type']}): {reason}"

    def _failed(self, exc: BaseException) -> None:
        self.last_error, self.errors = _describe(exc), self.errors + 1

    def backlog_bytes(self) -> int:
        """WAL record bytes journaled but not committed: what a long outage piles up.

        Positions give it without reading the log; only the sizes of sealed
        segments between them come from the directory, listed again only when
        the writer has moved to a new segment. Safe on any thread: it reads
        values the event loop replaces whole, and a snapshot taken between two
        updates is clamped at 0.
        """
        start, end = self.committed, self.end()
        if end.lsn <= start.lsn:
            return 0
        if start.segment == end.segment:
            return max(0, end.offset - start.offset)
        total = end.offset - HEADER_SIZE
        for first_lsn, size in self._sealed_sizes(end.segment).items():
            if first_lsn == start.segment:
                total += max(0, size - start.offset)
            elif first_lsn >= start.lsn:  # not below the checkpoint (a log repaired at boot)
                total += size - HEADER_SIZE
        return max(0, total)

    def _sealed_sizes(self, below: int) -> dict[int, int]:
        """Sizes of the segments before the live one (which starts at LSN `below`)."""
        cached_below, sizes = self._sealed
        if cached_below != below:
            sizes = {}
            for segment in list_segments(self.wal_dir):
                if segment.first_lsn < below:
                    with contextlib.suppress(FileNotFoundError):  # removed meanwhile: flushed
                        sizes[segment.first_lsn] = segment.path.stat().st_size
            self._sealed = (below, sizes)
        return sizes

    async def run(self) -> None:
        """Flush until stopped; on failure log once per outage and retry with backoff."""
        backoff = self.interval
        try:
            while not self._stop.is_set():
                await self._keep_process()
                was_ok = self.database_ok
                try:
                    n = await self._flush(self.timeout)
                except Exception:
                    if was_ok:
                        log.error("flush failed, records wait in the WAL", error=self.last_error)
                    backoff = min(backoff * 2, 5.0)
                    await self._sleep(backoff)
                    continue
                if not was_ok:
                    log.info("flush recovered", checkpoint=self.checkpoint)
                    backoff = self.interval
                if n < self.batch_records:
                    await self._idle(BUSY_REST if self._kept_up_busy(n) else 1)
        finally:
            await self._stop_process()

    async def drain(self, within: float) -> bool:
        """Flush until every journaled record is committed or `within` seconds pass.

        A call the database does not answer is given up at the deadline too.
        """
        deadline = time.monotonic() + within
        failing = False
        while not self.caught_up and (left := deadline - time.monotonic()) > 0:
            bound = left if self.timeout is None else min(self.timeout, left)
            try:
                if not await self._flush(None if math.isinf(bound) else bound):
                    await asyncio.sleep(0.01)
                failing = False
            except Exception:
                if not failing:
                    log.warning("drain: flush failed, retrying", error=self.last_error)
                failing = True
                await asyncio.sleep(min(1.0, max(0.0, deadline - time.monotonic())))
        self._keep_checkpoint(at_once=True)
        return self.caught_up

    async def _flush(self, bound: float | None) -> int:
        """`flush_once` given up after `bound` seconds; `waiting_since` shows a stall meanwhile."""
        if self.waiting_since is None:
            self.waiting_since = time.monotonic()
        try:
            async with asyncio.timeout(bound) as scope:
                n = await self.flush_once()
        except BaseException as exc:
            if not isinstance(exc, Exception):
                raise
            if scope.expired():
                self.errors += 1  # flush_once counts the failures it sees itself
                self.last_error = f"no answer within {bound:.0f} s"
            else:
                self.last_error = _describe(exc)
            if not isinstance(exc, TimeoutError):  # it answered, with an error
                self.waiting_since = None
            self.database_ok = False
            raise
        self.waiting_since = None
        self.database_ok = True
        self._keep_checkpoint()
        return n

    def _keep_checkpoint(self, at_once: bool = False) -> None:
        """Copy the committed checkpoint beside the WAL, at most once a second (a boot's hint)."""
        lsn, when = self._hinted
        now = time.monotonic()
        if self.checkpoint != lsn and (at_once or now - when >= 1.0):
            write_checkpoint(self.wal_dir, self.checkpoint)
            self._hinted = (self.checkpoint, now)

    def hurry(self) -> None:
        """Flush now, not after the interval: a request waits to read what was journaled."""
        self._wake.set()

    def stop(self) -> None:
        self._stop.set()
        self._wake.set()

    async def close(self) -> None:
        await self.reader.close()

    async def _sleep(self, seconds: float) -> None:
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._stop.wait(), seconds)

    def _kept_up_busy(self, n: int) -> bool:
        """A flush of `n` records was a busy one that kept up: BUSY_RECORDS or more, and less
        than half as many journaled meanwhile. Not a backlog being worked off (a read takes
        a MiB of the log at most), which a longer rest would only make longer."""
        return n >= BUSY_RECORDS and self.end().lsn - 1 - self.checkpoint < n // 2

    async def _idle(self, intervals: int) -> None:
        """The rest after a flush that found less than a batch, or until `hurry`."""
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._wake.wait(), self.interval * intervals)
        self._wake.clear()


def _describe(exc: BaseException) -> str:
    """A failure in a line: the flush process's is described there already."""
    return str(exc) if isinstance(exc, FlushFailed) else describe_error(exc)

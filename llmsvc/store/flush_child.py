"""The flush process's side: reads a batch from the WAL, builds its rows and writes them.

Run by `flush_process.FlushProcess` as `python -m llmsvc.store.flush_child`.
It decides nothing: the daemon's flusher says where each batch starts, where
the log ends and how many records it may take, and keeps every decision
about what an answer means. This side only does the batch's CPU work, so that
it runs beside the serving process and not on its GIL, at a priority that
yields to it (`flush_priority.py`). It reads one JSON line per request on
stdin and answers with one on stdout; its log goes to the daemon's stderr.
"""

from __future__ import annotations

import asyncio
import os
import signal
import sys
import uuid
from dataclasses import astuple, dataclass
from pathlib import Path
from typing import Any

import orjson
import uvloop
from sqlalchemy.ext.asyncio import AsyncEngine

from llmsvc import logs
from llmsvc.lifetime import die_with_parent
from llmsvc.store.batch import Batch, build_batch
from llmsvc.store.engine import DAEMON_APPLICATION, create_engine, describe_error
from llmsvc.store.flush_priority import can_yield, set_policy
from llmsvc.store.flusher import write_batch
from llmsvc.store.refusals import refused
from llmsvc.wal import Position, WalReader


@dataclass(slots=True)
class Read:
    """A batch read and not yet committed: retried as it is while the database is away."""

    start: Position
    records: list[tuple[int, bytes]]
    last_lsn: int
    end: Position  # where the record after the batch starts
    batch: Batch | None = None


class BatchWriter:
    """Writes the batch each request names, one transaction each, as the flusher would."""

    def __init__(self, engine: AsyncEngine, wal_dir: Path, instance_id: uuid.UUID) -> None:
        self.engine = engine
        self.instance_id = instance_id
        self.reader = WalReader(wal_dir, instance_id)
        self.read: Read | None = None

    async def flush(self, request: dict[str, Any]) -> dict[str, Any]:
        """Answer `{"records": n, "last_lsn", "end"}`, or `refused` / `failed` with the cause."""
        start = Position(*request["start"])
        try:
            read = self.read if self.read is not None and self.read.start == start else None
            read = read or await self._read(start, request)
        except Exception as exc:  # the log cannot be read: the flusher retries, as its own read
            return {"failed": describe_error(exc), "timed_out": False}
        self.read = read
        if read is None:
            return {"records": 0}
        try:
            if read.batch is None:
                dialect = self.engine.dialect.name
                read.batch = build_batch(read.records, read.last_lsn, self.instance_id, dialect)
            await write_batch(self.engine, read.batch, self.instance_id)
        except Exception as exc:
            if read.batch is None or refused(exc):  # the daemon's flusher finds the records
                self.read = None
                return {"refused": describe_error(exc)}
            return {"failed": describe_error(exc), "timed_out": isinstance(exc, TimeoutError)}
        self.read = None
        return {"records": len(read.records), "last_lsn": read.last_lsn, "end": astuple(read.end)}

    async def _read(self, start: Position, request: dict[str, Any]) -> Read | None:
        """The batch from `start`; None when there is nothing to commit, not even a
        checkpoint moved past LSNs repair found lost."""
        if self.reader.position != start:
            await self.reader.resume(start)
        records = await self.reader.read(Position(*request["end"]), request["max_records"])
        last_lsn = self.reader.position.lsn - 1
        if not records and last_lsn <= request["checkpoint"]:
            return None
        return Read(start, records, last_lsn, self.reader.position)


async def serve() -> None:
    """Read the configuration line, say it is ready, then answer requests until stdin closes."""
    loop = asyncio.get_running_loop()
    stdin = asyncio.StreamReader(limit=1024 * 1024)
    await loop.connect_read_pipe(lambda: asyncio.StreamReaderProtocol(stdin), sys.stdin)
    line = await stdin.readline()
    if not line:  # the daemon is gone already
        return
    config = orjson.loads(line)
    if os.getppid() != config["daemon_pid"]:  # it died before `main` tied this one to it
        return
    logs.configure(config["log_level"], config["log_json"], config["secrets"], config["process"])
    engine = create_engine(
        config["database_url"], DAEMON_APPLICATION, config["timeout"], True, access="write"
    )
    writer = BatchWriter(engine, Path(config["wal_dir"]), uuid.UUID(config["instance"]))
    yields = can_yield()
    try:
        if not _answer({"ready": True, "yields": yields}):
            return
        while line := await stdin.readline():
            if yields and os.sched_getscheduler(0) != os.SCHED_IDLE:  # at start, or raised
                set_policy(os.getpid(), os.SCHED_IDLE)
            if not _answer(await writer.flush(orjson.loads(line))):
                return
    finally:
        await writer.reader.close()
        await engine.dispose()


def _answer(reply: dict[str, Any]) -> bool:
    """Write one line to the daemon; False when it has closed its end. A daemon on its way
    out closes it before its death kills this process: no traceback for that."""
    try:
        os.write(sys.stdout.fileno(), orjson.dumps(reply) + b"\n")
    except BrokenPipeError:
        return False
    return True


def main() -> None:
    # Killed with the daemon: a batch it was writing is one transaction, rolled back.
    die_with_parent(signal.SIGKILL)
    # A terminal's Ctrl-C is the daemon's to handle. A process group, not a session of its
    # own: a new session is a new scheduler autogroup, which competes with the daemon's as
    # an equal whatever this process's policy is.
    os.setpgid(0, 0)
    uvloop.run(serve())


if __name__ == "__main__":
    main()

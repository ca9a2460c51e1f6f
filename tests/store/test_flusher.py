"""The flusher end to end: real WAL segments in, rows and the checkpoint out, on both backends.

Records are journaled with the gateway's own `Journal` over a real `WalWriter`, so
the flusher reads exactly what the daemon would write.
"""

from __future__ import annotations

import asyncio
import uuid
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import orjson
import pytest
import sqlalchemy as sa
from sqlalchemy.ext.asyncio import AsyncEngine
from store_streams import (
    EPOCH,
    MakeFlusher,
    Stream,
    assert_stored,
    dump,
    set_checkpoint,
    stored_checkpoint,
    texts,
    token_keys,
    wait_for,
)

from llmsvc.gateway.journal import Journal
from llmsvc.store.flusher import BUSY_RECORDS, BUSY_REST
from llmsvc.store.schema import llm_attempts, llm_requests, llm_token_log, wal_checkpoints
from llmsvc.wal import codec
from llmsvc.wal.segment import list_segments
from llmsvc.wal.writer import WalWriter


def _now() -> datetime:
    return datetime.now(UTC)


async def test_journaled_streams_are_stored_exactly_once_with_text_intact(
    engine: AsyncEngine, journal: Journal, make_flusher: MakeFlusher, wal_id: uuid.UUID
) -> None:
    began = _now()
    streams = [
        Stream(texts(40)),
        Stream(
            ["Привет", ", ", "мир", "! ", "你好", "世界", " 👋🏽", " ﷽", " e\u0301", " \t\n"],
            model="modèle-ü",
            messages=[{"role": "user", "content": "Grüß Gott — 東京 🗼"}],
            params={"stop": ["«fin»"], "temperature": 0.0},
        ),
    ]
    for stream in streams:
        await stream.journal_whole(journal)
    last_lsn = journal.writer.end.lsn - 1

    flusher = make_flusher()
    await flusher.start()
    assert await flusher.drain(10)
    rows = await dump(engine)

    for stream in streams:
        assert_stored(rows, stream, wal_id, began, _now())
    assert len(rows["requests"]) == len(rows["attempts"]) == 2
    assert len(rows["tokens"]) == 50
    assert flusher.checkpoint == last_lsn
    assert await stored_checkpoint(engine, wal_id) == last_lsn


async def test_checkpoint_follows_each_drain_to_the_last_journaled_lsn(
    engine: AsyncEngine, journal: Journal, make_flusher: MakeFlusher, wal_id: uuid.UUID
) -> None:
    flusher = make_flusher(batch_records=7)
    await flusher.start()
    assert flusher.checkpoint == 0
    assert await stored_checkpoint(engine, wal_id) is None

    for n in (5, 23, 1):
        await Stream(texts(n)).journal_whole(journal)
        last_lsn = journal.writer.end.lsn - 1
        assert not flusher.caught_up
        assert await flusher.drain(10)
        assert flusher.checkpoint == last_lsn
        assert await stored_checkpoint(engine, wal_id) == last_lsn
    assert len(await token_keys(engine)) == 29


async def test_a_hurried_flusher_stores_what_was_journaled_without_waiting_its_interval(
    engine: AsyncEngine, journal: Journal, make_flusher: MakeFlusher
) -> None:
    flusher = make_flusher(interval=3600.0)
    await flusher.start()
    await Stream(texts(3)).journal_whole(journal)
    task = asyncio.create_task(flusher.run())
    try:
        # the first flush; then it idles for its hour
        await wait_for(lambda: flusher.caught_up, 10, "caught up")
        await Stream(texts(4)).journal_whole(journal)
        await asyncio.sleep(0.2)
        assert not flusher.caught_up
        flusher.hurry()
        await wait_for(lambda: flusher.caught_up, 10, "caught up once hurried")
        assert len(await token_keys(engine)) == 7
        flusher.stop()  # ends the next idle wait at once too
        async with asyncio.timeout(10):
            await task
    finally:
        task.cancel()


def _recording_rests(flusher: Any) -> list[int]:
    """The intervals each rest of `flusher` is asked for, in order."""
    rests: list[int] = []
    idle = flusher._idle

    async def recorded(intervals: int) -> None:
        rests.append(intervals)
        await idle(intervals)

    flusher._idle = recorded
    return rests


async def test_a_busy_flusher_rests_longer_and_a_light_one_its_interval(
    engine: AsyncEngine, journal: Journal, make_flusher: MakeFlusher
) -> None:
    """A flush of BUSY_RECORDS or more that kept up rests BUSY_REST intervals (more rows per
    page of the token index rewritten); a smaller one rests one: the store stays fresh
    where that is cheap."""
    flusher = make_flusher(interval=3600.0)
    await flusher.start()
    rests = _recording_rests(flusher)
    await Stream(texts(BUSY_RECORDS)).journal_whole(journal)
    task = asyncio.create_task(flusher.run())
    try:
        await wait_for(lambda: flusher.caught_up and bool(rests), 10, "the busy flush's rest")
        assert rests == [BUSY_REST]
        await Stream(texts(3)).journal_whole(journal)
        flusher.hurry()
        await wait_for(lambda: len(rests) == 2, 10, "the light flush's rest")
        assert rests == [BUSY_REST, 1]
        assert len(await token_keys(engine)) == BUSY_RECORDS + 3
        flusher.stop()
        async with asyncio.timeout(10):
            await task
    finally:
        task.cancel()


async def test_a_flusher_behind_a_backlog_rests_one_interval_however_much_it_stored(
    engine: AsyncEngine, journal: Journal, make_flusher: MakeFlusher
) -> None:
    """A read takes a MiB of the log at most: a flush of a backlog stores many records and
    leaves more, and a longer rest would only lengthen the catching up."""
    flusher = make_flusher(interval=3600.0)
    await flusher.start()
    rests = _recording_rests(flusher)
    await Stream([f"{i:04d}" + "x" * 1000 for i in range(3000)]).journal_whole(journal)  # 3 MiB
    task = asyncio.create_task(flusher.run())
    try:
        await wait_for(lambda: bool(rests), 10, "the first flush's rest")
        assert rests == [1]
        assert not flusher.caught_up
        async with asyncio.timeout(10):  # the rest of the backlog, a hurried flush at a time
            while not flusher.caught_up:
                flusher.hurry()
                await asyncio.sleep(0.02)
        assert len(await token_keys(engine)) == 3000
        flusher.stop()
        async with asyncio.timeout(10):
            await task
    finally:
        task.cancel()


async def _wipe(engine: AsyncEngine, instance_id: uuid.UUID) -> None:
    async with engine.begin() as conn:
        for table in (llm_token_log, llm_attempts, llm_requests):
            await conn.execute(sa.delete(table))
    await set_checkpoint(engine, instance_id, 0)


async def test_starts_and_ends_in_different_batches_give_the_rows_of_one_batch(
    engine: AsyncEngine, journal: Journal, make_flusher: MakeFlusher, wal_id: uuid.UUID
) -> None:
    """Ends whose start was flushed earlier become updates; the result must not differ."""
    a, b, c = Stream(texts(5, "a")), Stream(texts(3, "b")), Stream(texts(4, "c"))
    a.start(journal)
    a.tokens(journal, 0, 2)
    b.start(journal)
    a.tokens(journal, 2)
    b.tokens(journal)
    c.start(journal)
    b.end(journal)
    c.tokens(journal)
    a.end(journal)
    await asyncio.shield(c.end(journal))

    whole = make_flusher()
    await whole.start()
    assert await whole.drain(10)
    expected = await dump(engine)
    for stream in (a, b, c):
        assert_stored(expected, stream, wal_id, EPOCH, _now())
    assert len(expected["tokens"]) == 12

    for batch_records in (1, 2, 3, 5):
        await _wipe(engine, wal_id)
        assert await dump(engine) == {"requests": [], "attempts": [], "tokens": []}
        split = make_flusher(batch_records=batch_records)
        await split.start()
        assert await split.drain(10)
        assert await dump(engine) == expected, batch_records


async def test_replaying_the_whole_log_from_checkpoint_zero_changes_no_row(
    engine: AsyncEngine, journal: Journal, make_flusher: MakeFlusher, wal_id: uuid.UUID
) -> None:
    streams = [Stream(texts(n, f"s{n}-")) for n in (3, 17, 8)]
    for stream in streams:
        await stream.journal_whole(journal)
    last_lsn = journal.writer.end.lsn - 1
    first = make_flusher()
    await first.start()
    assert await first.drain(10)
    before = await dump(engine)
    assert len(list_segments(journal.writer.wal_dir)) == 1  # nothing to replay was removed

    await set_checkpoint(engine, wal_id, 0)
    for batch_records in (50_000, 4):  # whole rows ignored; then starts ignored, ends re-applied
        replay = make_flusher(batch_records=batch_records)
        await replay.start()
        assert replay.checkpoint == 0
        assert await replay.drain(10)
        assert await dump(engine) == before
        keys = await token_keys(engine)
        assert len(keys) == len(set(keys)) == 28
        assert await stored_checkpoint(engine, wal_id) == last_lsn
        await set_checkpoint(engine, wal_id, 0)


async def _rename(engine: AsyncEngine, old: str, new: str) -> None:
    async with engine.begin() as conn:
        await conn.exec_driver_sql(f"ALTER TABLE {old} RENAME TO {new}")


async def test_a_batch_failing_mid_transaction_leaves_no_rows_and_is_retried_whole(
    engine: AsyncEngine, journal: Journal, make_flusher: MakeFlusher, wal_id: uuid.UUID
) -> None:
    """The token insert fails after the checkpoint, request and attempt writes of its batch."""
    flushed = Stream(texts(4, "ok"))
    await flushed.journal_whole(journal)
    flusher = make_flusher()
    await flusher.start()
    assert await flusher.drain(10)
    checkpoint = flusher.checkpoint
    committed = await dump(engine)

    await _rename(engine, "llm_token_log", "llm_token_log_away")
    failing = Stream(texts(6, "fail"))
    await failing.journal_whole(journal)
    with pytest.raises(Exception, match="llm_token_log"):
        await flusher.flush_once()
    assert not await flusher.drain(0.2)  # logs and gives up at the deadline, never raises
    later = Stream(texts(2, "later"))
    await later.journal_whole(journal)
    with pytest.raises(Exception, match="llm_token_log"):
        await flusher.flush_once()

    await _rename(engine, "llm_token_log_away", "llm_token_log")
    async with engine.connect() as conn:
        assert await conn.scalar(sa.select(sa.func.count()).select_from(llm_token_log)) == 4
    rows = await dump(engine)
    assert rows == committed  # neither the request nor the attempt of the failed batch
    assert flusher.checkpoint == checkpoint
    assert await stored_checkpoint(engine, wal_id) == checkpoint
    assert not flusher.caught_up

    assert await flusher.drain(10)
    rows = await dump(engine)
    for stream in (flushed, failing, later):
        assert_stored(rows, stream, wal_id, EPOCH, _now())
    keys = await token_keys(engine)
    assert len(keys) == len(set(keys)) == 12
    assert await stored_checkpoint(engine, wal_id) == journal.writer.end.lsn - 1


async def test_checkpoints_of_two_instances_sharing_a_database_are_kept_apart(
    engine: AsyncEngine, journal: Journal, make_flusher: MakeFlusher, wal_id: uuid.UUID
) -> None:
    other = uuid.uuid4()
    async with engine.begin() as conn:
        await conn.execute(
            wal_checkpoints.insert().values(instance_id=other, lsn=999, updated_at=_now())
        )
    await Stream(texts(3)).journal_whole(journal)
    flusher = make_flusher()
    await flusher.start()
    assert flusher.checkpoint == 0
    assert await flusher.drain(10)
    assert await stored_checkpoint(engine, wal_id) == journal.writer.end.lsn - 1
    assert await stored_checkpoint(engine, other) == 999
    (request,) = (await dump(engine))["requests"]
    assert request["instance_id"] == wal_id


STAMPS = [1_700_000_000_000_000, 1_700_000_000_000_001, 1_700_000_000_999_999, 0]
"""Token times in µs: whole seconds (no fraction to print), one µs either side, the epoch."""


async def _flush_tokens_at(
    stamps: list[int], engine: AsyncEngine, writer: WalWriter, make_flusher: MakeFlusher
) -> list[datetime]:
    """Journal one token per timestamp (seq = index), flush, return the expected datetimes."""
    stream = Stream([])
    stream.start(Journal(writer))  # queued: written with the tokens below
    frames = [
        codec.encode_token(stream.attempt_id.bytes, seq, us, f"t{seq}")
        for seq, us in enumerate(stamps)
    ]
    await asyncio.shield(writer.append(*frames))
    flusher = make_flusher()
    await flusher.start()
    assert await flusher.drain(10)
    return [EPOCH + timedelta(microseconds=us) for us in stamps]


async def test_token_timestamps_are_stored_to_the_microsecond(
    engine: AsyncEngine, writer: WalWriter, make_flusher: MakeFlusher
) -> None:
    """SQLite gets text the flusher formats itself, PostgreSQL epoch arithmetic: same result."""
    expected = await _flush_tokens_at(STAMPS, engine, writer, make_flusher)
    tokens = (await dump(engine))["tokens"]
    assert [t["created_at"] for t in tokens] == expected
    async with engine.connect() as conn:  # and they order correctly in SQL, not only in Python
        ordered = await conn.scalars(
            sa.select(llm_token_log.c.seq).order_by(llm_token_log.c.created_at, llm_token_log.c.seq)
        )
        assert list(ordered) == [3, 0, 1, 2]


async def test_token_timestamps_compare_in_sql_like_the_timestamps_sqlalchemy_writes(
    engine: AsyncEngine, writer: WalWriter, make_flusher: MakeFlusher
) -> None:
    """Queries bound by a time (retention cutoffs, "tokens since") must find a token at it.

    On SQLite a timestamp is text compared as text, so the flusher's raw token
    insert must write the same text SQLAlchemy binds for that instant.
    """
    expected = await _flush_tokens_at(STAMPS, engine, writer, make_flusher)
    async with engine.connect() as conn:
        for seq, when in enumerate(expected):
            at_or_after = await conn.scalars(
                sa.select(llm_token_log.c.seq).where(llm_token_log.c.created_at >= when)
            )
            assert seq in set(at_or_after), when
            exactly = await conn.scalars(
                sa.select(llm_token_log.c.seq).where(llm_token_log.c.created_at == when)
            )
            assert list(exactly) == [seq], when


def _with_nul(where: str) -> Stream:
    if where == "token":
        return Stream(["before ", "nul\x00here", " after"])
    return Stream(texts(3), messages=[{"role": "user", "content": "a \x00 in a prompt"}])


@pytest.mark.parametrize("where", ["token", "prompt"])
async def test_nul_characters_from_clients_or_upstreams_do_not_wedge_the_flusher(
    where: str,
    engine: AsyncEngine,
    journal: Journal,
    make_flusher: MakeFlusher,
    wal_id: uuid.UUID,
) -> None:
    """A client may send, and an upstream may stream, U+0000: valid JSON, valid UTF-8.

    PostgreSQL's text and jsonb reject it. The batch holding it must still commit
    (with NUL kept, or replaced by U+FFFD), or no record after it is ever stored.
    """
    poisoned = _with_nul(where)
    await poisoned.journal_whole(journal)
    clean = Stream(texts(5))
    await clean.journal_whole(journal)
    flusher = make_flusher()
    await flusher.start()
    assert await flusher.drain(1)

    rows = await dump(engine)
    assert_stored(rows, clean, wal_id, EPOCH, _now())
    (request,) = [r for r in rows["requests"] if r["id"] == poisoned.request_id]
    stored_texts = [t["text"] for t in rows["tokens"] if t["attempt_id"] == poisoned.attempt_id]

    def without_nul(value: Any) -> Any:
        return orjson.loads(orjson.dumps(value).replace(b"\\u0000", b"\\ufffd"))

    assert without_nul(request["messages"]) == without_nul(poisoned.messages)
    assert without_nul(stored_texts) == without_nul(poisoned.texts)


@pytest.mark.parametrize("writer_settings", [pytest.param({"segment_max_bytes": 1}, id="1-record")])
async def test_records_lost_at_the_end_of_the_log_do_not_hold_the_checkpoint_back(
    engine: AsyncEngine,
    writer: WalWriter,
    journal: Journal,
    make_flusher: MakeFlusher,
    wal_dir: Path,
    wal_id: uuid.UUID,
) -> None:
    # Every awaited append gets a segment of its own; the writer goes on in an empty one.
    stream = Stream(texts(3))
    stream.start(journal)
    for seq in range(3):
        await asyncio.shield(
            journal.tokens(stream.attempt_id.bytes, seq, stream.texts[seq : seq + 1])
        )
    last_token = writer.appended_lsn
    *_, last, empty = list_segments(wal_dir)
    assert (last.first_lsn, empty.first_lsn) == (last_token, last_token + 1)
    last.path.unlink()  # what repair does with a damaged segment: the record is gone

    flusher = make_flusher()
    await flusher.start()

    assert await flusher.drain(5), "the flusher waits for a record that is gone"
    assert flusher.checkpoint == await stored_checkpoint(engine, wal_id) == last_token
    assert [seq for _, seq in await token_keys(engine)] == [0, 1]
    # …and goes on with what is journaled next.
    await asyncio.shield(stream.end(journal))
    assert await flusher.drain(5)
    rows = await dump(engine)
    assert [r["status"] for r in rows["requests"]] == ["completed"]


async def test_a_start_record_journaled_before_correlation_ids_were_text_is_stored(
    engine: AsyncEngine,
    writer: WalWriter,
    journal: Journal,
    make_flusher: MakeFlusher,
    wal_id: uuid.UUID,
) -> None:
    """A WAL written by a version that took only UUIDs replays into the text column: its
    start record, byte for byte as that version wrote it, is stored with the UUID's text."""
    old = Stream(texts(2), correlation_id="5f0c2a1e-8d3b-4c6a-9e7f-0a1b2c3d4e5f")
    payload = (
        b'{"id":"%s","correlation_id":"5f0c2a1e-8d3b-4c6a-9e7f-0a1b2c3d4e5f",'
        b'"model":"gpt-4o-mini","stream":true,'
        b'"messages":[{"role":"user","content":"hi"}],"params":{},"ts":1764950400000000}'
    ) % str(old.request_id).encode()
    writer.queue(codec.encode(codec.RecordType.REQUEST_START, payload))
    old.start_attempt(journal)
    old.tokens(journal)
    await asyncio.shield(old.end(journal))
    new = Stream(texts(1), correlation_id="00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01")
    await new.journal_whole(journal)

    flusher = make_flusher()
    await flusher.start()
    assert await flusher.drain(10)

    rows = await dump(engine)
    stored = {r["id"]: r["correlation_id"] for r in rows["requests"]}
    assert stored == {old.request_id: old.correlation_id, new.request_id: new.correlation_id}
    assert texts(2) == [t["text"] for t in rows["tokens"] if t["attempt_id"] == old.attempt_id]

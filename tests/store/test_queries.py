"""The store's reads: boot's open work, `status`'s recent requests, `show`'s request detail.

Rows get there the way they do in production: journaled, then flushed.
"""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest
import sqlalchemy as sa
from policies import flush_policy, wal_policy
from sqlalchemy.ext.asyncio import AsyncEngine
from store_streams import MakeFlusher, Stream, texts

from llmsvc.gateway.journal import Journal
from llmsvc.store import search
from llmsvc.store.attribution import RequestFilter
from llmsvc.store.flusher import Flusher
from llmsvc.store.keys import utc
from llmsvc.store.queries import (
    Listing,
    OpenWork,
    find_requests,
    open_work,
    recent_requests,
    request_detail,
    token_times,
)
from llmsvc.store.schema import llm_requests
from llmsvc.wal.segment import instance_id
from llmsvc.wal.writer import WalWriter


async def _flush(make_flusher: MakeFlusher) -> None:
    flusher = make_flusher()
    await flusher.start()
    assert await flusher.drain(10)


@pytest.fixture
async def other_journal(tmp_path: Path) -> AsyncIterator[Journal]:
    """A second daemon's journal, with its own WAL directory and instance id."""
    wal_dir = tmp_path / "other-wal"
    wal_dir.mkdir()
    writer = WalWriter(wal_dir, instance_id(wal_dir), wal_policy())
    fatal: list[BaseException] = []
    writer.open(asyncio.get_running_loop(), fatal.append)
    try:
        yield Journal(writer)
    finally:
        await writer.close()
    assert not fatal


async def test_open_work_lists_only_this_instances_streaming_requests_and_open_attempts(
    engine: AsyncEngine, journal: Journal, make_flusher: MakeFlusher, wal_id: uuid.UUID
) -> None:
    finished = Stream(texts(4))
    await finished.journal_whole(journal)

    retried = Stream(texts(5))  # first attempt failed after 2 tokens, the second is streaming
    retried.start(journal)
    retried.tokens(journal, 0, 2)
    journal.attempt_end(retried.attempt_id, status="failed", token_count=2, error_code="upstream")
    second = uuid.uuid4()
    journal.attempt_start(second, retried.request_id, 2, "backup", retried.model)
    journal.tokens(second.bytes, 0, ["x", "y", "z"])

    silent = Stream(texts(3))  # started, no token yet
    silent.start(journal)
    await asyncio.shield(journal.writer.append())  # an empty append waits for the queued
    await _flush(make_flusher)

    assert await open_work(engine, uuid.uuid4()) == []
    found = sorted(await open_work(engine, wal_id), key=lambda w: str(w.request_id))
    expected = [
        OpenWork(retried.request_id, {second: 3}),
        OpenWork(silent.request_id, {silent.attempt_id: 0}),
    ]
    assert found == sorted(expected, key=lambda w: str(w.request_id))


async def test_open_work_ignores_streaming_requests_of_other_instances(
    engine: AsyncEngine,
    journal: Journal,
    other_journal: Journal,
    make_flusher: MakeFlusher,
    wal_id: uuid.UUID,
) -> None:
    theirs = Stream(texts(2))
    theirs.start(other_journal)
    await asyncio.shield(theirs.tokens(other_journal))
    ours = Stream(texts(6))
    ours.start(journal)
    await asyncio.shield(ours.tokens(journal))
    await _flush(make_flusher)
    await _flush_other(other_journal, engine)

    assert await open_work(engine, wal_id) == [OpenWork(ours.request_id, {ours.attempt_id: 6})]
    other_id = other_journal.writer.instance_id
    assert await open_work(engine, other_id) == [
        OpenWork(theirs.request_id, {theirs.attempt_id: 2})
    ]


async def _flush_other(journal: Journal, engine: AsyncEngine) -> None:
    writer = journal.writer
    flusher = Flusher(
        engine, writer.wal_dir, writer.instance_id, lambda: writer.end, flush_policy()
    )
    try:
        await flusher.start()
        assert await flusher.drain(10)
    finally:
        await flusher.close()


async def test_recent_requests_are_newest_first_and_limited(
    engine: AsyncEngine, journal: Journal, make_flusher: MakeFlusher
) -> None:
    streams = []
    for n in range(5):
        stream = Stream(texts(n + 1), model=f"model-{n}")
        streams.append(stream)
        if n == 3:
            stream.start(journal)  # still streaming
            await asyncio.shield(journal.writer.append())
        else:
            await stream.journal_whole(journal)
        await asyncio.sleep(0.002)  # distinct created_at
    await _flush(make_flusher)

    newest_first = [s.request_id for s in reversed(streams)]
    everything = (await recent_requests(engine, 10)).rows
    assert [r["id"] for r in everything] == newest_first
    assert [r["id"] for r in (await recent_requests(engine, 3)).rows] == newest_first[:3]
    assert (await recent_requests(engine, 0)).rows == []

    latest = everything[0]
    assert latest["model"] == "model-4"
    assert latest["status"] == "completed"
    assert latest["stream"] is True
    assert latest["provider"] == "mock"
    assert latest["completion_tokens"] == 5
    streaming = everything[1]
    assert streaming["status"] == "streaming"
    assert streaming["ended_at"] is None


async def test_recent_requests_show_what_is_stored_of_requests_not_counted(
    engine: AsyncEngine, journal: Journal, make_flusher: MakeFlusher
) -> None:
    """Before its end (or ended without counts) a request still shows its last attempt's
    provider and how many deltas the store holds, counted per request."""
    retried = Stream(texts(5), provider="backup")  # a failed attempt of 2 tokens first
    retried.start_request(journal)
    failed = uuid.uuid4()
    journal.attempt_start(failed, retried.request_id, 1, "flaky", retried.model)
    journal.tokens(failed.bytes, 0, ["a", "b"])
    journal.attempt_end(failed, status="failed", token_count=2, error_code="reset")
    retried.attempt_no = 2
    retried.start_attempt(journal)
    retried.tokens(journal, 0, 3)
    journal.tool_deltas(retried.attempt_id.bytes, 0, [{"index": 0, "name": "f", "arguments": ""}])
    cut = Stream(texts(0), provider="gone")  # a restart ended it before any token
    cut.start(journal)
    journal.request_end(cut.request_id, status="interrupted", error="llmsvc stopped")
    ended = Stream(texts(4))
    await ended.journal_whole(journal)
    await _flush(make_flusher)

    rows = {row["id"]: row for row in (await recent_requests(engine, 10)).rows}
    assert (rows[retried.request_id]["provider"], rows[retried.request_id]["deltas_stored"]) == (
        "backup",
        2 + 3 + 1,
    )
    assert rows[retried.request_id]["completion_tokens"] is None
    assert (rows[cut.request_id]["provider"], rows[cut.request_id]["deltas_stored"]) == ("gone", 0)
    assert (
        rows[ended.request_id]["completion_tokens"],
        rows[ended.request_id]["deltas_stored"],
    ) == (
        4,
        None,  # counted: nothing more to show
    )


async def test_requests_are_paged_by_keyset_and_filtered_by_status_model_provider_and_time(
    engine: AsyncEngine, journal: Journal, make_flusher: MakeFlusher
) -> None:
    """The console's list: pages follow on without a gap or a repeat, and each row says how
    many attempts it took and when its first token came."""
    streams = [
        Stream(texts(2), model="small" if n % 2 else "large", provider=f"p{n % 3}")
        for n in range(7)
    ]
    for stream in streams:
        await stream.journal_whole(journal)
        await asyncio.sleep(0.002)  # distinct created_at
    failed = Stream(texts(0), model="small", provider="p1")
    failed.start(journal)
    journal.request_end(failed.request_id, status="failed", error="upstream gone")
    await asyncio.shield(journal.writer.append())
    await _flush(make_flusher)

    newest_first = [failed.request_id, *(s.request_id for s in reversed(streams))]
    paged, before = [], None
    while page := (await recent_requests(engine, 3, before=before)).rows:
        paged += [row["id"] for row in page]
        before = (page[-1]["created_at"], page[-1]["id"])
    assert paged == newest_first
    rows = (await recent_requests(engine, 10)).rows
    assert {row["attempts"] for row in rows} == {1}
    assert all(row["first_token_at"] is not None for row in rows if row["id"] != failed.request_id)

    def ids(listing: Listing) -> list[object]:
        return [row["id"] for row in listing.rows]

    assert ids(await recent_requests(engine, 10, RequestFilter(status="failed"))) == [
        failed.request_id
    ]
    small = RequestFilter(model="small", status="completed")
    assert ids(await recent_requests(engine, 10, small)) == [
        s.request_id for s in reversed(streams) if s.model == "small"
    ]
    assert ids(await recent_requests(engine, 10, RequestFilter(provider="p2"))) == [
        s.request_id for s in reversed(streams) if s.provider == "p2"
    ]
    cut = utc(rows[3]["created_at"])  # SQLite gives it back naive
    assert ids(await recent_requests(engine, 10, RequestFilter(until=cut))) == newest_first[4:]
    times = await token_times(engine, [streams[0].attempt_id, uuid.uuid4()])
    assert [len(found) for found in times.values()] == [2, 0]
    assert times[streams[0].attempt_id] == sorted(times[streams[0].attempt_id])


async def test_requests_made_in_the_same_microsecond_are_paged_by_id(
    engine: AsyncEngine,
) -> None:
    at = datetime(2026, 1, 2, 3, 4, 5, 678901, tzinfo=UTC)
    ids = sorted((uuid.uuid4() for _ in range(3)), reverse=True)
    row = {"instance_id": uuid.uuid4(), "model": "m", "stream": False, "status": "completed",
           "messages": [], "params": {}, "created_at": at}  # fmt: skip
    async with engine.begin() as conn:
        await conn.execute(
            sa.insert(llm_requests), [{**row, "id": i, "correlation_id": str(i)} for i in ids]
        )
    paged, before = [], None
    while page := (await recent_requests(engine, 1, before=before)).rows:
        paged += [r["id"] for r in page]
        before = (page[-1]["created_at"], page[-1]["id"])
    assert paged == ids


async def test_requests_are_found_by_id_or_by_the_correlation_id_they_were_sent_with(
    engine: AsyncEngine, journal: Journal, make_flusher: MakeFlusher
) -> None:
    first, second = Stream(texts(1), correlation_id="req_shared"), Stream(texts(1))
    alone = Stream(texts(1), correlation_id=str(uuid.uuid4()))
    second.correlation_id = first.correlation_id
    for stream in (first, second, alone):
        await stream.journal_whole(journal)
        await asyncio.sleep(0.002)  # distinct created_at
    await _flush(make_flusher)

    assert await find_requests(engine, str(first.request_id)) == [first.request_id]
    assert await find_requests(engine, str(alone.correlation_id)) == [alone.request_id]
    assert await find_requests(engine, alone.correlation_id.upper()) == []  # matched as sent
    assert await find_requests(engine, str(first.correlation_id)) == [
        second.request_id,
        first.request_id,
    ]
    assert await find_requests(engine, str(uuid.uuid4())) == []
    assert await find_requests(engine, "not-sent-by-anyone") == []

    only = RequestFilter(correlation_id=str(first.correlation_id))
    rows = (await recent_requests(engine, 10, only)).rows
    assert [row["id"] for row in rows] == [second.request_id, first.request_id]
    assert (await recent_requests(engine, 10, RequestFilter(correlation_id="trace-7"))).rows == []


async def test_a_search_of_replies_reads_a_bounded_number_and_says_where_to_go_on(
    engine: AsyncEngine,
    journal: Journal,
    make_flusher: MakeFlusher,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A reply is its tokens joined in seq order, matched ignoring case, `%` and `_` as
    written; a search reads at most SCAN requests and resumes after the last it read."""
    oldest = Stream(["The qu", "ick Br", "own fox"])
    wild = Stream(["Save 1", "% now", " on a_c"], model="wild")
    plain = Stream(["100 percent ", "abc"], model="wild")
    oldest.start(journal)
    oldest.tokens(journal, 1, 3)  # stored after the first token: seq, not arrival, orders
    oldest.tokens(journal, 0, 1)
    await asyncio.shield(oldest.end(journal))
    for stream in (wild, plain):
        await asyncio.sleep(0.002)  # distinct created_at
        await stream.journal_whole(journal)
    await _flush(make_flusher)

    async def found(
        text: str, limit: int = 10, model: str | None = None, before: Any = None
    ) -> Listing:
        return await recent_requests(engine, limit, RequestFilter(model=model, text=text), before)

    def ids(listing: Listing) -> list[uuid.UUID]:
        return [row["id"] for row in listing.rows]

    def read(listing: Listing) -> tuple[int, uuid.UUID | None]:
        """How many replies the search read, and the request it would resume after."""
        assert listing.searched is not None
        resume = listing.searched.resume
        return listing.searched.requests, None if resume is None else resume[1]

    assert ids(await found("QUICK brown")) == [oldest.request_id]  # across tokens, any case
    assert ids(await found("1% NOW")) == [wild.request_id]
    assert ids(await found("1%")) == [wild.request_id]  # not a LIKE wildcard
    assert ids(await found("a_c")) == [wild.request_id]
    assert ids(await found("E", model="wild")) == [plain.request_id, wild.request_id]
    nowhere = await found("zebra")
    assert (ids(nowhere), read(nowhere)) == ([], (3, None))  # all read: none older left
    assert (await recent_requests(engine, 10)).searched is None

    monkeypatch.setattr(search, "SCAN", 2)
    monkeypatch.setattr(search, "FIRST", 1)  # read in two parts, the newest alone first
    first = await found("fox")
    assert (ids(first), read(first)) == ([], (2, wild.request_id))
    assert first.searched is not None
    rest = await found("fox", before=first.searched.resume)
    assert (ids(rest), read(rest)) == ([oldest.request_id], (1, None))
    full = await found(" ", limit=1)  # a full page: it stops at the match it ends on
    assert (ids(full), read(full)) == ([plain.request_id], (1, plain.request_id))


async def test_request_detail_assembles_each_attempts_text_in_seq_order(
    engine: AsyncEngine, journal: Journal, make_flusher: MakeFlusher
) -> None:
    stream = Stream(
        ["Hallo", ", ", "Wëlt", " ", "🌍", "!", " ", "こんにちは", ".", " ", "Ende", "."],
        attempt_no=2,
    )
    stream.start_request(journal)
    failed_first = uuid.uuid4()
    journal.attempt_start(failed_first, stream.request_id, 1, "flaky", stream.model)
    journal.tokens(failed_first.bytes, 0, ["half ", "an ", "answ"])
    journal.attempt_end(failed_first, status="failed", error_code="reset", token_count=3)
    stream.start_attempt(journal)
    # Tokens journaled out of seq order (seq 10 and 11 first): the text must follow seq.
    stream.tokens(journal, 10)
    stream.tokens(journal, 0, 10)
    await asyncio.shield(stream.end(journal))
    unrelated = Stream(texts(3))
    await unrelated.journal_whole(journal)
    await _flush(make_flusher)

    detail = await request_detail(engine, stream.request_id)
    assert detail is not None
    assert detail.request["id"] == stream.request_id
    assert detail.request["status"] == "completed"
    assert detail.request["messages"] == stream.messages
    assert [(a["id"], a["attempt_no"], a["status"]) for a in detail.attempts] == [
        (failed_first, 1, "failed"),
        (stream.attempt_id, 2, "completed"),
    ]
    assert detail.texts == {failed_first: "half an answ", stream.attempt_id: stream.text}


async def test_request_detail_of_an_unknown_id_is_none(
    engine: AsyncEngine, journal: Journal, make_flusher: MakeFlusher
) -> None:
    await Stream(texts(2)).journal_whole(journal)
    await _flush(make_flusher)
    assert await request_detail(engine, uuid.uuid4()) is None

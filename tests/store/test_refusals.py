"""Records the database refuses never hold back the ones after them, on both backends.

Each case journals good streams around one record the database refuses as
written (what an odd request or upstream put into it), then drains: every good
record is stored exactly once, the refused one is stored fitted to its columns
or kept whole in `llm_dead_letters`, and the checkpoint reaches the end.
"""

from __future__ import annotations

import uuid
from typing import Any

import pytest
import sqlalchemy as sa
from sqlalchemy.ext.asyncio import AsyncEngine
from store_streams import MakeFlusher, Stream, dump, stored_checkpoint, texts

from llmsvc.gateway.journal import Journal
from llmsvc.store.refusals import refused
from llmsvc.store.schema import llm_dead_letters, llm_requests, llm_tool_calls
from llmsvc.wal import codec


async def _dead_letters(engine: AsyncEngine) -> list[dict[str, Any]]:
    async with engine.connect() as conn:
        rows = await conn.execute(sa.select(llm_dead_letters).order_by(llm_dead_letters.c.lsn))
        return [dict(row._mapping) for row in rows]


async def _around(journal: Journal, odd: Stream, n: int = 30) -> list[Stream]:
    """n good streams, the odd one, n more: the odd record sits inside one flush batch."""
    good = [Stream(texts(3, f"g{i}-")) for i in range(2 * n)]
    for stream in good[:n]:
        await stream.journal_whole(journal)
    await odd.journal_whole(journal)
    for stream in good[n:]:
        await stream.journal_whole(journal)
    return good


async def _drain(make_flusher: MakeFlusher, **settings: Any) -> Any:
    flusher = make_flusher(**settings)
    await flusher.start()
    assert await flusher.drain(30), flusher.last_error
    return flusher


def _assert_good_stored(rows: dict[str, list[dict[str, Any]]], good: list[Stream]) -> None:
    requests = {row["id"]: row for row in rows["requests"]}
    by_attempt: dict[uuid.UUID, list[tuple[int, str]]] = {}
    for token in rows["tokens"]:
        by_attempt.setdefault(token["attempt_id"], []).append((token["seq"], token["text"]))
    for stream in good:
        assert requests[stream.request_id]["status"] == "completed"
        assert by_attempt[stream.attempt_id] == list(enumerate(stream.texts))


async def test_a_key_with_u0000_is_stored_with_the_character_replaced(
    engine: AsyncEngine, journal: Journal, make_flusher: MakeFlusher
) -> None:
    odd = Stream(["x"], params={"metadata": {"a\x00b": {"c\x00": "d\x00e"}}})
    good = await _around(journal, odd)
    await _drain(make_flusher)

    rows = await dump(engine)
    _assert_good_stored(rows, good)
    stored = next(r for r in rows["requests"] if r["id"] == odd.request_id)
    if engine.dialect.name == "postgresql":
        assert stored["params"]["metadata"] == {"a\ufffdb": {"c\ufffd": "d\ufffde"}}
    else:
        assert stored["params"]["metadata"] == {"a\x00b": {"c\x00": "d\x00e"}}


@pytest.mark.parametrize("usage", [3_000_000_000, [1, 2], {"n": 1}, "12", 1.5e300])
async def test_an_end_with_usage_the_columns_cannot_hold_is_stored_without_it(
    engine: AsyncEngine, journal: Journal, make_flusher: MakeFlusher, usage: Any
) -> None:
    odd = Stream(["a", "b"])
    odd.prompt_tokens = usage
    good = await _around(journal, odd)
    flusher = await _drain(make_flusher, batch_records=1000)

    rows = await dump(engine)
    _assert_good_stored(rows, [*good, odd])
    request = next(r for r in rows["requests"] if r["id"] == odd.request_id)
    attempt = next(r for r in rows["attempts"] if r["id"] == odd.attempt_id)
    letters = await _dead_letters(engine)
    if engine.dialect.name == "sqlite" and not isinstance(usage, list | dict):
        assert not letters  # SQLite takes any scalar in an INTEGER column
        return
    assert request["prompt_tokens"] is None
    assert attempt["prompt_tokens"] is None
    assert request["completion_tokens"] == attempt["token_count"] == 2
    assert {(d["record_type"], d["outcome"]) for d in letters} <= {
        ("attempt_end", "sanitised"),
        ("request_end", "sanitised"),
    }
    assert letters
    assert all(d["reason"] and d["payload"] for d in letters)
    assert sum(flusher.refused.values()) == len(letters)
    assert await stored_checkpoint(engine, journal.writer.instance_id) == flusher.checkpoint


async def test_a_start_without_a_value_its_column_needs_is_set_aside_and_the_rest_flows(
    engine: AsyncEngine, journal: Journal, make_flusher: MakeFlusher
) -> None:
    """A NOT NULL column refuses the start record (on SQLite, where the flush binds through
    the driver, as on PostgreSQL): its attempt and tokens are stored under a stand-in."""
    odd = Stream(["a", "b"], correlation_id=None)  # type: ignore[arg-type]
    good = await _around(journal, odd)
    flusher = await _drain(make_flusher, batch_records=1000)

    rows = await dump(engine)
    _assert_good_stored(rows, [*good, odd])
    request = next(r for r in rows["requests"] if r["id"] == odd.request_id)
    assert "start record was lost" in request["error"]
    letters = await _dead_letters(engine)
    assert [(d["record_type"], d["outcome"]) for d in letters] == [("request_start", "set_aside")]
    assert flusher.checkpoint == journal.writer.end.lsn - 1


UNSTORABLE = {
    "request_start": codec.encode_json(codec.RecordType.REQUEST_START, {"id": "not-a-uuid"}),
    # a tool delta that is a list, not an object: the batch builder fails on it (AttributeError)
    "tool_delta": codec.encode_tool_delta(uuid.uuid4().bytes, 0, 1, [1, 2]),  # type: ignore[arg-type]
}


@pytest.mark.parametrize("kind", list(UNSTORABLE))
async def test_a_record_that_cannot_be_stored_in_any_form_is_set_aside_and_the_rest_flows(
    engine: AsyncEngine, journal: Journal, make_flusher: MakeFlusher, kind: str
) -> None:
    good = [Stream(texts(2, f"g{i}-")) for i in range(20)]
    for stream in good[:10]:
        await stream.journal_whole(journal)
    broken = UNSTORABLE[kind]
    await journal.writer.append(broken)
    for stream in good[10:]:
        await stream.journal_whole(journal)
    flusher = await _drain(make_flusher)

    rows = await dump(engine)
    _assert_good_stored(rows, good)
    [letter] = await _dead_letters(engine)
    assert letter["outcome"] == "set_aside"
    assert letter["record_type"] == kind
    assert bytes(letter["payload"]) == broken[codec.FRAME.size :]
    assert flusher.refused == {"sanitised": 0, "set_aside": 1}
    assert flusher.checkpoint == journal.writer.end.lsn - 1


async def test_a_tool_call_name_past_200_characters_is_stored_whole(
    engine: AsyncEngine, journal: Journal, make_flusher: MakeFlusher
) -> None:
    stream = Stream(["x"])
    stream.start(journal)
    name = "n" * 5000
    journal.tool_deltas(stream.attempt_id.bytes, 0, [{"index": 0, "id": "c" * 300, "name": name}])
    await stream.end(journal)
    await _drain(make_flusher)
    async with engine.connect() as conn:
        query = sa.select(llm_tool_calls.c.name, llm_tool_calls.c.call_id)
        stored = (await conn.execute(query)).one()
    assert stored == (name, "c" * 300)
    assert not await _dead_letters(engine)


async def test_replaying_a_batch_with_refused_records_stores_nothing_twice(
    engine: AsyncEngine, journal: Journal, make_flusher: MakeFlusher
) -> None:
    odd = Stream(["a"])
    odd.prompt_tokens = [1]  # type: ignore[assignment]
    good = await _around(journal, odd, n=5)
    await _drain(make_flusher)
    first = await dump(engine), await _dead_letters(engine)
    async with engine.begin() as conn:  # as after a restore of an older backup: replay again
        await conn.execute(sa.text("UPDATE wal_checkpoints SET lsn = 0"))
    await _drain(make_flusher)
    assert (await dump(engine), await _dead_letters(engine)) == first
    _assert_good_stored(first[0], good)


def test_an_outage_is_not_a_refusal() -> None:
    assert not refused(ConnectionRefusedError(111, "refused"))
    assert not refused(TimeoutError())
    assert not refused(sa.exc.OperationalError("x", {}, Exception("database is locked")))
    assert refused(ValueError("invalid UUID"))


async def test_the_database_refusal_of_a_request_row_is_classified_as_refused(
    engine: AsyncEngine,
) -> None:
    """What the drivers really raise for a bad value is told apart from an outage."""
    row = {
        "id": uuid.uuid4(),
        "instance_id": uuid.uuid4(),
        "correlation_id": "c-1",
        "model": "m",
        "stream": True,
        "status": "streaming",
        "messages": [],
        "params": {},
        "created_at": sa.func.now(),
        "prompt_tokens": [1, 2] if engine.dialect.name == "sqlite" else 2**40,
    }
    with pytest.raises(sa.exc.SQLAlchemyError) as caught:
        async with engine.begin() as conn:
            await conn.execute(sa.insert(llm_requests).values(row))
    assert refused(caught.value)

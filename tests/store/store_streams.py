"""Streams the store tests journal through the gateway's `Journal`, and the rows they expect.

No pytest here: the fixtures live in conftest.py, these are plain helpers.
"""

from __future__ import annotations

import asyncio
import itertools
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any

import sqlalchemy as sa
from sqlalchemy.ext.asyncio import AsyncEngine

from llmsvc.gateway.journal import Journal, now_us
from llmsvc.store.batch import ATTRIBUTION_COLUMNS
from llmsvc.store.flusher import Flusher
from llmsvc.store.schema import llm_attempts, llm_requests, llm_token_log, wal_checkpoints
from llmsvc.wal.writer import WalWriter

OpenWriter = Callable[..., WalWriter]
"""The `open_writer` fixture: a WalWriter on the test's WAL directory, closed at teardown."""
MakeFlusher = Callable[..., Flusher]
"""The `make_flusher` fixture: a Flusher over the test's store and WAL, closed at teardown."""

NON_ASCII = ["Grüße, ", "naïve café ", "日本語の", "テキスト ", "🚀✨", " — «done»"]


@dataclass
class Stream:
    """One client request with one provider attempt, as the gateway journals it."""

    texts: list[str]
    model: str = "gpt-4o-mini"
    provider: str = "mock"
    messages: list[Any] = field(
        default_factory=lambda: [{"role": "user", "content": "Sag hallo auf Deutsch, bitte ☺"}]
    )
    params: dict[str, Any] = field(default_factory=lambda: {"temperature": 0.2})
    request_id: uuid.UUID = field(default_factory=uuid.uuid4)
    correlation_id: str = "req_01HZX3K9Q7"  # as the client sent it: any visible ASCII
    attempt_id: uuid.UUID = field(default_factory=uuid.uuid4)
    attempt_no: int = 1
    prompt_tokens: int = 12
    first_token_us: int | None = None

    def start(self, journal: Journal) -> None:
        self.start_request(journal)
        self.start_attempt(journal)

    def start_request(self, journal: Journal) -> None:
        journal.request_start(
            self.request_id, self.correlation_id, self.model, True, self.messages, self.params
        )

    def start_attempt(self, journal: Journal) -> None:
        journal.attempt_start(
            self.attempt_id, self.request_id, self.attempt_no, self.provider, self.model
        )

    def tokens(
        self, journal: Journal, first: int = 0, last: int | None = None, chunk: int = 2
    ) -> asyncio.Future[int] | None:
        """Journal texts[first:last] in chunks, as upstream chunks arrive."""
        last = len(self.texts) if last is None else last
        fut = None
        for at in range(first, last, chunk):
            if self.first_token_us is None:
                self.first_token_us = now_us()
            fut = journal.tokens(self.attempt_id.bytes, at, self.texts[at : min(at + chunk, last)])
        return fut

    def end(self, journal: Journal, status: str = "completed") -> asyncio.Future[int]:
        journal.attempt_end(
            self.attempt_id,
            status=status,
            http_status=200,
            error_code=None,
            error_message=None,
            prompt_tokens=self.prompt_tokens,
            completion_tokens=len(self.texts),
            token_count=len(self.texts),
            first_token_ts=self.first_token_us,
            finish_reason="content_filter",
            stop_reason="refusal",
        )
        return journal.request_end(
            self.request_id,
            status=status,
            prompt_tokens=self.prompt_tokens,
            completion_tokens=len(self.texts),
            provider=self.provider,
            error=None,
        )

    async def journal_whole(self, journal: Journal) -> int:
        """Start, every token, end; return the LSN of the last record once journaled."""
        self.start(journal)
        self.tokens(journal)
        return await asyncio.shield(self.end(journal))

    @property
    def text(self) -> str:
        return "".join(self.texts)


SLACK = timedelta(milliseconds=5)
EPOCH = datetime(1970, 1, 1, tzinfo=UTC)


def assert_stored(
    rows: dict[str, list[dict[str, Any]]],
    stream: Stream,
    instance_id: uuid.UUID,
    began: datetime,
    ended: datetime,
) -> None:
    """The stream's request, attempt and tokens are stored exactly, with times in order."""
    (request,) = [r for r in rows["requests"] if r["id"] == stream.request_id]
    (attempt,) = [a for a in rows["attempts"] if a["id"] == stream.attempt_id]
    tokens = [t for t in rows["tokens"] if t["attempt_id"] == stream.attempt_id]

    assert {k: v for k, v in request.items() if k not in ("created_at", "ended_at")} == {
        "id": stream.request_id,
        "instance_id": instance_id,
        "correlation_id": stream.correlation_id,
        "model": stream.model,
        "stream": True,
        "status": "completed",
        "messages": stream.messages,
        "params": stream.params,
        "prompt_tokens": stream.prompt_tokens,
        "completion_tokens": len(stream.texts),
        "cost": None,
        "provider": stream.provider,
        "error": None,
        **dict.fromkeys(ATTRIBUTION_COLUMNS),  # journaled with no caller and no attribution
        "prompt_tokens_source": None,
        "completion_tokens_source": None,
        "api": "chat",
        "deleted_at": None,
    }
    assert {
        k: v for k, v in attempt.items() if k not in ("started_at", "first_token_at", "ended_at")
    } == {
        "id": stream.attempt_id,
        "request_id": stream.request_id,
        "attempt_no": stream.attempt_no,
        "provider": stream.provider,
        "model": stream.model,
        "status": "completed",
        "http_status": 200,
        "error_code": None,
        "error_message": None,
        "prompt_tokens": stream.prompt_tokens,
        "completion_tokens": len(stream.texts),
        "token_count": len(stream.texts),
        "finish_reason": "content_filter",
        "stop_reason": "refusal",
    }
    assert [(t["seq"], t["text"]) for t in tokens] == list(enumerate(stream.texts))

    assert began - SLACK <= request["created_at"] <= attempt["started_at"]
    assert attempt["started_at"] <= attempt["first_token_at"] <= tokens[0]["created_at"]
    assert all(a["created_at"] <= b["created_at"] for a, b in itertools.pairwise(tokens))
    assert tokens[-1]["created_at"] <= attempt["ended_at"] <= request["ended_at"]
    assert request["ended_at"] <= ended + SLACK


def texts(n: int, prefix: str = "t") -> list[str]:
    """n distinct token texts, cycling through non-ASCII ones."""
    return [f"{prefix}{i}·{NON_ASCII[i % len(NON_ASCII)]}" for i in range(n)]


def as_utc(value: datetime | None) -> datetime | None:
    """SQLite hands back naive UTC, PostgreSQL aware datetimes; compare them as aware UTC."""
    if value is None or value.tzinfo is not None:
        return value
    return value.replace(tzinfo=UTC)


async def dump(engine: AsyncEngine) -> dict[str, list[dict[str, Any]]]:
    """Every row of the request, attempt and token tables, in key order, times as UTC."""
    out: dict[str, list[dict[str, Any]]] = {}
    async with engine.connect() as conn:
        for name, table, order in (
            ("requests", llm_requests, [llm_requests.c.id]),
            ("attempts", llm_attempts, [llm_attempts.c.id]),
            ("tokens", llm_token_log, [llm_token_log.c.attempt_id, llm_token_log.c.seq]),
        ):
            rows = await conn.execute(sa.select(table).order_by(*order))
            out[name] = [
                {k: as_utc(v) if isinstance(v, datetime) else v for k, v in row._mapping.items()}
                for row in rows
            ]
    return out


async def token_keys(engine: AsyncEngine) -> list[tuple[uuid.UUID, int]]:
    """(attempt id, seq) of every stored token, duplicates included (there is no DISTINCT)."""
    async with engine.connect() as conn:
        rows = await conn.execute(
            sa.select(llm_token_log.c.attempt_id, llm_token_log.c.seq).order_by(
                llm_token_log.c.attempt_id, llm_token_log.c.seq
            )
        )
        return [(a, s) for a, s in rows]


async def stored_checkpoint(engine: AsyncEngine, instance_id: uuid.UUID) -> int | None:
    async with engine.connect() as conn:
        return await conn.scalar(
            sa.select(wal_checkpoints.c.lsn).where(wal_checkpoints.c.instance_id == instance_id)
        )


async def set_checkpoint(engine: AsyncEngine, instance_id: uuid.UUID, lsn: int) -> None:
    async with engine.begin() as conn:
        result = await conn.execute(
            sa.update(wal_checkpoints)
            .where(wal_checkpoints.c.instance_id == instance_id)
            .values(lsn=lsn)
        )
        assert result.rowcount == 1


async def wait_for(condition: Callable[[], bool], within: float, what: str) -> None:
    """Poll until `condition` holds, failing the test past `within` seconds."""
    began = time.monotonic()
    while not condition():
        assert time.monotonic() - began < within, f"not {what} after {within}s"
        await asyncio.sleep(0.02)

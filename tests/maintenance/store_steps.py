"""What the maintenance tests do to a store: flush a WAL into it, punch holes in it."""

from __future__ import annotations

import asyncio
import uuid
from pathlib import Path

import sqlalchemy as sa
from policies import flush_policy
from sqlalchemy.ext.asyncio import AsyncEngine

from llmsvc.gateway.journal import Journal
from llmsvc.store.flusher import Flusher
from llmsvc.store.schema import llm_token_log
from llmsvc.wal.writer import WalWriter


async def flush(engine: AsyncEngine, wal_dir: Path, wal_id: uuid.UUID, writer: WalWriter) -> None:
    """Everything `writer` journaled, committed by a real Flusher."""
    flusher = Flusher(engine, wal_dir, wal_id, lambda: writer.end, flush_policy())
    await flusher.start()
    assert await flusher.drain(10)
    await flusher.close()


async def delete_seqs(engine: AsyncEngine, attempt_id: uuid.UUID, seqs: list[int]) -> None:
    """Delete exactly these token rows: the gaps a test wants."""
    async with engine.begin() as conn:
        result = await conn.execute(
            sa.delete(llm_token_log).where(
                llm_token_log.c.attempt_id == attempt_id, llm_token_log.c.seq.in_(seqs)
            )
        )
    assert result.rowcount == len(seqs)


async def journal_attempt(writer: WalWriter, tokens: int) -> uuid.UUID:
    """One completed request whose attempt streamed `tokens` tokens (seq 0..tokens-1)."""
    journal = Journal(writer)
    request_id, attempt_id = uuid.uuid4(), uuid.uuid4()
    journal.request_start(request_id, uuid.uuid4(), "m", True, [], {})
    journal.attempt_start(attempt_id, request_id, 1, "p", "m")
    journal.tokens(attempt_id.bytes, 0, [f"t{i} " for i in range(tokens)])
    journal.attempt_end(attempt_id, status="completed", token_count=tokens)
    await asyncio.shield(journal.request_end(request_id, status="completed"))
    return attempt_id

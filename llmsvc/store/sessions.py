"""Sessions' rows (`llm_sessions`): made, read, deleted and pruned directly in the database.

A session is control-plane state, like a key: its row is written at once,
not journaled. Its messages are not here: they are its requests' (see
store/conversations.py), which stay in the audit log when the row goes.
"""

from __future__ import annotations

import uuid
from dataclasses import dataclass
from datetime import datetime

import sqlalchemy as sa
from sqlalchemy.ext.asyncio import AsyncEngine

from llmsvc.store.keys import utc
from llmsvc.store.schema import llm_sessions


@dataclass(frozen=True, slots=True)
class Session:
    """A session's row; `key_id` is the only key that may use it (None without keys)."""

    id: str
    key_id: uuid.UUID | None
    metadata: dict[str, str] | None
    created_at: datetime
    expires_at: datetime | None


async def create_session(engine: AsyncEngine, session: Session) -> None:
    async with engine.begin() as conn:
        await conn.execute(
            llm_sessions.insert().values(
                id=session.id,
                key_id=session.key_id,
                metadata=session.metadata,
                created_at=session.created_at,
                expires_at=session.expires_at,
            )
        )


async def live_session(engine: AsyncEngine, session_id: str, now: datetime) -> Session | None:
    """The session with this id unless it has expired (its row may wait for the prune)."""
    s = llm_sessions.c
    async with engine.connect() as conn:
        row = (
            await conn.execute(
                sa.select(llm_sessions).where(
                    (s.id == session_id) & (s.expires_at.is_(None) | (s.expires_at > now))
                )
            )
        ).first()
    if row is None:
        return None
    return Session(row.id, row.key_id, row.metadata, utc(row.created_at), utc(row.expires_at))


async def delete_session(engine: AsyncEngine, session_id: str) -> None:
    async with engine.begin() as conn:
        await conn.execute(llm_sessions.delete().where(llm_sessions.c.id == session_id))


async def prune_sessions(engine: AsyncEngine, now: datetime) -> int:
    """Delete the sessions expired by `now`; how many went."""
    async with engine.begin() as conn:
        result = await conn.execute(llm_sessions.delete().where(llm_sessions.c.expires_at <= now))
    return result.rowcount

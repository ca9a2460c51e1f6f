"""Console sessions ended by logging out (`console_logouts`), shared by every worker.

A console session is a signed cookie, checked alike by each worker on the port;
only a row in the store can end it in all of them before it expires. A row
names the session by the SHA-256 of its nonce and lives until the cookie's own
expiry; rows past it are deleted at each logout, so the table holds at most the
sessions ended in the last cookie lifetime.
"""

from __future__ import annotations

from datetime import datetime

import sqlalchemy as sa
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.ext.asyncio import AsyncEngine

from llmsvc.store.schema import console_logouts


async def end_console_session(
    engine: AsyncEngine, nonce_hash: str, expires_at: datetime, now: datetime
) -> None:
    """Record the session as ended (again is harmless) and delete rows expired by `now`."""
    dialect = postgresql if engine.dialect.name == "postgresql" else sqlite
    ended = dialect.insert(console_logouts).values(nonce_hash=nonce_hash, expires_at=expires_at)
    async with engine.begin() as conn:
        await conn.execute(console_logouts.delete().where(console_logouts.c.expires_at <= now))
        await conn.execute(ended.on_conflict_do_nothing())


async def console_session_ended(engine: AsyncEngine, nonce_hash: str) -> bool:
    """Whether the session with this nonce was logged out."""
    async with engine.connect() as conn:
        found = await conn.execute(
            sa.select(sa.literal(1)).where(console_logouts.c.nonce_hash == nonce_hash)
        )
        return found.first() is not None

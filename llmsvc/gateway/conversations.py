"""The gateway's reads of the conversation store, after the store has caught up.

A reply is journaled before the client has it, and stored by the flusher a
moment later, so a client continuing a conversation at once can ask for a
turn the database does not hold yet. A turn not found, or found not ended, is
asked for again once the store holds everything journaled before the ask; the
flusher is hurried for it, so an agent's next turn waits for one flush, not
for the flush interval as well.

A worker of a supervisor cannot see the others' WALs, and a client continuing
on a new connection may reach another worker than the one that answered: with
other workers, a conversation is read once their stores have caught up too
(`llmsvc.siblings`).
"""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import Awaitable, Callable

from sqlalchemy.ext.asyncio import AsyncEngine

from llmsvc.errors import ServiceUnavailable
from llmsvc.store.conversations import Turn, latest_turn, turn

POLL_SECONDS = 0.005  # how often the store's progress is looked at while waiting for it


class Conversations:
    """`stored()`: the last LSN the store holds; `journaled()`: the last the WAL holds;
    `hurry()` asks the flusher to flush now; a wait for the store is bounded by
    `wait_seconds` (a database down is a 503, saying why); `others()` waits for the
    other workers' stores to catch up with their WALs (None without other workers)."""

    def __init__(
        self,
        engine: AsyncEngine,
        stored: Callable[[], int],
        journaled: Callable[[], int],
        hurry: Callable[[], None],
        wait_seconds: float,
        others: Callable[[], Awaitable[None]] | None = None,
    ) -> None:
        self.engine = engine
        self.stored = stored
        self.journaled = journaled
        self.hurry = hurry
        self.wait_seconds = wait_seconds
        self.others = others

    async def caught_up(self) -> None:
        """Return once the store holds every record journaled before this call."""
        target = self.journaled()
        if self.stored() >= target:
            return
        self.hurry()
        try:
            async with asyncio.timeout(self.wait_seconds):
                # Polled, not signalled: the checkpoint moves in several places (a batch, a
                # record set aside, a restore's new flusher) and a wait here is rare and short.
                while self.stored() < target:  # noqa: ASYNC110
                    await asyncio.sleep(POLL_SECONDS)
        except TimeoutError:
            raise ServiceUnavailable(
                f"the conversation is journaled but not yet in the database after "
                f"{self.wait_seconds:g} s (database_timeout_seconds); the daemon's health says why"
            ) from None

    async def turn(self, request_id: uuid.UUID) -> Turn | None:
        """The request as a turn, as the store holds it once caught up (with other workers,
        theirs too); None if never made."""
        found = await turn(self.engine, request_id)
        if found is None or not found.ended:
            await self.all_caught_up()
            found = await turn(self.engine, request_id)
        return found

    async def latest_turn(self, session_id: str) -> Turn | None:
        """The session's newest completed turn, with every turn journaled so far stored."""
        await self.all_caught_up()
        return await latest_turn(self.engine, session_id)

    async def all_caught_up(self) -> None:
        """`caught_up`, and with other workers, theirs at the same time."""
        if self.others is None:
            await self.caught_up()
        else:
            await asyncio.gather(self.caught_up(), self.others())

"""Providers an operator switched off: stored in the database, followed from it, kept locally.

The database is where a switch lives (it outlives a restart and reaches every
instance on it); the copy beside the WAL (`llmsvc.local`) is what a boot
honours before the database answers.
"""

from __future__ import annotations

import asyncio
import time
from pathlib import Path
from typing import Any

from sqlalchemy.ext.asyncio import AsyncEngine

from llmsvc.errors import ServiceUnavailable
from llmsvc.follow import every
from llmsvc.gateway.router import Router
from llmsvc.local import read_disabled, write_disabled
from llmsvc.logs import logger
from llmsvc.store.engine import describe_error
from llmsvc.store.queries import provider_states, set_provider_enabled

log = logger(__name__)

REFRESH_SECONDS = 2.0  # how soon a switch made elsewhere is followed here


class Switches:
    def __init__(self, engine: AsyncEngine, router: Router, names: set[str], wal_dir: Path) -> None:
        self.engine = engine
        self.router = router
        self.names = names  # the configured providers: stored rows of others are ignored
        self.wal_dir = wal_dir
        self.made = 0  # switches made here, so a read never undoes a newer one
        self.waiting_since: float | None = None  # as the flusher's: a read unanswered since
        self.error: str | None = None  # why the last read failed; None once one succeeds

    def load_local(self) -> None:
        """At boot, before the database answers: the switches as this instance last knew them."""
        self.router.disabled = read_disabled(self.wal_dir) & self.names
        if self.router.disabled:
            log.info(
                "boot: providers disabled by an operator: %s",
                ",".join(sorted(self.router.disabled)),
            )

    async def switch(self, name: str, enabled: bool) -> None:
        """Stored first, so the switch outlives a restart; effective for the next request.

        A database that does not store it refuses the switch (503): made here only, it
        would be undone by the next read, and by the other instances never made.
        """
        try:
            await set_provider_enabled(self.engine, name, enabled)
        except Exception as exc:
            raise ServiceUnavailable(
                f"the switch is not made: the database did not store it ({describe_error(exc)}); "
                "try again once it answers"
            ) from None
        # Counted once stored: a read that began earlier may hold rows from before the commit,
        # and one that begins later sees the switch.
        self.made += 1
        disabled = self.router.disabled - {name} if enabled else self.router.disabled | {name}
        self._take(disabled)
        log.info("provider %s by an operator", "enabled" if enabled else "disabled", provider=name)

    async def read(self) -> dict[str, dict[str, Any]]:
        """The stored rows, adopted unless a switch landed here meanwhile (the next read has it)."""
        made = self.made
        if self.waiting_since is None:
            self.waiting_since = time.monotonic()
        try:
            states = await provider_states(self.engine)
        except Exception as exc:
            self.error = describe_error(exc)
            if not isinstance(exc, TimeoutError):  # it answered, with an error
                self.waiting_since = None
            raise
        self.waiting_since = self.error = None
        if made == self.made:
            stored = {name for name, row in states.items() if not row["enabled"]}
            disabled = stored & self.names
            for name in disabled ^ self.router.disabled:
                now = "disabled" if name in disabled else "enabled"
                log.info("provider %s by an operator (stored)", now, provider=name)
            self._take(disabled)
        return states

    async def follow(self, stopping: asyncio.Event) -> None:
        """Read every REFRESH_SECONDS until `stopping`; a failed read changes nothing."""
        await every(REFRESH_SECONDS, stopping, self.read, "provider switches")

    def _take(self, disabled: set[str]) -> None:
        if disabled != self.router.disabled:
            write_disabled(self.wal_dir, disabled)
        self.router.disabled.intersection_update(disabled)
        self.router.disabled.update(disabled)

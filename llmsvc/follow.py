"""Following state other instances store: one read every few seconds until the daemon stops.

Provider switches, keys and rate-limit use all reach every instance this
way; a read the database does not answer keeps what was read before, and the
next one tries again.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable

import anyio

from llmsvc.logs import logger
from llmsvc.store.engine import describe_error

log = logger(__name__)


async def every(
    seconds: float, stopping: asyncio.Event, read: Callable[[], Awaitable[object]], what: str
) -> None:
    """Await `read()` every `seconds` until `stopping` is set; a failure is logged (DEBUG)."""
    while True:
        with anyio.move_on_after(seconds):
            await stopping.wait()
        if stopping.is_set():
            return
        try:
            await read()
        except Exception as exc:
            log.debug("%s not read", what, error=describe_error(exc))

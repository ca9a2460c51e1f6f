"""Stand-ins for the containers uvicorn makes per connection and per request, in less memory.

A connection lives as long as its stream, thousands at once. uvicorn gives each an
asyncio.Event for flow control, each request another for its body, and each
connection a deque for pipelined requests: 1,112 bytes an event (with its deque
of waiters), 760 an empty deque, ~3 KiB a stream for objects that an open stream
never uses (its body has arrived, its socket stays writable, nothing is
pipelined). gateway/http_protocol.py swaps these in; tests/gateway/
test_http_protocol.py checks uvicorn uses them only as they allow.
"""

from __future__ import annotations

import asyncio

from uvicorn._types import ASGI3Application
from uvicorn.protocols.http.httptools_impl import RequestResponseCycle


class LeanEvent:
    """asyncio.Event's `set`, `clear`, `is_set` and `wait` (all uvicorn uses) in 56 bytes: its
    list of waiters is made at the first wait that has to wait, which a stream's never does
    (its body has arrived, its socket stays writable)."""

    __slots__ = ("_value", "_waiters")

    def __init__(self, value: bool = False) -> None:
        self._value = value
        self._waiters: list[asyncio.Future[bool]] | None = None

    def is_set(self) -> bool:
        return self._value

    def set(self) -> None:
        if not self._value:
            self._value = True
            for waiter in self._waiters or ():
                if not waiter.done():
                    waiter.set_result(True)

    def clear(self) -> None:
        self._value = False

    async def wait(self) -> bool:
        if self._value:
            return True
        waiter: asyncio.Future[bool] = asyncio.get_running_loop().create_future()
        if self._waiters is None:
            self._waiters = []
        self._waiters.append(waiter)
        try:
            return await waiter
        finally:
            self._waiters.remove(waiter)


class Pipeline(list[tuple[RequestResponseCycle, ASGI3Application]]):
    """uvicorn's queue of pipelined requests (`appendleft`, `pop`, truth), as a list: 56 bytes
    empty, where a deque is 760. A queue is a request or two at most (reading pauses)."""

    __slots__ = ()

    def appendleft(self, item: tuple[RequestResponseCycle, ASGI3Application]) -> None:
        self.insert(0, item)

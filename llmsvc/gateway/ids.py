"""Random (version 4) UUIDs for a request's ids, their randomness read in blocks.

`uuid.uuid4` makes one getrandom(2) per id, and a request takes three: its id, its
correlation id and its attempt's id. These come from the same source, `os.urandom`,
read BLOCK bytes at a time, on the event loop's thread only (no lock). They name
requests and are no secrets: keys and console sessions keep `uuid.uuid4` and
`secrets`.
"""

from __future__ import annotations

import os
import uuid

BLOCK = 4096  # 256 ids a read


class _Randomness:
    """A block of `os.urandom` handed out 16 bytes at a time; a forked child starts its own."""

    def __init__(self) -> None:
        self.block = b""
        self.at = BLOCK

    def take16(self) -> bytes:
        at = self.at
        if at >= BLOCK:
            self.block, at = os.urandom(BLOCK), 0
        self.at = at + 16
        return self.block[at : at + 16]

    def forget(self) -> None:
        self.at = BLOCK


_randomness = _Randomness()
os.register_at_fork(after_in_child=_randomness.forget)


def new_id() -> uuid.UUID:
    """A random UUID, as `uuid.uuid4()` makes, without a syscall each."""
    return uuid.UUID(bytes=_randomness.take16(), version=4)

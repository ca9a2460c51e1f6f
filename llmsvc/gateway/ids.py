"""Time-ordered (version 7) UUIDs for a request's ids, their randomness read in blocks.

A request takes three ids: its own, its correlation id and its attempt's. The
store's indexes are keyed by them (the token table's primary key leads with the
attempt's), and a random id puts each open stream's next rows on a page of its
own anywhere in the index, so a flush of 300 streams dirtied 300 pages scattered
over the whole index. An id that starts with the millisecond it was made (RFC 9562,
version 7) keeps every open stream's rows at the index's recent end: storing a
token costs SQLite a third less CPU and fewer bytes written (docs/DECISIONS.md).

`uuid.uuid4` makes one getrandom(2) per id; these ids' 74 random bits come from
the same source, `os.urandom`, read BLOCK bytes at a time, on the event loop's
thread only (no lock). They name requests and are no secrets: keys and console
sessions keep `uuid.uuid4` and `secrets`.
"""

from __future__ import annotations

import os
import time
import uuid

BLOCK = 4096  # 256 ids a read
# RFC 9562's version 7: 48 bits of Unix milliseconds, the version, 12 random bits,
# the variant, 62 random bits.
_VERSION_7 = 7 << 76
_VARIANT = 0b10 << 62
_RAND_A = 0xFFF << 64
_RAND_B = (1 << 62) - 1


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
    """A version 7 UUID: the millisecond it is made, then 74 random bits; no syscall each."""
    rand = int.from_bytes(_randomness.take16())
    ms = time.time_ns() // 1_000_000
    return uuid.UUID(int=ms << 80 | _VERSION_7 | rand & _RAND_A | _VARIANT | rand & _RAND_B)

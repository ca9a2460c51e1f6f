"""WAL errors that say where the log stopped being readable."""

from pathlib import Path

from llmsvc.errors import WalError


class Corruption(WalError):
    """A record or header that fails its checks, at a known place.

    Carries the segment and byte offset so repair and operators can act on it.
    """

    def __init__(self, segment: Path, offset: int, reason: str) -> None:
        super().__init__(f"wal: {segment.name} at byte {offset}: {reason}")
        self.segment = segment
        self.offset = offset
        self.reason = reason


class TornTail(Corruption):
    """An incomplete or zero-filled last write: expected after a crash, safe to cut off."""

"""WAL errors that say where the log stopped being readable, and the kinds of damage."""

from enum import StrEnum
from pathlib import Path

from llmsvc.errors import WalError


class Damage(StrEnum):
    """What is wrong with a segment: repair's findings, verify's, the check's and the metric's."""

    TORN_TAIL = "torn_tail"  # the newest segment ends in an unfinished write: a crash, cut off
    CORRUPT = "corrupt"  # a frame fails its checks where no crash explains it
    BAD_HEADER = "bad_header"  # not this instance's segment, or not a segment at all
    UNREADABLE = "unreadable"  # the file cannot be read
    OVERLAP = "overlap"  # its first LSN is inside the segment before it


class Corruption(WalError):
    """A record or header that fails its checks, at a known place.

    Carries the segment and byte offset so repair and operators can act on it.
    """

    def __init__(self, segment: Path, offset: int, reason: str) -> None:
        super().__init__(f"wal: {segment.name} at byte {offset}: {reason}")
        self.segment = segment
        self.offset = offset
        self.reason = reason

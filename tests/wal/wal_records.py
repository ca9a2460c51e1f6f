"""Record frames the WAL tests append and expect back, and the fixtures' types; no pytest here."""

from __future__ import annotations

import uuid
from collections.abc import Awaitable, Callable

from llmsvc.wal import codec
from llmsvc.wal.codec import FRAME, TOKEN_HEAD
from llmsvc.wal.reader import CHUNK_BYTES
from llmsvc.wal.segment import HEADER_SIZE
from llmsvc.wal.writer import WalWriter

OpenWriter = Callable[..., WalWriter]
"""The `open_writer` fixture: opens a WalWriter on the test's directory, closed at teardown."""
ReadLog = Callable[..., Awaitable[list[tuple[int, bytes]]]]
"""The `read_log` fixture: every record from an LSN on, read with a fresh WalReader."""

ATTEMPT_ID = uuid.UUID(int=0xA77E).bytes
TS_US = 1_700_000_000_000_000


def token(seq: int, text: str = "tok", attempt_id: bytes = ATTEMPT_ID) -> bytes:
    """A token frame; with the default text every token frame has the same size."""
    return codec.encode_token(attempt_id, seq, TS_US + seq, text)


def record_of(frame: bytes) -> tuple[int, bytes]:
    """What decode and the reader return for `frame`: (type, payload)."""
    return frame[FRAME.size - 1], frame[FRAME.size :]


def records_of(frames: list[bytes]) -> list[tuple[int, bytes]]:
    return [record_of(frame) for frame in frames]


def frame_offsets(frames: list[bytes], start: int = 0) -> list[int]:
    """Where each frame starts, plus where the last one ends."""
    offsets = [start]
    for frame in frames:
        offsets.append(offsets[-1] + len(frame))
    return offsets


def aligned_frames() -> list[bytes]:
    """Three token frames; the first fills the first scan chunk exactly, so the chunk ends
    on a frame boundary and decodes to a clean end, with two records still to come."""
    filler = token(1, "x" * (CHUNK_BYTES - FRAME.size - TOKEN_HEAD.size))
    assert len(filler) == CHUNK_BYTES
    return [filler, token(2), token(3)]


def straddling_frames() -> list[bytes]:
    """Three token frames; the second starts one byte before the first scan chunk ends.

    Its payload is 256 bytes, so the only byte of it inside that chunk (the low
    byte of its length) is zero: the chunk ends in what looks like a zero tail.
    """
    filler_text = CHUNK_BYTES - 1 - FRAME.size - TOKEN_HEAD.size
    filler = token(1, "x" * filler_text)
    straddler = token(2, "y" * (256 - TOKEN_HEAD.size))
    assert HEADER_SIZE + len(filler) == HEADER_SIZE + CHUNK_BYTES - 1
    assert straddler[0] == 0
    return [filler, straddler, token(3)]

"""Records to bytes and back; no files here.

A frame is `length u32 | crc32c u32 | type u8 | payload`, little-endian, where
the CRC covers type and payload. Token records, the hot path, have a fixed
binary payload; the rarer lifecycle records carry JSON.
"""

from __future__ import annotations

import struct
from collections.abc import Mapping
from dataclasses import dataclass
from enum import IntEnum
from typing import Any

import orjson
from crc32c import crc32c

FRAME = struct.Struct("<IIB")
MAX_PAYLOAD = 64 * 1024 * 1024
TOKEN_HEAD = struct.Struct("<16sIq")


class RecordType(IntEnum):
    REQUEST_START = 1
    ATTEMPT_START = 2
    TOKEN = 3
    ATTEMPT_END = 4
    REQUEST_END = 5
    TOOL_DELTA = 6  # a tool call's streamed part: the token head, then the delta as JSON


_SEED = {t: crc32c(bytes([t])) for t in RecordType}
_TOKEN_SEED = _SEED[RecordType.TOKEN]


def encode(rtype: RecordType, payload: bytes) -> bytes:
    return FRAME.pack(len(payload), crc32c(payload, _SEED[rtype]), rtype) + payload


def encode_json(rtype: RecordType, body: Mapping[str, Any]) -> bytes:
    return encode(rtype, orjson.dumps(body))


def encode_token(attempt_id: bytes, seq: int, ts_us: int, text: str) -> bytes:
    """The per-token record: 16-byte attempt id, seq, timestamp in µs, UTF-8 text."""
    payload = TOKEN_HEAD.pack(attempt_id, seq, ts_us) + text.encode()
    return FRAME.pack(len(payload), crc32c(payload, _TOKEN_SEED), RecordType.TOKEN) + payload


def encode_tool_delta(attempt_id: bytes, seq: int, ts_us: int, delta: dict[str, Any]) -> bytes:
    """A tool-call delta (`index`, and `id`, `name`, `arguments` as they come), as a token is."""
    return encode(
        RecordType.TOOL_DELTA, TOKEN_HEAD.pack(attempt_id, seq, ts_us) + orjson.dumps(delta)
    )


def fits(frame: bytes) -> bool:
    """Whether `frame` reads back as a record: a payload over MAX_PAYLOAD reads as damage."""
    return len(frame) - FRAME.size <= MAX_PAYLOAD


def decode_token(payload: bytes) -> tuple[bytes, int, str, int]:
    """(attempt id, seq, text, timestamp µs): the order of the token log's columns."""
    attempt_id, seq, ts_us = TOKEN_HEAD.unpack_from(payload)
    return attempt_id, seq, payload[TOKEN_HEAD.size :].decode(), ts_us


def decode_json(payload: bytes) -> dict[str, Any]:
    body: dict[str, Any] = orjson.loads(payload)
    return body


class Stop(IntEnum):
    """Why decoding stopped."""

    END = 0  # consumed every byte
    PARTIAL = 1  # the buffer ends inside a frame
    ZEROS = 2  # only zero bytes follow: an unfinished (torn) write
    CORRUPT = 3  # a frame fails its checks


@dataclass(slots=True)
class Decoded:
    """The valid frames of a buffer, where they end and why decoding stopped there."""

    records: list[tuple[int, bytes]]
    end: int
    stop: Stop


def decode(buf: bytes, start: int = 0, limit: int = -1) -> Decoded:
    """Decode (type, payload) frames from `start` until the buffer or its validity ends.

    With `limit` it stops after that many records (stop END, `end` where the
    next frame starts). Never raises on bad input: damage is reported by
    `stop` and `end`, and no record after the first bad frame is returned.
    """
    records: list[tuple[int, bytes]] = []
    offset, size = start, len(buf)
    unpack, head, seeds = FRAME.unpack_from, FRAME.size, _SEED
    while offset < size and len(records) != limit:
        if size - offset < head:
            return Decoded(records, offset, _tail(buf, offset, Stop.PARTIAL))
        length, crc, rtype = unpack(buf, offset)
        if length > MAX_PAYLOAD or rtype not in seeds:
            return Decoded(records, offset, _tail(buf, offset, Stop.CORRUPT))
        end = offset + head + length
        if end > size:
            return Decoded(records, offset, _tail(buf, offset, Stop.PARTIAL))
        payload = buf[offset + head : end]
        if crc32c(payload, seeds[rtype]) != crc:
            return Decoded(records, offset, _tail(buf, offset, Stop.CORRUPT))
        records.append((rtype, payload))
        offset = end
    return Decoded(records, offset, Stop.END)


def _tail(buf: bytes, offset: int, stop: Stop) -> Stop:
    """Zero bytes from here to the end mean an unfinished write, not damage."""
    return Stop.ZEROS if not buf[offset:].strip(b"\0") else stop

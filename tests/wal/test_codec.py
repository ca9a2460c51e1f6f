"""The record codec: frames round-trip, and damage stops decoding without raising."""

from __future__ import annotations

import random
import uuid
from collections.abc import Callable
from typing import Any

import pytest
from wal_records import frame_offsets, record_of, records_of, token

from llmsvc.wal import codec
from llmsvc.wal.codec import FRAME, MAX_PAYLOAD, RecordType, Stop

TEXTS = [
    "hello",
    "",
    " leading space",
    "héllo wörld",
    "日本語のトークン",
    "🎉👩‍💻",
    "nul\x00inside",
]
JSON_BODIES: list[dict[str, Any]] = [
    {},
    {"text": ""},
    {
        "request_id": str(uuid.UUID(int=7)),
        "model": "gpt-4o-mini",
        "messages": [{"role": "user", "content": "Grüße aus Köln, 世界 🎉"}],
        "params": {"temperature": 0.5, "max_tokens": 10, "stop": None, "stream": True},
    },
]
JSON_TYPES = [t for t in RecordType if t is not RecordType.TOKEN]


@pytest.mark.parametrize("text", TEXTS)
def test_token_record_round_trips(text: str) -> None:
    attempt_id = uuid.uuid4().bytes
    frame = codec.encode_token(attempt_id, 2**32 - 1, -(2**62), text)

    decoded = codec.decode(frame)

    assert decoded.stop is Stop.END
    assert decoded.end == len(frame)
    [(rtype, payload)] = decoded.records
    assert rtype == RecordType.TOKEN
    assert codec.decode_token(payload) == (attempt_id, 2**32 - 1, text, -(2**62))


def test_token_frame_is_the_generic_frame_of_its_payload() -> None:
    frame = token(5, "ß")
    assert codec.encode(RecordType.TOKEN, frame[FRAME.size :]) == frame


@pytest.mark.parametrize("rtype", JSON_TYPES)
@pytest.mark.parametrize("body", JSON_BODIES)
def test_json_record_round_trips(rtype: RecordType, body: dict[str, Any]) -> None:
    frame = codec.encode_json(rtype, body)

    decoded = codec.decode(frame)

    assert decoded.stop is Stop.END
    [(decoded_type, payload)] = decoded.records
    assert decoded_type == rtype
    assert codec.decode_json(payload) == body


def test_many_frames_decode_in_order_from_any_frame_start() -> None:
    frames = _sample_frames()
    buf = b"".join(frames)
    offsets = frame_offsets(frames)

    for i, start in enumerate(offsets):
        decoded = codec.decode(buf, start)
        assert decoded.records == records_of(frames[i:])
        assert (decoded.end, decoded.stop) == (len(buf), Stop.END)


def _sample_frames() -> list[bytes]:
    """Five frames of mixed types; none has a payload length that is a multiple of 256."""
    return [
        token(1, "a"),
        codec.encode_json(RecordType.REQUEST_START, JSON_BODIES[2]),
        token(2, "日本語"),
        token(3, ""),
        codec.encode_json(RecordType.REQUEST_END, {"status": "completed", "cost": 0.25}),
    ]


def _flip(buf: bytearray, at: int) -> bytearray:
    buf[at] ^= 0x40
    return buf


def _set(buf: bytearray, at: int, value: bytes) -> bytearray:
    buf[at : at + len(value)] = value
    return buf


def _zero_from(buf: bytearray, at: int) -> bytearray:
    return _set(buf, at, bytes(len(buf) - at))


Damage = Callable[[bytearray, list[int]], bytearray]
TYPE_AT = FRAME.size - 1
PAYLOAD_AT = FRAME.size

# (damage to a buffer of _sample_frames(), given the frame offsets; why decoding
# stops; how many leading records survive). The one table for codec damage.
DAMAGE_CASES: dict[str, tuple[Damage, Stop, int]] = {
    "intact": (lambda b, o: b, Stop.END, 5),
    "cut at a frame boundary": (lambda b, o: b[: o[3]], Stop.END, 3),
    "cut inside the last frame's header": (lambda b, o: b[: o[4] + 5], Stop.PARTIAL, 4),
    "cut inside the last frame's payload": (lambda b, o: b[:-1], Stop.PARTIAL, 4),
    "cut inside a middle frame": (lambda b, o: b[: o[2] + 12], Stop.PARTIAL, 2),
    "zeros after the last frame": (lambda b, o: b + bytes(4096), Stop.ZEROS, 5),
    "last frame zero-filled": (lambda b, o: _zero_from(b, o[4]), Stop.ZEROS, 4),
    "zero-filled from a middle frame on": (lambda b, o: _zero_from(b, o[2]), Stop.ZEROS, 2),
    "flipped payload byte": (lambda b, o: _flip(b, o[2] + PAYLOAD_AT + 3), Stop.CORRUPT, 2),
    "flipped payload byte in the first frame": (
        lambda b, o: _flip(b, o[0] + PAYLOAD_AT),
        Stop.CORRUPT,
        0,
    ),
    "flipped payload byte in the last frame": (lambda b, o: _flip(b, len(b) - 1), Stop.CORRUPT, 4),
    "flipped crc byte": (lambda b, o: _flip(b, o[1] + 4), Stop.CORRUPT, 1),
    "type byte of another record type": (
        lambda b, o: _set(b, o[2] + TYPE_AT, bytes([RecordType.ATTEMPT_END])),
        Stop.CORRUPT,
        2,
    ),
    "type byte zero": (lambda b, o: _set(b, o[3] + TYPE_AT, b"\x00"), Stop.CORRUPT, 3),
    "type byte unknown": (lambda b, o: _set(b, o[3] + TYPE_AT, b"\xff"), Stop.CORRUPT, 3),
    "length beyond MAX_PAYLOAD": (
        lambda b, o: _set(b, o[1], (MAX_PAYLOAD + 1).to_bytes(4, "little")),
        Stop.CORRUPT,
        1,
    ),
    "garbage after the last frame": (
        lambda b, o: b + bytes(range(1, 200)),
        Stop.CORRUPT,
        5,
    ),
}


@pytest.mark.parametrize(("damage", "stop", "kept"), DAMAGE_CASES.values(), ids=list(DAMAGE_CASES))
def test_decode_stops_at_damage_and_returns_only_the_records_before_it(
    damage: Damage, stop: Stop, kept: int
) -> None:
    frames = _sample_frames()
    offsets = frame_offsets(frames)
    buf = bytes(damage(bytearray(b"".join(frames)), offsets))

    decoded = codec.decode(buf)

    assert decoded.stop is stop
    assert decoded.records == records_of(frames[:kept])
    assert decoded.end == offsets[kept]


def test_valid_frames_after_a_corrupt_one_are_not_returned() -> None:
    frames = _sample_frames()
    offsets = frame_offsets(frames)
    buf = bytes(_flip(bytearray(b"".join(frames)), offsets[1] + PAYLOAD_AT))

    decoded = codec.decode(buf)

    assert decoded.records == [record_of(frames[0])]
    # The frames after the damage are intact and decodable on their own ...
    assert codec.decode(buf, offsets[2]).records == records_of(frames[2:])
    # ... yet decoding from the start never reaches them.
    assert (decoded.end, decoded.stop) == (offsets[1], Stop.CORRUPT)


def _random_frame(rng: random.Random, seq: int) -> bytes:
    if rng.random() < 0.7:
        alphabet = "abcxyz ßé日本🎉\n"
        text = "".join(rng.choice(alphabet) for _ in range(rng.randrange(0, 40)))
        return codec.encode_token(rng.randbytes(16), seq, rng.randrange(2**40), text)
    body = {"seq": seq, "note": "ü" * rng.randrange(0, 30), "n": rng.random()}
    return codec.encode_json(rng.choice(JSON_TYPES), body)


def _damage(rng: random.Random, buf: bytearray, offsets: list[int]) -> str:
    """Apply one random kind of damage in place; return a description for failures."""
    kind = rng.choice(["flip", "truncate", "zero tail", "flip and truncate", "garbage tail"])
    what = kind
    if kind in ("flip", "flip and truncate"):
        at = rng.randrange(len(buf))
        buf[at] ^= rng.randrange(1, 256)
        what += f" @{at}"
    if kind in ("truncate", "flip and truncate"):
        cut = rng.randrange(len(buf) + 1)
        del buf[cut:]
        what += f" cut at {cut}"
    if kind == "zero tail":  # half of them from a frame boundary: a clean torn write
        at = rng.choice(offsets[:-1]) if rng.random() < 0.5 else rng.randrange(len(buf))
        buf[at:] = bytes(len(buf) - at + rng.randrange(0, 64))
        what += f" from {at}"
    if kind == "garbage tail":
        buf += rng.randbytes(rng.randrange(1, 64))
    return what


def test_random_damage_never_raises_nor_returns_a_record_that_was_not_written() -> None:
    rng = random.Random(20240611)
    frames = [_random_frame(rng, seq) for seq in range(60)]
    original = b"".join(frames)
    offsets = frame_offsets(frames)
    expected = records_of(frames)

    for round_ in range(500):
        buf = bytearray(original)
        what = _damage(rng, buf, offsets)

        decoded = codec.decode(bytes(buf))

        # Frames wholly present and unchanged; the first other frame must stop decoding.
        intact = 0
        while intact < len(frames) and offsets[intact + 1] <= len(buf):
            if buf[offsets[intact] : offsets[intact + 1]] != frames[intact]:
                break
            intact += 1
        context = f"round {round_}: {what}"
        assert decoded.records == expected[:intact], context
        assert decoded.end == offsets[intact], context
        assert (decoded.stop is Stop.END) == (len(buf) == offsets[intact]), context

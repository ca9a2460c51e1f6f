"""Property tests: no corruption of a log's bytes gets an invalid record past the reader.

A log of random valid records (any type; empty, small and large-ish payloads)
is damaged at random: bits flipped, cut short, ranges zeroed or overwritten
with garbage, bytes inserted or deleted. Then `codec.decode`, `scan_segment`,
`repair_log` and a `WalReader` over real segment files must never raise
anything but the WAL's own `Corruption`, and every record they return must
be a whole frame whose CRC checks (recomputed here from the raw bytes) and one
of the original records, in the original order. Every original record before
the first damaged byte must still be returned, and decoding may stop only at
a frame that really fails its checks, so a decoder that gave up early fails too.

Examples are derandomized: the same examples every run, no flaky failures, and
a failure found once is found again.
"""

from __future__ import annotations

import asyncio
import random
import tempfile
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from crc32c import crc32c
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from llmsvc.wal import codec
from llmsvc.wal.codec import FRAME, MAX_PAYLOAD, Decoded, RecordType, Stop
from llmsvc.wal.errors import Corruption
from llmsvc.wal.reader import WalReader, scan_segment
from llmsvc.wal.repair import Finding, repair_log
from llmsvc.wal.segment import HEADER_SIZE, Segment, encode_header, instance_id, segment_name

Record = tuple[int, bytes]
Op = tuple[str, int, int, bytes]

PROPERTY = settings(
    deadline=None,
    derandomize=True,
    database=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)

# -- the log and its damage ------------------------------------------------------------

payloads = st.one_of(
    st.just(b""),
    st.binary(min_size=1, max_size=48),
    st.builds(  # large-ish, cheap to draw: many frames' worth, crossing no chunk
        lambda size, seed: random.Random(seed).randbytes(size),
        st.integers(1_000, 70_000),
        st.integers(0, 2**32),
    ),
)
records_strategy = st.lists(st.tuples(st.sampled_from(list(RecordType)), payloads), max_size=12)
position = st.integers(0, 2**20)  # taken modulo the buffer's size when applied
ops_strategy = st.lists(
    st.one_of(
        st.tuples(st.just("flip"), position, st.integers(0, 7), st.just(b"")),
        st.tuples(st.just("truncate"), position, st.just(0), st.just(b"")),
        st.tuples(st.just("zeros"), position, st.integers(1, 600), st.just(b"")),
        st.tuples(st.just("garbage"), position, st.just(0), st.binary(min_size=1, max_size=64)),
        st.tuples(st.just("insert"), position, st.just(0), st.binary(min_size=1, max_size=32)),
        st.tuples(st.just("delete"), position, st.integers(1, 64), st.just(b"")),
    ),
    min_size=1,
    max_size=4,
)


def frames_of(records: list[Record]) -> bytes:
    return b"".join(codec.encode(RecordType(t), p) for t, p in records)


def frame_ends(records: list[Record], start: int = 0) -> list[int]:
    ends, offset = [], start
    for _, payload in records:
        offset += FRAME.size + len(payload)
        ends.append(offset)
    return ends


def corrupt(buf: bytes, ops: list[Op], near: list[int]) -> bytes:
    """Apply each damage in turn. Odd positions land near a frame start, where it hurts most."""
    data = bytearray(buf)
    for kind, pos, n, blob in ops:
        at = near[pos // 2 % len(near)] + pos // 2 % 13 if near and pos % 2 else pos // 2
        at = at % (len(data) + 1)
        if kind == "flip" and data:
            data[at % len(data)] ^= 1 << n
        elif kind == "truncate":
            del data[at:]
        elif kind == "zeros":
            data[at : at + n] = bytes(len(data[at : at + n]))
        elif kind == "garbage":
            data[at : at + len(blob)] = blob
        elif kind == "insert":
            data[at:at] = blob
        elif kind == "delete":
            del data[at : at + n]
    return bytes(data)


# -- what must hold of any decoding -------------------------------------------------------


def whole_valid_frame_at(buf: bytes, offset: int) -> bool:
    """Written here from the format, not from the decoder: does a good frame start here?"""
    if len(buf) - offset < FRAME.size:
        return False
    length = int.from_bytes(buf[offset : offset + 4], "little")
    crc = int.from_bytes(buf[offset + 4 : offset + 8], "little")
    rtype = buf[offset + 8]
    end = offset + FRAME.size + length
    if length > MAX_PAYLOAD or rtype not in {t.value for t in RecordType} or end > len(buf):
        return False
    return crc32c(buf[offset + 8 : end]) == crc  # the CRC covers the type byte and payload


def common_prefix(a: bytes, b: bytes) -> int:
    n = min(len(a), len(b))
    for i in range(n):
        if a[i] != b[i]:
            return i
    return n


def check_records(
    got: list[Record], buf: bytes, start: int, original: list[Record], original_buf: bytes
) -> int:
    """Assert what any reading of `buf` from `start` must satisfy; return where the records end."""
    offset = start
    for rtype, payload in got:
        assert whole_valid_frame_at(buf, offset), f"a record at byte {offset} fails its CRC"
        assert buf[offset + 8] == rtype
        assert buf[offset + FRAME.size : offset + FRAME.size + len(payload)] == payload
        assert int.from_bytes(buf[offset : offset + 4], "little") == len(payload)
        offset += FRAME.size + len(payload)
    remaining = iter(original)
    assert all(any(r == o for o in remaining) for r in got), "a record not written, or reordered"
    intact = common_prefix(original_buf, buf)
    whole = sum(1 for end in frame_ends(original, start) if end <= intact)
    assert got[:whole] == original[:whole], "an undamaged record before the damage is missing"
    return offset


def check_decoded(
    decoded: Decoded, buf: bytes, original: list[Record], original_buf: bytes
) -> None:
    end = check_records(decoded.records, buf, 0, original, original_buf)
    assert decoded.end == end
    if decoded.stop is Stop.END:
        assert end == len(buf)
    else:
        assert end < len(buf)
        assert not whole_valid_frame_at(buf, end), f"stopped at byte {end}, a good frame"
    assert (decoded.stop is Stop.ZEROS) == (
        decoded.stop is not Stop.END and not buf[end:].strip(b"\0")
    )


@settings(PROPERTY, max_examples=400)
@given(records=records_strategy, ops=ops_strategy)
def test_decode_never_raises_and_returns_only_original_records_whose_crc_checks(
    records: list[Record], ops: list[Op]
) -> None:
    original_buf = frames_of(records)
    buf = corrupt(original_buf, ops, [0, *frame_ends(records)[:-1]])

    decoded = codec.decode(buf)

    check_decoded(decoded, buf, records, original_buf)


@settings(PROPERTY, max_examples=50)
@given(records=records_strategy)
def test_decode_returns_an_undamaged_log_whole(records: list[Record]) -> None:
    buf = frames_of(records)

    decoded = codec.decode(buf)

    assert (decoded.records, decoded.end, decoded.stop) == (records, len(buf), Stop.END)


def _skips_crc(buf: bytes) -> Decoded:
    """A decoder that trusts lengths and types but never checks a CRC."""
    records, offset = [], 0
    while len(buf) - offset >= FRAME.size:
        length, _crc, rtype = FRAME.unpack_from(buf, offset)
        if offset + FRAME.size + length > len(buf):
            break
        records.append((rtype, buf[offset + FRAME.size : offset + FRAME.size + length]))
        offset += FRAME.size + length
    return Decoded(records, offset, Stop.END if offset == len(buf) else Stop.PARTIAL)


def _stops_early(buf: bytes) -> Decoded:
    """A decoder that gives up after the first record, calling the rest corrupt."""
    decoded = codec.decode(buf, 0, 1)
    return Decoded(
        decoded.records, decoded.end, Stop.CORRUPT if decoded.end < len(buf) else Stop.END
    )


@pytest.mark.parametrize(
    ("wrong", "damaged"),
    [(_skips_crc, True), (_stops_early, False)],
    ids=["skips the CRC", "stops early"],
)
def test_the_property_fails_a_wrong_decoder(
    wrong: Callable[[bytes], Decoded], damaged: bool
) -> None:
    records: list[Record] = [(RecordType.TOKEN, b"abcdefgh" * 4), (RecordType.REQUEST_END, b"{}")]
    original_buf = frames_of(records)
    flip_payload = [("flip", 2 * (FRAME.size + 5), 0, b"")]
    buf = corrupt(original_buf, flip_payload, []) if damaged else original_buf
    check_decoded(codec.decode(buf), buf, records, original_buf)  # the real decoder passes

    with pytest.raises(AssertionError):
        check_decoded(wrong(buf), buf, records, original_buf)


# -- real segment files: scan, repair, read ------------------------------------------------


@st.composite
def two_segments(draw: st.DrawFn) -> tuple[list[Record], list[Record]]:
    """A log split into an older segment (at least one record) and the newest (maybe empty)."""
    records = draw(records_strategy.filter(bool))
    split = draw(st.integers(1, len(records)))
    return records[:split], records[split:]


@pytest.fixture(scope="module")
def scratch(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """A parent for one fresh WAL directory per example (function fixtures are not reset)."""
    return tmp_path_factory.mktemp("property")


def read_all(wal_dir: Path, wal_id: uuid.UUID) -> tuple[list[Record], BaseException | None]:
    """Every record a fresh WalReader returns from LSN 1, and what it raised, if anything."""

    async def run() -> tuple[list[Record], BaseException | None]:
        reader = WalReader(wal_dir, wal_id)
        got: list[Record] = []
        try:
            await reader.seek(1)
            while batch := await reader.read(None, 5):
                got += batch
        except Exception as exc:
            return got, exc
        finally:
            await reader.close()
        return got, None

    return asyncio.run(run())


@settings(PROPERTY, max_examples=120)
@given(
    log=two_segments(),
    older_ops=st.lists(ops_strategy, max_size=1),
    newest_ops=st.lists(ops_strategy, max_size=1),
)
def test_scan_repair_and_reader_return_only_valid_original_records(
    scratch: Path,
    log: tuple[list[Record], list[Record]],
    older_ops: list[list[Op]],
    newest_ops: list[list[Op]],
) -> None:
    with tempfile.TemporaryDirectory(dir=scratch) as tmp:
        wal_dir = Path(tmp)
        wal_id = instance_id(wal_dir)
        first_lsns = [1, 1 + len(log[0])]
        expected: list[Record] = []  # what must be read back after repair
        kept: list[tuple[int, int]] = []  # (first LSN, records) of the segments repair keeps
        cuts: dict[str, bytes] = {}
        for first_lsn, records, ops in zip(first_lsns, log, [older_ops, newest_ops], strict=True):
            original = encode_header(wal_id, first_lsn) + frames_of(records)
            near = [0, *frame_ends(records, HEADER_SIZE)[:-1]]
            damaged = corrupt(original, ops[0], near) if ops else original
            segment = Segment(wal_dir / segment_name(first_lsn), first_lsn)
            segment.path.write_bytes(damaged)

            got: list[Record] = []
            try:
                scan = scan_segment(segment, wal_id, got.extend)
            except Corruption:
                assert damaged[:HEADER_SIZE] != original[:HEADER_SIZE]  # only a header raises
                cuts[segment.path.name] = damaged
                continue
            assert damaged[:HEADER_SIZE] == original[:HEADER_SIZE]
            end = check_records(got, damaged, HEADER_SIZE, records, original)
            assert (scan.records, scan.end, scan.size) == (len(got), end, len(damaged))
            if scan.stop is not Stop.END:
                assert not whole_valid_frame_at(damaged, end)
                cuts[segment.path.name] = damaged[end:]
            expected += got
            kept.append((first_lsn, len(got)))

        # Unrepaired, the reader returns valid records, then at most a Corruption.
        before, error = read_all(wal_dir, wal_id)
        assert error is None or isinstance(error, Corruption), repr(error)
        assert before == expected[: len(before)]

        repairs = repair_log(wal_dir, wal_id, 0)

        assert {f.segment: (wal_dir / f.kept).read_bytes() for f in repairs.findings} == cuts
        assert all(isinstance(f, Finding) and f.kept for f in repairs.findings)
        lost, next_lsn = [], 1
        for first_lsn, count in kept:
            if first_lsn > next_lsn:
                lost.append((next_lsn, first_lsn - 1))
            next_lsn = max(next_lsn, first_lsn + count)
        assert repairs.lost == lost
        after, error = read_all(wal_dir, wal_id)
        assert error is None, repr(error)
        assert after == expected
        again = repair_log(wal_dir, wal_id, 0)
        assert (again.findings, again.lost) == ([], lost)

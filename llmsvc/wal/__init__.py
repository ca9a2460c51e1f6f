"""The write-ahead log: every record is journaled here before a client sees it.

On-disk format (version 1)
--------------------------
`wal_dir` holds segment files named by the LSN of their first record in 16
hex digits (`0000000000000001.wal`), plus `instance_id` (this daemon's UUID,
created once) and `LOCK` (an flock held by the running daemon).

A segment starts with a 36-byte header::

    magic "LWAL" | version u16 | flags u16 | instance id (16 bytes) | first LSN u64 | crc32c u32

followed by frames, little-endian::

    payload length u32 | crc32c(type byte + payload) u32 | type u8 | payload

LSNs number records from 1 across segments; a record's LSN is its segment's
first LSN plus its index in the segment, so a missing segment shows as a gap
in the names. Token records (type 3) carry `attempt id (16) | seq u32 |
timestamp µs i64 | UTF-8 text`; the others carry a JSON object (`records.py`
types each lifecycle body).

Guarantees
----------
`wal_sync = "write"` (default): a record is acknowledged once write(2) has
handed it to the kernel; a syncer thread fdatasyncs every
`wal_fsync_interval_ms`. Survives a daemon crash (kill -9, OOM); a power loss
can lose at most the last interval.

`wal_sync = "fsync"`: a record is acknowledged after the fdatasync of its
batch (group commit: one fdatasync serves every stream waiting). Survives
power loss.

A failed fsync (or a write failing other than for space) is fatal: the
daemon exits non-zero and recovers from the log on restart. A full disk is
not: requests are refused with 503 until space returns. At open the log is
repaired (`repair.py`): the end of the newest segment that fails its checks
is copied to `<segment>.broken` and cut off; damage elsewhere (a bad frame in
an older segment, another instance's or an unreadable file) goes to
`quarantine/`; LSNs missing above the database checkpoint are reported as
lost and skipped. Nothing is deleted and nothing invalid is replayed.

The rest of llmsvc imports from this package only, never its modules: `__all__`
is the WAL's public face (the format's records, the directory's identity, lock
and segments, verify and refill's reads, the writer and the flusher's reader).
"""

from llmsvc.wal.codec import (
    MAX_PAYLOAD,
    RecordType,
    decode_json,
    decode_token,
    encode_json,
    encode_token,
    encode_tool_delta,
    fits,
)
from llmsvc.wal.errors import Damage
from llmsvc.wal.reader import Position, WalReader, scan_log, verify_log
from llmsvc.wal.records import (
    Api,
    AttemptEnd,
    AttemptEndFields,
    AttemptStart,
    Deployment,
    RequestEnd,
    RequestEndFields,
    RequestStart,
    Sender,
    Status,
)
from llmsvc.wal.repair import QUARANTINE_DIR, Repairs, quarantined
from llmsvc.wal.segment import (
    HEADER_SIZE,
    Segment,
    WalLock,
    instance_id,
    list_segments,
    lock_holder,
    read_instance_id,
)
from llmsvc.wal.writer import WalWriter

__all__ = [
    "HEADER_SIZE",
    "MAX_PAYLOAD",
    "QUARANTINE_DIR",
    "Api",
    "AttemptEnd",
    "AttemptEndFields",
    "AttemptStart",
    "Damage",
    "Deployment",
    "Position",
    "RecordType",
    "Repairs",
    "RequestEnd",
    "RequestEndFields",
    "RequestStart",
    "Segment",
    "Sender",
    "Status",
    "WalLock",
    "WalReader",
    "WalWriter",
    "decode_json",
    "decode_token",
    "encode_json",
    "encode_token",
    "encode_tool_delta",
    "fits",
    "instance_id",
    "list_segments",
    "lock_holder",
    "quarantined",
    "read_instance_id",
    "scan_log",
    "verify_log",
]

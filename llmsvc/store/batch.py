"""WAL records to rows: the flusher's CPU work, kept free of I/O so it can run in a thread.

A request or attempt that starts and ends within one batch is inserted
whole; an end whose start was flushed earlier becomes an update. Token rows
are built in each dialect's own form; the others are formed at write time as
SQLAlchemy would bind them (`driver_values`).
"""

from __future__ import annotations

import functools
import json
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any, cast

import sqlalchemy as sa

from llmsvc.wal import (
    AttemptEnd,
    AttemptStart,
    RecordType,
    RequestEnd,
    RequestStart,
    Status,
    decode_json,
    decode_token,
)

Token = tuple[bytes, int, str, int]  # attempt id, seq, text, timestamp µs
Row = tuple[Any, ...]

# The columns an end record fills (`_request_end`, `_attempt_end`): the flusher's updates.
REQUEST_END_COLUMNS: tuple[str, ...] = (
    "status",
    "ended_at",
    "prompt_tokens",
    "completion_tokens",
    "cost",
)
REQUEST_END_COLUMNS += ("provider", "error", "prompt_tokens_source", "completion_tokens_source")
ATTEMPT_END_COLUMNS: tuple[str, ...] = (
    "status",
    "first_token_at",
    "ended_at",
    "http_status",
    "error_code",
)
ATTEMPT_END_COLUMNS += ("error_message", "prompt_tokens", "completion_tokens", "token_count")
ATTEMPT_END_COLUMNS += ("finish_reason", "stop_reason")
STREAMING: Status = "streaming"  # a row's status until its end record arrives
# Who sent a request: columns from its start record's fields, absent in records from
# before attribution (NULL) and present only when known (gateway/attribution.py).
ATTRIBUTION_COLUMNS: tuple[str, ...] = ("key_id", "team_id", "end_user", "metadata")
ATTRIBUTION_COLUMNS += ("session_id", "environment", "version")


def utc(us: int | None) -> datetime | None:
    return None if us is None else datetime.fromtimestamp(us / 1e6, UTC)


@dataclass
class Batch:
    """One transaction's worth of rows, built from consecutive WAL records.

    A request or attempt that starts and ends within the batch is inserted
    whole; an end whose start was flushed earlier becomes an update.
    """

    last_lsn: int
    requests: dict[uuid.UUID, dict[str, Any]] = field(default_factory=dict)
    attempts: dict[uuid.UUID, dict[str, Any]] = field(default_factory=dict)
    tokens: list[Token] = field(default_factory=list)
    token_rows: list[Row] = field(default_factory=list)  # in the dialect's form
    request_ends: list[dict[str, Any]] = field(default_factory=list)
    attempt_ends: list[dict[str, Any]] = field(default_factory=list)
    tool_rows: list[dict[str, Any]] = field(default_factory=list)  # llm_tool_calls rows
    # For attempts whose request started outside this batch: inserted only where the
    # request has no row, which happens only when WAL damage took its start record.
    stand_ins: dict[uuid.UUID, dict[str, Any]] = field(default_factory=dict)

    @property
    def size(self) -> int:
        return len(self.requests) + len(self.attempts) + len(self.tokens) + len(self.tool_rows)


def build_batch(
    records: list[tuple[int, bytes]], last_lsn: int, instance_id: uuid.UUID, dialect: str
) -> Batch:
    """Decode records into rows; CPU work only, so the flusher runs it in a worker thread."""
    batch = Batch(last_lsn)
    add_token = batch.tokens.append
    parsed: dict[str, uuid.UUID] = {}

    def uid(text: str) -> uuid.UUID:
        """An id of the batch's records, parsed once: a request's is in three of them."""
        found = parsed.get(text)
        if found is None:
            found = parsed[text] = uuid.UUID(text)
        return found

    for rtype, payload in records:
        if rtype == RecordType.TOKEN:
            add_token(decode_token(payload))
            continue
        if rtype == RecordType.TOOL_DELTA:
            batch.tool_rows.append(_tool_row(payload))
            continue
        body = decode_json(payload)
        if rtype == RecordType.REQUEST_START:
            row = _request_row(cast(RequestStart, body), instance_id, uid)
            batch.requests[row["id"]] = row
        elif rtype == RecordType.ATTEMPT_START:
            row = _attempt_row(cast(AttemptStart, body), uid)
            batch.attempts[row["id"]] = row
        elif rtype == RecordType.ATTEMPT_END:
            ended = _attempt_end(cast(AttemptEnd, body))
            _end(batch.attempts, batch.attempt_ends, uid(body["id"]), ended)
        elif rtype == RecordType.REQUEST_END:
            ended = _request_end(cast(RequestEnd, body))
            _end(batch.requests, batch.request_ends, uid(body["id"]), ended)
    for attempt in batch.attempts.values():
        if attempt["request_id"] not in batch.requests:
            batch.stand_ins[attempt["request_id"]] = _stand_in_row(attempt, instance_id)
    batch.token_rows = TOKEN_ROWS[dialect](batch.tokens)
    if dialect == "postgresql" and any(
        JSON_NUL in payload for rtype, payload in records if rtype != RecordType.TOKEN
    ):
        _no_nul_rows(batch)  # rare: walking every row's values was a seventh of a flush
    return batch


def _request_row(
    body: RequestStart, instance_id: uuid.UUID, uid: Callable[[str], uuid.UUID]
) -> dict[str, Any]:
    return {
        "id": uid(body["id"]),
        "instance_id": instance_id,
        "correlation_id": body["correlation_id"],  # as the client sent it; older WALs: a UUID
        "model": body["model"],
        "stream": body["stream"],
        "status": STREAMING,
        "messages": body["messages"],
        "params": body["params"],
        "created_at": utc(body["ts"]),
        **dict.fromkeys(REQUEST_END_COLUMNS[1:]),
        "key_id": _uuid(body.get("key_id")),
        "team_id": _uuid(body.get("team_id")),
        "end_user": body.get("user"),
        "metadata": body.get("metadata"),
        "session_id": body.get("session_id"),
        "environment": body.get("environment"),
        "version": body.get("version"),
        "api": body.get("api", "chat"),
    }


def _uuid(value: str | None) -> uuid.UUID | None:
    return None if value is None else uuid.UUID(value)


def _tool_row(payload: bytes) -> dict[str, Any]:
    attempt_id, seq, text, us = decode_token(payload)
    delta = decode_json(text.encode())
    return {
        "attempt_id": uuid.UUID(bytes=attempt_id),
        "seq": seq,
        "call_index": delta.get("index", 0),
        "call_id": delta.get("id"),
        "name": delta.get("name"),
        "arguments": delta.get("arguments") or "",
        "created_at": utc(us),
    }


def _stand_in_row(attempt: dict[str, Any], instance_id: uuid.UUID) -> dict[str, Any]:
    """A request row for an attempt whose request's start record is gone.

    The attempt and its tokens are valid records a client may have received;
    the request's own end, if journaled, still completes this row.
    """
    return {
        "id": attempt["request_id"],
        "instance_id": instance_id,
        "correlation_id": str(uuid.UUID(int=0)),
        "model": attempt["model"],
        "stream": True,
        "status": STREAMING,
        "messages": [],
        "params": {},
        "created_at": attempt["started_at"],
        **dict.fromkeys(REQUEST_END_COLUMNS[1:]),
        **dict.fromkeys(ATTRIBUTION_COLUMNS),
        "api": None,
        "error": LOST_START,
    }


LOST_START = (
    "its start record was lost to WAL damage or refused by the database: "
    "model is the attempt's, prompt unknown"
)


def _attempt_row(body: AttemptStart, uid: Callable[[str], uuid.UUID]) -> dict[str, Any]:
    return {
        "id": uid(body["id"]),
        "request_id": uid(body["request_id"]),
        "attempt_no": body["attempt_no"],
        "provider": body["provider"],
        "model": body["model"],
        "status": STREAMING,
        "started_at": utc(body["ts"]),
        **dict.fromkeys(ATTEMPT_END_COLUMNS[1:]),
    }


def _request_end(body: RequestEnd) -> dict[str, Any]:
    """The REQUEST_END_COLUMNS an end fills; fields an older version did not write are NULL."""
    return {
        "status": body.get("status"),
        "ended_at": utc(body["ts"]),
        "prompt_tokens": body.get("prompt_tokens"),
        "completion_tokens": body.get("completion_tokens"),
        "cost": body.get("cost"),
        "provider": body.get("provider"),
        "error": body.get("error"),
        "prompt_tokens_source": body.get("prompt_tokens_source"),
        "completion_tokens_source": body.get("completion_tokens_source"),
    }


def _attempt_end(body: AttemptEnd) -> dict[str, Any]:
    """The ATTEMPT_END_COLUMNS an end fills, as `_request_end`."""
    return {
        "status": body.get("status"),
        "first_token_at": utc(body.get("first_token_ts")),
        "ended_at": utc(body["ts"]),
        "http_status": body.get("http_status"),
        "error_code": body.get("error_code"),
        "error_message": body.get("error_message"),
        "prompt_tokens": body.get("prompt_tokens"),
        "completion_tokens": body.get("completion_tokens"),
        "token_count": body.get("token_count"),
        "finish_reason": body.get("finish_reason"),
        "stop_reason": body.get("stop_reason"),
    }


def _end(
    started: dict[uuid.UUID, dict[str, Any]],
    ends: list[dict[str, Any]],
    key: uuid.UUID,
    values: dict[str, Any],
) -> None:
    """Complete the row started in this batch, or update the one flushed before."""
    if key in started:
        started[key].update(values)
    else:
        ends.append({"key": key, **values})


SQLITE_SECOND = "%Y-%m-%d %H:%M:%S"  # SQLAlchemy's storage format for DateTime on SQLite,
# then ".%f": the microseconds are appended as digits


def _sqlite_rows(tokens: list[Token]) -> list[Row]:
    """Ids and times in the text forms SQLAlchemy uses on SQLite.

    The tokens of one upstream read share a timestamp, and one attempt an id,
    so each is formatted once per run of equal values, not once per token; and
    a time's date and second (strftime, ~3 µs) once per second: a paced stream's
    every token has a time of its own.
    """
    hexes: dict[bytes, str] = {}
    rows: list[Row] = []
    last_us, stamp = -1, ""
    last_second, second = -1, ""
    for aid, seq, text, us in tokens:
        if us != last_us:
            whole, micro = divmod(us, 1_000_000)
            if whole != last_second:
                last_second = whole
                second = datetime.fromtimestamp(whole, UTC).strftime(SQLITE_SECOND)
            last_us, stamp = us, f"{second}.{micro:06d}"
        rows.append((hexes.get(aid) or hexes.setdefault(aid, aid.hex()), seq, text, stamp))
    return rows


def driver_values(
    dialect: str, table: sa.Table, names: tuple[str, ...], rows: list[dict[str, Any]]
) -> list[Row]:
    """Rows of `table` as tuples of `names`, each value in the form SQLAlchemy would bind it
    for the dialect's driver, for an executemany without its per-row bind processing (a
    fifth of a whole request's flush on SQLite). A name that is not a column is the row's
    key: its id."""
    forms = _forms(dialect, table, names)
    return [tuple([form(row[name]) for name, form in forms]) for row in rows]


@functools.cache
def _forms(
    dialect: str, table: sa.Table, names: tuple[str, ...]
) -> tuple[tuple[str, Callable[[Any], Any]], ...]:
    """What SQLAlchemy's types do to a value before the driver binds it: JSON (None too)
    becomes its `json.dumps`; on SQLite a UUID becomes its 32 hex digits and a time its text
    with microseconds, while asyncpg takes both as they are."""
    on_sqlite = dialect == "sqlite"
    forms: list[tuple[str, Callable[[Any], Any]]] = []
    for name in names:
        kind = table.c[name if name in table.c else "id"].type
        if isinstance(kind, sa.JSON):
            forms.append((name, json.dumps))
        elif on_sqlite and isinstance(kind, sa.Uuid):
            forms.append((name, _sqlite_uuid))
        elif on_sqlite and isinstance(kind, sa.DateTime):
            forms.append((name, _sqlite_time))
        else:
            forms.append((name, _as_is))
    return tuple(forms)


def _sqlite_uuid(value: uuid.UUID | None) -> str | None:
    return None if value is None else value.hex


def _sqlite_time(value: datetime | None) -> str | None:
    """`2026-12-07 13:01:02.000000`: the wall time of a UTC datetime, without its zone."""
    return None if value is None else value.isoformat(" ", "microseconds")[:26]


def _as_is(value: Any) -> Any:
    return value


def _postgres_rows(tokens: list[Token]) -> list[Row]:
    ids: dict[bytes, uuid.UUID] = {}
    return [
        (
            ids.get(a) or ids.setdefault(a, uuid.UUID(bytes=a)),
            s,
            t if "\x00" not in t else _no_nul(t),
            u,
        )
        for a, s, t, u in tokens
    ]


TOKEN_ROWS: dict[str, Callable[[list[Token]], list[Row]]] = {
    "sqlite": _sqlite_rows,
    "postgresql": _postgres_rows,
}


# How a JSON record (orjson's, and any JSON) writes U+0000: the rows of a batch whose records
# lack it hold none, and tokens are seen to one by one (`_postgres_rows`).
JSON_NUL = b"\\u0000"


def _no_nul(value: Any) -> Any:
    """PostgreSQL text and jsonb cannot hold U+0000: store it as U+FFFD instead of failing.

    A batch the database refuses would otherwise be retried forever and hold
    back every record after it.
    """
    if isinstance(value, str):
        return value.replace("\x00", "\ufffd") if "\x00" in value else value
    if isinstance(value, list):
        return [_no_nul(v) for v in value]
    if isinstance(value, dict):
        return {_no_nul(k): _no_nul(v) for k, v in value.items()}
    return value


def _no_nul_rows(batch: Batch) -> None:
    batch.requests = {k: _no_nul(row) for k, row in batch.requests.items()}
    batch.attempts = {k: _no_nul(row) for k, row in batch.attempts.items()}
    batch.request_ends = [_no_nul(row) for row in batch.request_ends]
    batch.attempt_ends = [_no_nul(row) for row in batch.attempt_ends]
    batch.tool_rows = [_no_nul(row) for row in batch.tool_rows]

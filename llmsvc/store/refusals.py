"""Records the database refuses: telling a refusal from an outage, and what to store instead.

A batch that fails because the database is away is retried whole until it
returns. A batch that fails because of what one record holds (a number past a
column's range, a character the database cannot store, a value of the wrong
type) would fail forever and hold back every record after it; the flusher
splits it to find that record (`Flusher._isolate`), then stores it in a form
the database takes (`fit_batch`) or, failing that, only in `llm_dead_letters`.
"""

from __future__ import annotations

import math
import sqlite3
import uuid
from datetime import UTC, datetime
from typing import Any

import sqlalchemy as sa

from llmsvc.store.batch import Batch
from llmsvc.store.schema import llm_attempts, llm_requests, llm_tool_calls
from llmsvc.wal import RecordType, decode_json, decode_token

# SQLSTATE classes of PostgreSQL errors about the data itself: 22 data exception (out of
# range, untranslatable character, too long), 23 integrity constraint violation.
DATA_SQLSTATE_CLASSES = ("22", "23")
# Python errors a driver raises while binding a value it cannot take, or the batch builder
# raises for a record it cannot decode.
DATA_EXCEPTIONS = (ValueError, TypeError, OverflowError, KeyError, UnicodeError)
SQLITE_BINDING = "Error binding parameter"

INT4 = (-(2**31), 2**31 - 1)
INT8 = (-(2**63), 2**63 - 1)


class Undecodable(ValueError):
    """Records that cannot be turned into rows at all (a body without a field it needs)."""


def refused(exc: BaseException) -> bool:
    """True when the database (or its driver) refused the data, not when it is unreachable.

    Anything unknown counts as an outage: a batch retried too long is safe,
    a record set aside while the database was merely away is not.
    """
    cause: BaseException = exc
    if isinstance(exc, sa.exc.StatementError) and exc.orig is not None:
        cause = exc.orig
    if isinstance(exc, sa.exc.DataError | sa.exc.IntegrityError):
        return True
    sqlstate = getattr(cause, "sqlstate", None) or getattr(cause, "pgcode", None)
    if isinstance(sqlstate, str) and sqlstate[:2] in DATA_SQLSTATE_CLASSES:
        return True
    if isinstance(cause, sqlite3.IntegrityError | sqlite3.DataError):  # from the driver itself
        return True
    if type(cause).__module__ == "sqlite3" and SQLITE_BINDING in str(cause):
        return True
    # asyncpg refuses a value it cannot encode with an exception that is also a ValueError
    # or TypeError; a connection failure never is one.
    return isinstance(cause, DATA_EXCEPTIONS) and not isinstance(cause, OSError | TimeoutError)


def fit_batch(batch: Batch) -> Batch:
    """The batch with every value made to fit its column: U+0000 and over-long text
    replaced or cut, numbers out of range or of the wrong type dropped (NULL).

    Raises ValueError when a row cannot be made to fit (an id that is not a UUID).
    """
    fitted = Batch(batch.last_lsn)
    fitted.requests = {k: _fit(llm_requests, row) for k, row in batch.requests.items()}
    fitted.attempts = {k: _fit(llm_attempts, row) for k, row in batch.attempts.items()}
    fitted.stand_ins = {k: _fit(llm_requests, row) for k, row in batch.stand_ins.items()}
    fitted.request_ends = [_fit(llm_requests, row) for row in batch.request_ends]
    fitted.attempt_ends = [_fit(llm_attempts, row) for row in batch.attempt_ends]
    fitted.tool_rows = [_fit(llm_tool_calls, row) for row in batch.tool_rows]
    fitted.tokens = batch.tokens
    fitted.token_rows = [(*row[:2], _text(row[2]), *row[3:]) for row in batch.token_rows]
    return fitted


def _fit(table: sa.Table, row: dict[str, Any]) -> dict[str, Any]:
    return {
        name: _fit_value(table.c[name], value) if name in table.c else value
        for name, value in row.items()
    }


def _fit_value(column: sa.Column[Any], value: Any) -> Any:
    """A value the column takes; NULL (or the type's zero when the column needs one) if none."""
    kind = column.type
    fitted: Any = None
    if value is None:
        return None
    if isinstance(kind, sa.Uuid):
        return value if isinstance(value, uuid.UUID) else uuid.UUID(str(value))
    if isinstance(kind, sa.Integer):
        low, high = INT8 if isinstance(kind, sa.BigInteger) else INT4
        if isinstance(value, int) and not isinstance(value, bool) and low <= value <= high:
            fitted = value
    elif isinstance(kind, sa.Float):
        if isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value):
            fitted = float(value)
    elif isinstance(kind, sa.Boolean):
        fitted = value if isinstance(value, bool) else None
    elif isinstance(kind, sa.DateTime):
        fitted = value if isinstance(value, datetime) else None
    elif isinstance(kind, sa.JSON):
        fitted = _json(value)
    elif isinstance(kind, sa.String):  # Text too
        fitted = _text(value if isinstance(value, str) else str(value))
        if kind.length is not None:
            fitted = fitted[: kind.length]
    if fitted is None and not column.nullable:
        fitted = _zero(column)
    return fitted


def _zero(column: sa.Column[Any]) -> Any:
    kind = column.type
    if isinstance(kind, sa.Integer):
        return 0
    if isinstance(kind, sa.Float):
        return 0.0
    if isinstance(kind, sa.Boolean):
        return False
    if isinstance(kind, sa.DateTime):
        return datetime.now(UTC)
    if isinstance(kind, sa.JSON):
        return {}
    return ""


def _text(value: str) -> str:
    """Text every database stores: no U+0000 (PostgreSQL refuses it), no lone surrogate."""
    if "\x00" in value:
        value = value.replace("\x00", "\ufffd")
    return value.encode("utf-8", "replace").decode("utf-8")


def _json(value: Any) -> Any:
    """JSON every database stores: keys and strings as `_text`, numbers finite and in range."""
    if isinstance(value, str):
        return _text(value)
    if isinstance(value, bool) or value is None:
        return value
    if isinstance(value, int):
        return value if INT8[0] <= value <= INT8[1] else float(value)
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {_text(str(k)): _json(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_json(v) for v in value]
    return _text(str(value))


def dead_letter_row(
    instance_id: uuid.UUID, lsn: int, rtype: int, payload: bytes, outcome: str, reason: str
) -> dict[str, Any]:
    """The `llm_dead_letters` row keeping a refused record whole, with what it belongs to."""
    request_id, attempt_id = _owner(rtype, payload)
    try:
        name = RecordType(rtype).name.lower()
    except ValueError:
        name = f"type_{rtype}"
    return {
        "instance_id": instance_id,
        "lsn": lsn,
        "record_type": name,
        "request_id": request_id,
        "attempt_id": attempt_id,
        "outcome": outcome,
        "reason": _text(reason),
        "payload": payload,
        "created_at": datetime.now(UTC),
    }


def _owner(rtype: int, payload: bytes) -> tuple[uuid.UUID | None, uuid.UUID | None]:
    """The request and attempt a record belongs to, as far as it can be decoded."""
    try:
        if rtype in (RecordType.TOKEN, RecordType.TOOL_DELTA):
            return None, uuid.UUID(bytes=decode_token(payload)[0])
        body = decode_json(payload)
        if rtype in (RecordType.REQUEST_START, RecordType.REQUEST_END):
            return uuid.UUID(str(body["id"])), None
        if rtype == RecordType.ATTEMPT_START:
            return uuid.UUID(str(body["request_id"])), uuid.UUID(str(body["id"]))
        return None, uuid.UUID(str(body["id"]))
    except (*DATA_EXCEPTIONS, IndexError):
        return None, None

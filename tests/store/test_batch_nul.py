"""U+0000 in any record a batch holds reaches PostgreSQL's rows as U+FFFD (its text and jsonb
cannot hold U+0000), while a batch whose records hold none is not walked for it."""

from __future__ import annotations

import uuid
from typing import Any

import orjson
import pytest

from llmsvc.store.batch import build_batch
from llmsvc.wal import RecordType
from llmsvc.wal.codec import FRAME, encode_tool_delta

REQUEST, ATTEMPT = str(uuid.uuid4()), str(uuid.uuid4())
TS = 1_700_000_000_000_000


def _records(nul_in: str) -> list[tuple[int, bytes]]:
    def text(where: str) -> str:
        return "a\x00b" if where == nul_in else "ab"

    start = {"id": REQUEST, "correlation_id": text("correlation"), "model": "m", "stream": True,
             "messages": [{"role": "user", "content": text("prompt")}],
             "params": {"metadata": {text("metadata key"): "v"}}, "ts": TS}  # fmt: skip
    attempt = {"id": ATTEMPT, "request_id": REQUEST, "attempt_no": 1, "provider": "p",
               "model": "m", "ts": TS}  # fmt: skip
    delta = {"index": 0, "id": "c", "name": "f", "arguments": text("tool arguments")}
    attempt_end = {"id": ATTEMPT, "ts": TS + 2, "status": "failed",
                   "error_message": text("upstream error")}  # fmt: skip
    request_end = {"id": REQUEST, "ts": TS + 3, "status": "failed", "error": text("error")}
    tool_delta = encode_tool_delta(uuid.UUID(ATTEMPT).bytes, 0, TS + 1, delta)
    return [
        (RecordType.REQUEST_START, orjson.dumps(start)),
        (RecordType.ATTEMPT_START, orjson.dumps(attempt)),
        (RecordType.TOOL_DELTA, tool_delta[FRAME.size :]),  # a record's payload
        (RecordType.ATTEMPT_END, orjson.dumps(attempt_end)),
        (RecordType.REQUEST_END, orjson.dumps(request_end)),
    ]


def _strings(value: Any) -> list[str]:
    if isinstance(value, str):
        return [value]
    if isinstance(value, dict):
        return [s for k, v in value.items() for s in _strings(k) + _strings(v)]
    if isinstance(value, list | tuple):
        return [s for v in value for s in _strings(v)]
    return []


@pytest.mark.parametrize(
    "nul_in",
    ["correlation", "prompt", "metadata key", "tool arguments", "upstream error", "error"],
)
def test_a_nul_in_any_json_record_is_replaced_in_postgresql_rows(nul_in: str) -> None:
    batch = build_batch(_records(nul_in), 5, uuid.uuid4(), "postgresql")

    rows = [*batch.requests.values(), *batch.attempts.values(), *batch.tool_rows]
    strings = _strings(rows)
    assert not [s for s in strings if "\x00" in s]
    assert "a\ufffdb" in strings


def test_sqlite_keeps_a_nul_as_sent() -> None:
    batch = build_batch(_records("prompt"), 5, uuid.uuid4(), "sqlite")

    (request,) = batch.requests.values()
    assert request["messages"] == [{"role": "user", "content": "a\x00b"}]

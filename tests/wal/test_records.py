"""The lifecycle records' bytes: typed bodies must journal exactly what version 1 wrote."""

from __future__ import annotations

import asyncio
import uuid

from wal_records import OpenWriter, ReadLog

from llmsvc.gateway.attribution import deployment_fields
from llmsvc.gateway.journal import Journal
from llmsvc.wal import RecordType, decode_json

REQUEST_ID, ATTEMPT_ID, KEY_ID = uuid.UUID(int=1), uuid.UUID(int=2), uuid.UUID(int=3)
# Each body as version 1 writes it, keys in this order; <ts> is the record's own time.
EXPECTED = [
    (
        RecordType.REQUEST_START,
        '{"id":"<rid>","correlation_id":"corr-1","model":"gpt-4o-mini","stream":true,'
        '"messages":[{"role":"user","content":"hi"}],"params":{"temperature":0.5},"ts":<ts>,'
        '"environment":"prod","version":"1.2","key_id":"<kid>","user":"u-1",'
        '"metadata":{"team":"a"},"session_id":"s-1"}',
    ),
    (
        RecordType.ATTEMPT_START,
        '{"id":"<aid>","request_id":"<rid>","attempt_no":1,"provider":"openai",'
        '"model":"gpt-4o-mini","ts":<ts>}',
    ),
    (
        RecordType.ATTEMPT_END,
        '{"id":"<aid>","ts":<ts>,"status":"completed","http_status":200,"error_code":null,'
        '"error_message":null,"prompt_tokens":3,"completion_tokens":2,"token_count":2,'
        '"first_token_ts":5}',
    ),
    (
        RecordType.REQUEST_END,
        '{"id":"<rid>","ts":<ts>,"status":"completed","prompt_tokens":3,"completion_tokens":2,'
        '"prompt_tokens_source":"provider","completion_tokens_source":null,"cost":0.25,'
        '"provider":"openai","error":null}',
    ),
    (
        RecordType.ATTEMPT_END,
        '{"id":"<aid>","ts":<ts>,"status":"interrupted","token_count":2,"error_code":"restart",'
        '"error_message":"stopped"}',
    ),
    (RecordType.REQUEST_END, '{"id":"<rid>","ts":<ts>,"status":"interrupted","error":"stopped"}'),
]


async def test_the_journal_writes_each_lifecycle_record_as_version_1_did(
    open_writer: OpenWriter, read_log: ReadLog
) -> None:
    journal = Journal(open_writer(), deployment_fields("prod", "1.2"))
    sender = {"key_id": str(KEY_ID), "user": "u-1", "metadata": {"team": "a"}, "session_id": "s-1"}
    messages = [{"role": "user", "content": "hi"}]
    journal.request_start(
        REQUEST_ID, "corr-1", "gpt-4o-mini", True, messages, {"temperature": 0.5}, sender
    )
    journal.attempt_start(ATTEMPT_ID, REQUEST_ID, 1, "openai", "gpt-4o-mini")
    journal.attempt_end(
        ATTEMPT_ID,
        status="completed",
        http_status=200,
        error_code=None,
        error_message=None,
        prompt_tokens=3,
        completion_tokens=2,
        token_count=2,
        first_token_ts=5,
    )
    journal.request_end(
        REQUEST_ID,
        status="completed",
        prompt_tokens=3,
        completion_tokens=2,
        prompt_tokens_source="provider",
        completion_tokens_source=None,
        cost=0.25,
        provider="openai",
        error=None,
    )
    # A boot's ends of a request a crash left open say less.
    journal.attempt_end(
        ATTEMPT_ID,
        status="interrupted",
        token_count=2,
        error_code="restart",
        error_message="stopped",
    )
    await asyncio.shield(journal.request_end(REQUEST_ID, status="interrupted", error="stopped"))

    records = await read_log()
    assert [rtype for rtype, _ in records] == [rtype for rtype, _ in EXPECTED]
    ids = {"<rid>": REQUEST_ID, "<aid>": ATTEMPT_ID, "<kid>": KEY_ID}
    for (_, payload), (_, body) in zip(records, EXPECTED, strict=True):
        expected = body.replace("<ts>", str(decode_json(payload)["ts"]))
        for name, value in ids.items():
            expected = expected.replace(name, str(value))
        assert payload.decode() == expected

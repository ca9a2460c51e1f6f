"""The journal's backstop: a record the WAL would read back as damage is refused."""

from __future__ import annotations

import uuid

import pytest
from served_gateway import Served, _assert_nothing_recorded

from llmsvc.errors import BodyTooLarge
from llmsvc.gateway.errors import describe
from llmsvc.wal.codec import MAX_PAYLOAD


async def test_a_start_record_past_the_wals_record_limit_is_413_and_records_nothing(
    served: Served,
) -> None:
    """Only a max_body_bytes raised far past its default can get here: a record the WAL
    would read back as damage is refused instead of journaled."""
    messages = [{"role": "user", "content": "x" * MAX_PAYLOAD}]
    with pytest.raises(BodyTooLarge) as raised:
        served.gateway.journal.request_start(uuid.uuid4(), "corr", "mock", False,
                                             messages, {})  # fmt: skip

    assert describe(raised.value)[0] == 413
    await _assert_nothing_recorded(served)

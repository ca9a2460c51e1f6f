"""Retry-After as upstreams send it: seconds, or an HTTP date."""

from __future__ import annotations

import email.utils
from datetime import UTC, datetime, timedelta

import pytest

from llmsvc.providers.http import retry_after


def test_seconds_and_dates_become_seconds_and_anything_else_none() -> None:
    assert retry_after("3") == 3.0
    later = email.utils.format_datetime(datetime.now(UTC) + timedelta(seconds=30), usegmt=True)
    assert retry_after(later) == pytest.approx(30, abs=2)
    past = email.utils.format_datetime(datetime.now(UTC) - timedelta(seconds=30), usegmt=True)
    assert retry_after(past) == 0.0
    for bad in (None, "", "soon", "-1"):
        assert retry_after(bad) is None

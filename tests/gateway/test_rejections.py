"""The rejected-request log line: one per rejection, one line each, bounded in rate."""

from __future__ import annotations

import logging
import uuid

import pytest

from llmsvc.callers import Caller
from llmsvc.gateway import rejections
from llmsvc.gateway.rejections import LINES_PER_SECOND, MAX_FIELD, log_rejection


class Clock:
    """rejections' monotonic clock, moved by the test: the budget is per second."""

    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def clock(monkeypatch: pytest.MonkeyPatch) -> Clock:
    clock = Clock()
    monkeypatch.setattr(rejections.time, "monotonic", clock)
    monkeypatch.setattr(rejections, "_budget", rejections._Budget())
    return clock


def _reject(path: str = "/nowhere", status: int = 404, caller: Caller | None = None) -> None:
    log_rejection("GET", path, status, "not_found", "no route", uuid.uuid4(), caller)


def _lines(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.name == rejections.log.name]


def test_a_flood_is_logged_up_to_the_budget_and_the_next_line_counts_the_rest(
    clock: Clock, caplog: pytest.LogCaptureFixture
) -> None:
    with caplog.at_level(logging.INFO):
        for _ in range(LINES_PER_SECOND + 7):
            _reject()
        assert len(_lines(caplog)) == LINES_PER_SECOND
        clock.now += 0.999
        _reject()  # the same second: still over
        assert len(_lines(caplog)) == LINES_PER_SECOND
        clock.now += 0.001
        _reject()
        _reject()

    *_, resumed, after = _lines(caplog)
    assert resumed.endswith(" not_logged=8")
    assert "not_logged" not in after


def test_a_line_names_the_caller_and_is_a_warning_for_a_5xx(
    clock: Clock, caplog: pytest.LogCaptureFixture
) -> None:
    key = Caller(key_id=uuid.uuid4(), key_name="billing")
    with caplog.at_level(logging.INFO):
        _reject(caller=key)
        _reject(status=503)

    first, second = caplog.records
    assert f" key=billing key_id={key.key_id} " in first.getMessage()
    assert (first.levelno, second.levelno) == (logging.INFO, logging.WARNING)


def test_a_path_cannot_forge_a_line_or_make_one_long(
    clock: Clock, caplog: pytest.LogCaptureFixture
) -> None:
    with caplog.at_level(logging.INFO):
        _reject(path="/x\nrejected method=FORGED\r\x1b[2J")
        _reject(path="/" + "a" * 70_000)

    forged, long = _lines(caplog)
    assert not any(c in forged for c in "\n\r\x1b")
    assert "path=/x\\nrejected method=FORGED\\r\\x1b[2J " in forged
    assert f"path=/{'a' * (MAX_FIELD - 1)}… " in long
    assert len(long) < 2 * MAX_FIELD + 200

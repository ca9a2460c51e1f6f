"""Routing over HTTP: a model no provider serves is a 404 naming it."""

from __future__ import annotations

from served_gateway import MESSAGES, Served, _assert_nothing_recorded, _error, _post


async def test_unknown_model_is_404_model_not_found_and_records_nothing(served: Served) -> None:
    status, _, raw = await _post(served, {"model": "gpt-nowhere", "messages": MESSAGES})
    error = _error(status, raw, 404)
    assert error["code"] == "model_not_found"
    assert error["param"] == "model"
    assert "gpt-nowhere" in error["message"]
    await _assert_nothing_recorded(served)

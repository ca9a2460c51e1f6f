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


async def test_a_client_cannot_pin_a_provider_target_by_model_name_or_header(
    served: Served,
) -> None:
    """Only the console's replay pins a target (a scope key set in process): `mock:mock`,
    a target of the mock's own route, is no model to a client, whatever its headers say."""
    assert "mock:mock" in served.gateway.router.pinnable()
    body = {"model": "mock:mock", "messages": MESSAGES}
    status, _, raw = await _post(served, body, **{"llmsvc.target": "mock:mock"})
    assert _error(status, raw, 404)["code"] == "model_not_found"
    status, _, raw = await _post(served, {"model": "gpt-nowhere", "messages": MESSAGES},
                                 **{"llmsvc-target": "mock:mock"})  # fmt: skip
    assert _error(status, raw, 404)["code"] == "model_not_found"
    await _assert_nothing_recorded(served)

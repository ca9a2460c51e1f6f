"""An operator's switch against a read of the stored switches that overlaps it.

On a real store (SQLite and PostgreSQL); the two queries are held at chosen
points by wrapping them, so the read's rows are taken before the switch is
committed and handed back after it: the one order in which a read could undo
a switch made a moment before.
"""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import pytest
from policies import circuit_policy
from sqlalchemy.ext.asyncio import AsyncEngine

from llmsvc import switches
from llmsvc.config import ProviderConfig
from llmsvc.gateway.breaker import Breakers
from llmsvc.gateway.router import Router
from llmsvc.local import read_disabled
from llmsvc.providers import build_provider
from llmsvc.switches import Switches


async def test_a_read_of_rows_older_than_a_switch_does_not_undo_it(
    engine: AsyncEngine, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    config = ProviderConfig(name="mock", kind="mock", models=["mock"])
    router = Router([config], {"mock": build_provider(config)}, Breakers(circuit_policy()))
    subject = Switches(engine, router, {"mock"}, tmp_path)
    store_may_commit, rows_may_return = asyncio.Event(), asyncio.Event()
    rows_taken = asyncio.Event()
    real_store, real_states = switches.set_provider_enabled, switches.provider_states

    async def held_store(engine: AsyncEngine, name: str, enabled: bool) -> None:
        await store_may_commit.wait()
        await real_store(engine, name, enabled)

    async def held_states(engine: AsyncEngine) -> dict[str, dict[str, Any]]:
        states = await real_states(engine)
        rows_taken.set()
        await rows_may_return.wait()
        return states

    monkeypatch.setattr(switches, "set_provider_enabled", held_store)
    monkeypatch.setattr(switches, "provider_states", held_states)

    switching = asyncio.create_task(subject.switch("mock", enabled=False))
    await asyncio.sleep(0)  # the switch is under way, not yet stored
    reading = asyncio.create_task(subject.read())
    await rows_taken.wait()  # the rows the read has are from before the switch
    store_may_commit.set()
    await switching
    assert router.disabled == {"mock"}
    rows_may_return.set()
    assert await reading == {}  # no row yet when it read

    assert router.disabled == {"mock"}
    assert read_disabled(tmp_path) == {"mock"}
    await subject.read()  # the next read has the switch
    assert router.disabled == {"mock"}

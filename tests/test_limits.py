"""Rate limits and budgets per key and team: 429s with OpenAI's headers, shared across instances.

Real daemons with `auth = "keys"` and keys made with `llmsvc keys create`, a real upstream,
the official SDK, SQLite and PostgreSQL.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import openai
import pytest
from daemon_process import DaemonProcess, UpstreamProcess, daemon_env, read_store
from test_e2e import KEY, MESSAGES

from llmsvc.store import keys as store_keys
from llmsvc.store.engine import create_engine, upgrade_to_head

pytestmark = pytest.mark.timeout(90)

PRICE = {"input_per_million": 100000.0, "output_per_million": 100000.0}  # 0.1 a token
KEYS: dict[str, dict[str, Any]] = {  # name -> the key's limits and team
    "rpm": {"rpm": 3},
    "tpm": {"tpm": 20},
    "budget": {"budget": 1.0, "budget_period": "day"},
    "team-a": {"team": "pair"},
    "team-b": {"team": "pair"},
    "shared": {"rpm": 6},
    "free": {},
}


@pytest.fixture
def upstream() -> Iterator[UpstreamProcess]:
    with UpstreamProcess(api_key=KEY) as up:
        yield up


@pytest.fixture
def env(database_url: str, tmp_path: Path, upstream: UpstreamProcess) -> dict[str, str]:
    provider = {
        "name": "upstream",
        "kind": "openai",
        "base_url": upstream.base_url,
        "api_key": KEY,
        "models": ["gpt-4o-mini"],
    }
    return daemon_env(
        database_url,
        tmp_path / "wal",
        providers=json.dumps([provider]),
        prices=json.dumps({"gpt-4o-mini": PRICE}),
        auth="keys",
    )


@pytest.fixture
def keys(env: dict[str, str]) -> dict[str, dict[str, Any]]:
    """Each caller's key id and secret, made in-process (test_keys drives `llmsvc keys`)."""
    return asyncio.run(_make_keys(env["LLMSVC_DATABASE_URL"]))


async def _make_keys(url: str) -> dict[str, dict[str, Any]]:
    engine = create_engine(url)
    try:
        await upgrade_to_head(engine)
        await store_keys.create_team(engine, store_keys.TeamSpec(name="pair", rpm=2))
        made = {}
        for name, options in KEYS.items():
            spec = store_keys.KeySpec(name=name, **options)
            key, secret = await store_keys.create_key(engine, spec)
            made[name] = {"id": str(key["id"]), "secret": secret}
        return made
    finally:
        await engine.dispose()


@contextlib.contextmanager
def daemon(env: dict[str, str], wal: str | None = None) -> Iterator[DaemonProcess]:
    """A daemon that has read its keys (its catch-up is done)."""
    if wal is not None:
        env = {**env, "LLMSVC_WAL_DIR": wal}
    with DaemonProcess(env) as started:
        started.wait_caught_up()
        yield started


def client_for(daemon: DaemonProcess) -> openai.OpenAI:
    return openai.OpenAI(
        base_url=f"{daemon.base_url}/v1", api_key="per-call", max_retries=0, timeout=30
    )


def ask(client: openai.OpenAI, key: dict[str, Any], n: int = 3) -> Any:
    """One non-streaming call with `key`: the raw response, or the SDK's error."""
    try:
        return client.with_options(api_key=key["secret"]).chat.completions.with_raw_response.create(
            model="gpt-4o-mini", messages=MESSAGES, max_tokens=n
        )
    except openai.APIStatusError as exc:
        return exc


def test_requests_over_a_keys_rpm_get_429_with_openais_headers_and_are_not_journaled(
    env: dict[str, str], database_url: str, keys: dict[str, dict[str, Any]]
) -> None:
    with daemon(env) as d, client_for(d) as client:
        got = [ask(client, keys["rpm"]) for _ in range(4)]
        free = ask(client, keys["free"])
        assert d.stop() == 0, d.log
    assert [g.headers["x-ratelimit-remaining-requests"] for g in got[:3]] == ["2", "1", "0"]
    assert all(g.headers["x-ratelimit-limit-requests"] == "3" for g in got[:3])
    assert got[0].headers["x-ratelimit-reset-requests"].endswith("s")
    refused = got[3]
    assert isinstance(refused, openai.RateLimitError)
    assert refused.code == "rate_limit_exceeded"
    assert refused.type == "requests"
    assert 1 <= int(refused.response.headers["retry-after"]) <= 21
    assert refused.response.headers["x-ratelimit-remaining-requests"] == "0"
    assert "x-ratelimit-limit-requests" not in free.headers  # a caller without limits
    key = uuid.UUID(keys["rpm"]["id"])
    stored = [r for r in read_store(database_url).requests.values() if r["key_id"] == key]
    assert len(stored) == 3


def test_tokens_over_a_keys_tpm_get_429_once_charged(
    env: dict[str, str], database_url: str, keys: dict[str, dict[str, Any]]
) -> None:
    with daemon(env) as d, client_for(d) as client:
        first = ask(client, keys["tpm"], n=30)  # admitted: tokens are charged at the end
        second = ask(client, keys["tpm"])
        assert d.stop() == 0, d.log
    assert first.headers["x-ratelimit-limit-tokens"] == "20"
    assert isinstance(second, openai.RateLimitError)
    assert second.type == "tokens"
    assert second.response.headers["x-ratelimit-remaining-tokens"] == "0"


def test_a_spent_budget_refuses_new_requests_also_after_a_restart(
    env: dict[str, str], database_url: str, keys: dict[str, dict[str, Any]]
) -> None:
    with daemon(env) as d, client_for(d) as client:
        first = ask(client, keys["budget"], n=20)  # ~ 2.3 at 0.1 a token: over the budget of 1
        second = ask(client, keys["budget"])
        assert d.stop() == 0, d.log
    assert not isinstance(first, openai.APIStatusError)
    assert isinstance(second, openai.RateLimitError)
    assert second.code == "budget_exceeded"
    with daemon(env) as again, client_for(again) as client:
        deadline = time.monotonic() + 10  # the stored spend is read within a second or two
        while not isinstance(got := ask(client, keys["budget"]), openai.RateLimitError):
            assert time.monotonic() < deadline
            time.sleep(0.2)
        assert got.code == "budget_exceeded"
        assert again.stop() == 0, again.log
    key = uuid.UUID(keys["budget"]["id"])
    spent = [r["cost"] for r in read_store(database_url).requests.values() if r["key_id"] == key]
    assert sum(spent) >= 1.0


def test_a_teams_rpm_is_shared_by_its_keys(
    env: dict[str, str], keys: dict[str, dict[str, Any]]
) -> None:
    with daemon(env) as d, client_for(d) as client:
        got = [
            ask(client, keys["team-a"]),
            ask(client, keys["team-b"]),
            ask(client, keys["team-a"]),
        ]
        assert d.stop() == 0, d.log
    assert not isinstance(got[1], openai.APIStatusError)
    assert isinstance(got[2], openai.RateLimitError)


def test_a_keys_rpm_holds_across_two_instances_on_one_database(
    env: dict[str, str], tmp_path: Path, keys: dict[str, dict[str, Any]]
) -> None:
    with (
        daemon(env) as one,
        daemon(env, str(tmp_path / "wal2")) as two,
        client_for(one) as c1,
        client_for(two) as c2,
    ):
        one.wait_caught_up()
        two.wait_caught_up()
        first = [ask(c1, keys["shared"]) for _ in range(6)]  # the burst, all on instance one
        time.sleep(1.5)  # flushed by one, read by two
        other = ask(c2, keys["shared"])
        assert one.stop() == 0, one.log
        assert two.stop() == 0, two.log
    assert not any(isinstance(g, openai.APIStatusError) for g in first)
    assert isinstance(other, openai.RateLimitError)

"""Routes, retries, fallback and the circuit breaker, on a real daemon and a real upstream.

Each scenario is a route of targets on the local OpenAI-compatible upstream (its
`/with/X-Upstream-Fail/...` paths fail on cue) or on a port where nothing listens,
called with the official `openai` SDK; the attempts table is then checked row by row.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import openai
import pytest
from daemon_process import (
    DaemonProcess,
    UpstreamProcess,
    daemon_env,
    get_json,
    read_store,
    run_cli,
)
from postgres import free_port

pytestmark = pytest.mark.timeout(120)

KEY = "sk-routing-test-key-0123456789"
FAIL = "X-Upstream-Fail"
MESSAGES: list[Any] = [{"role": "user", "content": "hi"}]
FAST_RETRIES = {"retries_per_target": 1, "retry_backoff_ms": 10}


def provider(name: str, base_url: str, model: str = "gpt-test") -> dict[str, Any]:
    return {"name": name, "kind": "openai", "base_url": base_url, "api_key": KEY, "models": [model]}


def env_for(
    sqlite_url: str, tmp_path: Path, providers: list[dict[str, Any]], **settings: Any
) -> dict[str, str]:
    return daemon_env(
        sqlite_url,
        tmp_path / "wal",
        providers=json.dumps(providers),
        routes=json.dumps(settings.pop("routes")),
        **{**FAST_RETRIES, **settings},
    )


def streamed(daemon: DaemonProcess, model: str, n: int = 5) -> tuple[str, list[str], str]:
    """(request id, tokens received, error text) of one streamed request."""
    tokens, error = [], ""
    with openai.OpenAI(base_url=f"{daemon.base_url}/v1", api_key="x", max_retries=0) as client:
        raw = client.chat.completions.with_raw_response.create(
            model=model, messages=MESSAGES, max_tokens=n, stream=True
        )
        try:
            for chunk in raw.parse():
                for choice in chunk.choices:
                    if choice.delta.content:
                        tokens.append(choice.delta.content)
        except openai.APIError as exc:
            error = str(exc)
    return raw.headers["x-request-id"], tokens, error


def attempts(database_url: str, request_id: str) -> list[tuple[int, str, str, int | None, str]]:
    """(attempt number, provider, status, http status, error code) per attempt, in order."""
    store = read_store(database_url)
    return [
        (a["attempt_no"], a["provider"], a["status"], a["http_status"], a["error_code"] or "")
        for a in store.attempts[store.request(request_id)["id"]]
    ]


def failing_first(
    upstream: UpstreamProcess,
    sqlite_url: str,
    tmp_path: Path,
    name: str,
    fail: str,
    **settings: Any,
) -> dict[str, str]:
    """A route `gpt-fast`: first a provider that fails as `X-Upstream-Fail: fail` says, then
    the healthy upstream."""
    return env_for(
        sqlite_url,
        tmp_path,
        [provider(name, upstream.steered_url(FAIL, fail)), provider("up", upstream.base_url)],
        routes={"gpt-fast": [f"{name}:gpt-test", "up:gpt-test"]},
        **settings,
    )


@pytest.fixture
def upstream() -> Any:
    with UpstreamProcess(api_key=KEY) as up:
        yield up


def test_a_refused_connection_is_retried_then_the_next_target_serves(
    upstream: UpstreamProcess, sqlite_url: str, tmp_path: Path
) -> None:
    dead = f"http://127.0.0.1:{free_port()}/v1"
    env = env_for(
        sqlite_url,
        tmp_path,
        [provider("dead", dead), provider("up", upstream.base_url)],
        routes={"gpt-fast": ["dead:gpt-test", "up:gpt-test"]},
    )
    with DaemonProcess(env) as daemon:
        request_id, tokens, error = streamed(daemon, "gpt-fast", 5)
        _, models = get_json(f"{daemon.base_url}/v1/models")
        assert daemon.stop() == 0

    assert (len(tokens), error) == (5, "")
    assert attempts(sqlite_url, request_id) == [
        (1, "dead", "failed", None, "upstream_unreachable"),
        (2, "dead", "failed", None, "upstream_unreachable"),
        (3, "up", "completed", 200, ""),
    ]
    store = read_store(sqlite_url)
    request = store.request(request_id)
    assert (request["status"], request["provider"]) == ("completed", "up")
    assert store.tokens[store.attempts[request["id"]][-1]["id"]][-1][0] == 4
    assert "gpt-fast" in [m["id"] for m in models["data"]]


def test_a_500_is_retried_and_falls_back(
    upstream: UpstreamProcess, sqlite_url: str, tmp_path: Path
) -> None:
    env = failing_first(upstream, sqlite_url, tmp_path, "broken", "status:500")
    with DaemonProcess(env) as daemon:
        request_id, tokens, error = streamed(daemon, "gpt-fast")
        assert daemon.stop() == 0
    assert (len(tokens), error) == (5, "")
    assert attempts(sqlite_url, request_id) == [
        (1, "broken", "failed", 500, "server_error"),
        (2, "broken", "failed", 500, "server_error"),
        (3, "up", "completed", 200, ""),
    ]


def test_a_429_waits_for_its_retry_after_before_the_retry(
    upstream: UpstreamProcess, sqlite_url: str, tmp_path: Path
) -> None:
    env = failing_first(upstream, sqlite_url, tmp_path, "limited", "status:429")
    with DaemonProcess(env) as daemon:
        request_id, tokens, _ = streamed(daemon, "gpt-fast")
        assert daemon.stop() == 0
    assert len(tokens) == 5
    assert [a[:4] for a in attempts(sqlite_url, request_id)] == [
        (1, "limited", "failed", 429),
        (2, "limited", "failed", 429),
        (3, "up", "completed", 200),
    ]
    store = read_store(sqlite_url)
    first, second, _ = store.attempts[store.request(request_id)["id"]]
    # Retry-After: 1 (timers may fire within the clock resolution, wall and loop clocks differ)
    assert (second["started_at"] - first["ended_at"]).total_seconds() >= 0.99


def test_a_failure_after_the_first_token_is_never_retried(
    upstream: UpstreamProcess, sqlite_url: str, tmp_path: Path
) -> None:
    env = failing_first(upstream, sqlite_url, tmp_path, "breaks", "after:3")
    with DaemonProcess(env) as daemon:
        request_id, tokens, error = streamed(daemon, "gpt-fast", 10)
        assert daemon.stop() == 0
    assert tokens
    assert error
    assert [a[:3] for a in attempts(sqlite_url, request_id)] == [(1, "breaks", "failed")]
    store = read_store(sqlite_url)
    assert store.request(request_id)["status"] == "failed"
    assert store.texts(request_id) == tokens  # every token the client got, once


@pytest.mark.parametrize(("status", "client_status"), [(400, 400), (401, 502), (404, 502)])
def test_a_non_retryable_upstream_error_reaches_the_client_without_a_retry(
    upstream: UpstreamProcess, sqlite_url: str, tmp_path: Path, status: int, client_status: int
) -> None:
    env = failing_first(upstream, sqlite_url, tmp_path, "refuses", f"status:{status}")
    client_error = None
    with DaemonProcess(env) as daemon:
        with (
            openai.OpenAI(base_url=f"{daemon.base_url}/v1", api_key="x", max_retries=0) as client,
            pytest.raises(openai.APIStatusError) as refused,
        ):
            client.chat.completions.create(model="gpt-fast", messages=MESSAGES)
        client_error = refused.value
        assert daemon.stop() == 0
    assert client_error.status_code == client_status
    assert "refuses: upstream said:" in str(client_error)
    assert KEY not in str(client_error.response.text)
    store = read_store(sqlite_url)
    [request] = store.requests.values()
    assert [(a["provider"], a["http_status"]) for a in store.attempts[request["id"]]] == [
        ("refuses", status)
    ]


COOLDOWN = 10  # seconds: a restart on a loaded machine fits in it, and the probe waits it out


def test_the_circuit_opens_skips_the_provider_survives_a_restart_and_closes_on_a_probe(
    sqlite_url: str, tmp_path: Path
) -> None:
    port = free_port()
    with UpstreamProcess(api_key=KEY) as backup_up:
        env = env_for(
            sqlite_url,
            tmp_path,
            [
                provider("flaky", f"http://127.0.0.1:{port}/v1"),
                provider("up", backup_up.base_url),
            ],
            routes={"gpt-fast": ["flaky:gpt-test", "up:gpt-test"]},
            circuit_failure_threshold=2,
            circuit_cooldown_seconds=COOLDOWN,
        )
        with DaemonProcess(env) as daemon:
            daemon.wait_caught_up()  # the circuit's state is stored from here on
            opened, _, _ = streamed(daemon, "gpt-fast")  # two failures: the circuit opens
            opened_at = time.monotonic()
            skipped, _, _ = streamed(daemon, "gpt-fast")  # open: flaky is not called
            _, health = get_json(f"{daemon.base_url}/api/health")
            assert daemon.stop() == 0
        assert [a[1] for a in attempts(sqlite_url, opened)] == ["flaky", "flaky", "up"]
        by_name = {p["name"]: p for p in health["providers"]}
        assert by_name["flaky"]["attempts"] == {"failed": 2}
        assert by_name["up"]["attempts"] == {"completed": 2}
        assert [a[1] for a in attempts(sqlite_url, skipped)] == ["up"]
        assert {p["name"]: p["circuit"] for p in health["providers"]}["flaky"] == "open"
        assert "circuit open provider=flaky" in daemon.log

        with DaemonProcess(env) as again, UpstreamProcess(api_key=KEY, port=port):
            again.wait_caught_up()  # stored circuits are resumed as the daemon catches up
            _, health = get_json(f"{again.base_url}/api/health")
            still, _, _ = streamed(again, "gpt-fast")  # resumed open after the restart
            restarted_within = time.monotonic() - opened_at
            # The rest of the cool-down, counted from the opening: the next request probes.
            time.sleep(max(0.0, opened_at + COOLDOWN + 0.2 - time.monotonic()))
            probe, tokens, _ = streamed(again, "gpt-fast")
            _, after = get_json(f"{again.base_url}/api/health")
            assert again.stop() == 0
    assert restarted_within < COOLDOWN, "the restart outlasted the cool-down: nothing to resume"
    assert {p["name"]: p["circuit"] for p in health["providers"]}["flaky"] == "open"
    assert [a[1] for a in attempts(sqlite_url, still)] == ["up"]
    assert attempts(sqlite_url, probe) == [(1, "flaky", "completed", 200, "")]
    assert len(tokens) == 5
    assert {p["name"]: p["circuit"] for p in after["providers"]}["flaky"] == "closed"


def test_with_every_target_unavailable_the_client_gets_503_naming_why(
    upstream: UpstreamProcess, sqlite_url: str, tmp_path: Path
) -> None:
    env = env_for(
        sqlite_url,
        tmp_path,
        [provider("up", upstream.base_url)],
        routes={"gpt-fast": ["up:gpt-test"]},
        admin_token="admin-token-0123456789",
    )
    with DaemonProcess(env) as daemon:
        import urllib.request

        daemon.wait_caught_up()  # a switch is stored first
        disable = urllib.request.Request(
            f"{daemon.base_url}/api/admin/providers/up/disable",
            method="POST",
            headers={"Authorization": "Bearer admin-token-0123456789"},
        )
        urllib.request.urlopen(disable, timeout=5).close()
        with (
            openai.OpenAI(base_url=f"{daemon.base_url}/v1", api_key="x", max_retries=0) as client,
            pytest.raises(openai.APIStatusError) as refused,
        ):
            client.chat.completions.create(model="gpt-fast", messages=MESSAGES)
        assert daemon.stop() == 0
    assert refused.value.status_code == 503
    assert "provider 'up' is disabled by an operator" in str(refused.value)


def test_the_price_table_fills_the_requests_cost_and_status_shows_it(
    sqlite_url: str, tmp_path: Path
) -> None:
    prices = {"mock": {"input_per_million": 3.0, "output_per_million": 15.0}}
    env = daemon_env(sqlite_url, tmp_path / "wal", prices=json.dumps(prices))
    with DaemonProcess(env) as daemon:
        request_id, tokens, _ = streamed(daemon, "mock", 10)
        assert daemon.stop() == 0
    status = run_cli(env, "status")

    request = read_store(sqlite_url).request(request_id)
    assert (request["prompt_tokens"], request["completion_tokens"]) == (1, len(tokens))
    assert request["cost"] == pytest.approx((1 * 3.0 + 10 * 15.0) / 1e6)
    assert "0.000153" in status.stdout
    assert "cost of these 1 requests: 0.000153" in status.stdout


def test_no_first_token_in_time_fails_over_and_a_slow_whole_reply_is_not_cut(
    upstream: UpstreamProcess, sqlite_url: str, tmp_path: Path
) -> None:
    slow = upstream.steered_url("X-Upstream-Token-Delay-Ms", "1500")
    env = env_for(
        sqlite_url,
        tmp_path,
        [provider("slow", slow), provider("up", upstream.base_url)],
        routes={"gpt-fast": ["slow:gpt-test", "up:gpt-test"], "gpt-slow": ["slow:gpt-test"]},
        retries_per_target=0,
        first_token_timeout_seconds=0.5,
    )
    with DaemonProcess(env) as daemon:
        request_id, tokens, error = streamed(daemon, "gpt-fast", 3)
        client = openai.OpenAI(base_url=f"{daemon.base_url}/v1", api_key="x", max_retries=0)
        whole = client.chat.completions.create(model="gpt-slow", messages=MESSAGES, max_tokens=1)
        assert daemon.stop() == 0
    assert (len(tokens), error) == (3, "")
    assert attempts(sqlite_url, request_id) == [
        (1, "slow", "failed", None, "first_token_timeout"),
        (2, "up", "completed", 200, ""),
    ]
    assert whole.choices[0].message.content  # non-streaming: only the attempt's bound applies


def test_the_request_timeout_bounds_all_attempts_together(
    upstream: UpstreamProcess, sqlite_url: str, tmp_path: Path
) -> None:
    env = failing_first(
        upstream,
        sqlite_url,
        tmp_path,
        "limited",
        "status:429",
        retries_per_target=3,
        request_timeout_seconds=0.5,
    )
    with DaemonProcess(env) as daemon:
        client = openai.OpenAI(base_url=f"{daemon.base_url}/v1", api_key="x", max_retries=0)
        started = time.monotonic()
        reply = client.chat.completions.create(model="gpt-fast", messages=MESSAGES, max_tokens=2)
        took = time.monotonic() - started
        assert daemon.stop() == 0
    # Retry-After: 1 does not fit in the 0.5 s left: the next target is tried at once.
    assert reply.choices[0].message.content
    assert took < 1.0
    store = read_store(sqlite_url)
    [request] = store.requests.values()
    assert [a["provider"] for a in store.attempts[request["id"]]] == ["limited", "up"]


def test_a_silence_longer_than_timeout_seconds_fails_over_and_a_steady_slow_stream_is_not_cut(
    upstream: UpstreamProcess, sqlite_url: str, tmp_path: Path
) -> None:
    delay = "X-Upstream-Token-Delay-Ms"
    silent = {**provider("silent", upstream.steered_url(delay, "1500")), "timeout_seconds": 0.3}
    steady = {**provider("steady", upstream.steered_url(delay, "150")), "timeout_seconds": 0.4}
    env = env_for(
        sqlite_url,
        tmp_path,
        [silent, steady],
        routes={"gpt-fast": ["silent:gpt-test", "steady:gpt-test"]},
        retries_per_target=0,
    )
    with DaemonProcess(env) as daemon:
        # 5 tokens 150 ms apart: the silence timer moves on past 0.4 s several times
        request_id, tokens, error = streamed(daemon, "gpt-fast", 5)
        assert daemon.stop() == 0
    assert (len(tokens), error) == (5, "")
    rows = attempts(sqlite_url, request_id)
    assert [a[:3] for a in rows] == [(1, "silent", "failed"), (2, "steady", "completed")]
    store = read_store(sqlite_url)
    first = store.attempts[store.request(request_id)["id"]][0]
    assert "no data for 0.3 s (timeout_seconds)" in first["error_message"], first

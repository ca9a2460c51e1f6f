"""Callers' keys on real daemons: 401/403 as the openai SDK sees them, revocation and rotation
followed within 2 s (by a second worker too), the CLI and admin API, and secrets kept out of logs
and rows."""

from __future__ import annotations

import json
import time
import urllib.request
import uuid
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import openai
import pytest
from daemon_process import (
    DaemonProcess,
    admin_call,
    daemon_env,
    fetch_json,
    read_store,
    read_store_after,
    run_cli,
)
from postgres import free_port

pytestmark = pytest.mark.timeout(120)

TOKEN = "admin-" + uuid.uuid4().hex
MESSAGES: list[Any] = [{"role": "user", "content": "hello"}]
FOLLOWED = 2.0  # a change made elsewhere is in force within this many seconds


@pytest.fixture
def env(database_url: str, tmp_path: Path) -> dict[str, str]:
    env = daemon_env(database_url, tmp_path / "wal", auth="keys", admin_token=TOKEN)
    assert run_cli(env, "migrate").returncode == 0
    return env


def create_key(env: dict[str, str], *args: str) -> dict[str, Any]:
    done = run_cli(env, "keys", "create", *args, "--json")
    assert done.returncode == 0, done.stderr
    created: dict[str, Any] = json.loads(done.stdout)
    return created


def client(daemon: DaemonProcess, secret: str) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{daemon.base_url}/v1", api_key=secret, max_retries=0)


def chat(daemon: DaemonProcess, secret: str, model: str = "mock") -> str:
    with client(daemon, secret) as sdk:
        raw = sdk.chat.completions.with_raw_response.create(
            model=model, messages=MESSAGES, max_tokens=3
        )
        return str(raw.headers["x-request-id"])


def models(daemon: DaemonProcess, secret: str) -> list[str]:
    with client(daemon, secret) as sdk:
        return [m.id for m in sdk.models.list()]


def test_a_missing_unknown_revoked_or_expired_key_is_401_and_nothing_is_journaled(
    env: dict[str, str], database_url: str
) -> None:
    revoked = create_key(env, "revoked")
    assert run_cli(env, "keys", "revoke", "revoked").returncode == 0
    with DaemonProcess(env) as daemon:
        daemon.wait_caught_up()
        soon = (datetime.now(UTC) + timedelta(seconds=2)).isoformat()
        body = {"name": "expiring", "expires_at": soon}  # through the admin API: in force at once
        code, expiring = admin_call(daemon, "POST", "/api/admin/keys", body, TOKEN)
        assert code == 201
        assert admin_call(daemon, "POST", "/api/admin/teams", {"name": "ops"}, TOKEN)[0] == 201
        status, body = fetch_json(
            urllib.request.Request(
                f"{daemon.base_url}/v1/chat/completions",
                data=json.dumps({"model": "mock", "messages": MESSAGES}).encode(),
                headers={"content-type": "application/json"},
            ),
            timeout=5,
        )
        assert status == 401
        assert body["error"]["code"] == "invalid_api_key"
        assert "Authorization: Bearer" in body["error"]["message"]
        chat(daemon, expiring["secret"])  # before it expires
        refused = {}
        time.sleep(max(0.0, datetime.fromisoformat(soon).timestamp() - time.time()))
        for name, secret in (
            ("unknown", "sk-llmsvc-" + "x" * 32),
            ("revoked", revoked["secret"]),
            ("expired", expiring["secret"]),
        ):
            with pytest.raises(openai.AuthenticationError) as raised:
                chat(daemon, secret)
            assert raised.value.code == "invalid_api_key"
            refused[name] = raised.value.message
            assert secret not in str(raised.value.body)
        with pytest.raises(openai.AuthenticationError):  # every /v1 path, models too
            models(daemon, revoked["secret"])
        assert daemon.stop() == 0
    assert "revoked" in refused["revoked"]
    assert "expired" in refused["expired"]
    assert len(read_store(database_url).requests) == 1  # only the one accepted
    assert " key created by an operator key=expiring " in daemon.log  # what operators did
    assert " team created by an operator team=ops " in daemon.log


def test_a_key_limited_to_some_models_gets_403_for_others_and_lists_only_its_own(
    database_url: str, tmp_path: Path
) -> None:
    env = daemon_env(
        database_url,
        tmp_path / "wal",
        auth="keys",
        routes=json.dumps({"mock": ["mock:mock"], "other": ["mock:mock"]}),
    )
    assert run_cli(env, "migrate").returncode == 0
    key = create_key(env, "only-mock", "--models", "mock")
    with DaemonProcess(env) as daemon:
        daemon.wait_caught_up()
        chat(daemon, key["secret"], "mock")
        with pytest.raises(openai.PermissionDeniedError) as raised:
            chat(daemon, key["secret"], "other")
        listed = models(daemon, key["secret"])
        with client(daemon, key["secret"]) as sdk:
            retrieved = sdk.models.retrieve("mock")
            with pytest.raises(openai.NotFoundError) as hidden:
                sdk.models.retrieve("other")  # served, but not to this key
        assert daemon.stop() == 0
    assert raised.value.code == "model_not_allowed"
    assert listed == [retrieved.id] == ["mock"]
    assert hidden.value.code == "model_not_found"
    assert "key=only-mock" in daemon.log


def test_a_key_revoked_through_one_worker_is_refused_by_both_within_2_s(
    env: dict[str, str],
) -> None:
    key = create_key(env, "ci")
    with DaemonProcess({**env, "LLMSVC_WORKERS": "2"}) as daemon:
        daemon.wait_caught_up(daemons=2)
        for _ in range(6):  # new connections: both workers take some
            chat(daemon, key["secret"])
        code, body = admin_call(daemon, "POST", "/api/admin/keys/ci/revoke", None, TOKEN)
        assert (code, body["key"]["state"]) == (200, "revoked")
        time.sleep(FOLLOWED)
        for _ in range(20):
            with pytest.raises(openai.AuthenticationError):
                chat(daemon, key["secret"])
        assert daemon.stop() == 0


def test_a_rotated_key_takes_its_new_secret_and_the_old_one_stops_within_2_s(
    env: dict[str, str], database_url: str
) -> None:
    key = create_key(env, "svc")
    with DaemonProcess(env) as daemon:
        daemon.wait_caught_up()
        chat(daemon, key["secret"])
        rotated = run_cli(env, "keys", "rotate", "svc", "--json")  # while the daemon runs
        assert rotated.returncode == 0, rotated.stderr
        new = json.loads(rotated.stdout)["secret"]
        time.sleep(FOLLOWED)
        with pytest.raises(openai.AuthenticationError):
            chat(daemon, key["secret"])
        request_id = chat(daemon, new)
        assert daemon.stop() == 0
    assert new != key["secret"]
    assert new.startswith("sk-llmsvc-")
    stored = read_store_after(database_url, request_id)
    rows = repr(stored.requests) + repr(stored.tokens)
    for secret in (key["secret"], new):
        assert secret not in daemon.log
        assert secret not in rows
    assert "key=svc" in daemon.log


def test_a_non_loopback_host_without_auth_refuses_to_start_unless_allowed(
    sqlite_url: str, tmp_path: Path
) -> None:
    env = daemon_env(sqlite_url, tmp_path / "wal", host="0.0.0.0")
    refused = run_cli(env, "run")
    assert refused.returncode == 2
    message = refused.stderr.strip()
    assert message.count("\n") == 0  # one paragraph
    for setting in ("host='0.0.0.0'", 'auth="none"', 'auth="keys"', "allow_unauthenticated"):
        assert setting in message
    with DaemonProcess({**env, "LLMSVC_ALLOW_UNAUTHENTICATED": "true"}) as daemon:
        assert daemon.stop() == 0
    with DaemonProcess({**env, "LLMSVC_AUTH": "keys"}) as daemon:
        assert daemon.stop() == 0


def test_the_cli_creates_lists_shows_revokes_and_rotates_keys_and_manages_teams(
    env: dict[str, str],
) -> None:
    team = run_cli(env, "teams", "create", "acme", "--rpm", "60", "--rpm-burst", "10", "--json")
    assert team.returncode == 0, team.stderr
    key = create_key(env, "bot", "--team", "acme", "--tpm", "1000", "--budget", "5",
                     "--budget-period", "month", "--models", "mock,gpt-4o")  # fmt: skip
    assert key["key"]["team"] == "acme"
    assert key["key"]["models"] == ["mock", "gpt-4o"]
    assert (key["key"]["tpm"], key["key"]["budget"], key["key"]["budget_period"]) == (
        1000,
        5.0,
        "month",
    )
    listed = run_cli(env, "keys", "list")
    assert "bot" in listed.stdout
    assert key["secret"] not in listed.stdout
    assert key["secret"][:14] in listed.stdout  # the prefix tells keys apart
    shown = json.loads(run_cli(env, "keys", "show", "bot", "--json").stdout)
    assert "secret" not in shown
    assert "secret_hash" not in shown["key"]
    updated = run_cli(env, "teams", "update", "acme", "--rpm", "none", "--tpm", "500", "--json")
    assert json.loads(updated.stdout)["team"]["rpm"] is None
    assert json.loads(updated.stdout)["team"]["tpm"] == 500
    teams = json.loads(run_cli(env, "teams", "show", "acme", "--json").stdout)
    assert teams["team"]["keys"] == ["bot"]
    assert "acme" in run_cli(env, "teams", "list").stdout
    rotated = json.loads(run_cli(env, "keys", "rotate", "bot", "--json").stdout)
    assert rotated["secret"] != key["secret"]
    revoked = json.loads(run_cli(env, "keys", "revoke", "bot", "--json").stdout)
    assert revoked["key"]["state"] == "revoked"
    bad = {
        ("keys", "create", "bot"): 2,  # the name is taken
        ("keys", "create", "x", "--budget", "5"): 2,  # no period
        ("keys", "create", "x", "--rpm", "0"): 2,
        ("keys", "create", "x", "--expires", "2001-01-01"): 2,
        ("keys", "create", "x", "--team", "nope"): 2,
        ("keys", "rotate", "bot"): 2,  # revoked
        ("keys", "show", "nope"): 1,  # not found, as `show` of a request
    }
    for args, code in bad.items():
        done = run_cli(env, *args)
        assert done.returncode == code, (args, done.stderr)
        assert done.stderr.startswith("llmsvc: ")
        assert done.stderr.count("\n") == 1


def test_the_admin_api_manages_keys_and_teams(env: dict[str, str]) -> None:
    with DaemonProcess(env) as daemon:
        daemon.wait_caught_up()

        def call(method: str, path: str, body: Any = None) -> tuple[int, dict[str, Any]]:
            return admin_call(daemon, method, f"/api/admin/{path}", body, TOKEN)

        assert call("POST", "teams", {"name": "ops", "tpm": 1000})[0] == 201
        code, created = call("POST", "keys", {"name": "k1", "team": "ops", "models": ["mock"]})
        assert code == 201
        secret = created["secret"]
        chat(daemon, secret)  # in force on this instance at once
        assert call("POST", "keys", {"name": "k1"})[0] == 409
        assert call("POST", "keys", {"name": "k2", "budget": 1})[0] == 400
        assert call("POST", "keys", {"name": "k2", "team": "nope"})[0] == 400
        assert [k["name"] for k in call("GET", "keys")[1]["keys"]] == ["k1"]
        assert call("GET", "keys/k1")[1]["key"]["team"] == "ops"
        assert call("GET", "keys/nope")[0] == 404
        code, team = call("PATCH", "teams/ops", {"tpm": None, "rpm": 5})
        assert (code, team["team"]["tpm"], team["team"]["rpm"]) == (200, None, 5)
        assert call("GET", "teams/ops")[1]["team"]["keys"] == ["k1"]
        assert call("PATCH", "teams/nope", {})[0] == 404
        code, rotated = call("POST", "keys/k1/rotate")
        assert code == 200
        with pytest.raises(openai.AuthenticationError):
            chat(daemon, secret)
        chat(daemon, rotated["secret"])
        assert call("POST", "keys/k1/revoke")[1]["key"]["state"] == "revoked"
        with pytest.raises(openai.AuthenticationError):
            chat(daemon, rotated["secret"])
        assert call("POST", "keys/k1/rotate")[0] == 409
        assert admin_call(daemon, "GET", "/api/admin/keys", None, "wrong-token")[0] == 401
        assert daemon.stop() == 0
    for value in (secret, rotated["secret"]):
        assert value not in daemon.log


def test_a_restart_while_the_database_is_away_still_knows_the_keys(
    sqlite_url: str, tmp_path: Path
) -> None:
    env = daemon_env(sqlite_url, tmp_path / "wal", auth="keys")
    assert run_cli(env, "migrate").returncode == 0
    kept, revoked = create_key(env, "kept"), create_key(env, "gone")
    assert run_cli(env, "keys", "revoke", "gone").returncode == 0
    with DaemonProcess(env) as daemon:
        daemon.wait_caught_up()
        assert daemon.stop() == 0
    away = {**env, "LLMSVC_DATABASE_URL": f"postgresql://nobody@127.0.0.1:{free_port()}/x"}
    with DaemonProcess(away) as daemon:
        chat(daemon, kept["secret"])  # journaled in the WAL meanwhile
        with pytest.raises(openai.AuthenticationError):
            chat(daemon, revoked["secret"])
        daemon.kill()
    assert "boot: keys from the local copy count=2" in daemon.log

"""The admin API on a real daemon: the token, provider switches, request detail, maintenance."""

from __future__ import annotations

import json
import sqlite3
import time
import urllib.error
import urllib.request
import uuid
from pathlib import Path
from typing import Any

import openai
import pytest
from daemon_process import (
    DaemonProcess,
    admin_call,
    daemon_env,
    read_store,
    read_store_after,
    run_cli,
)
from postgres import free_port

pytestmark = pytest.mark.timeout(120)

TOKEN = "admin-" + uuid.uuid4().hex
MESSAGES: list[Any] = [{"role": "user", "content": "hello"}]


def call(
    daemon: DaemonProcess,
    method: str,
    path: str,
    body: Any = None,
    token: str | None = TOKEN,
    raw: bytes | None = None,
) -> tuple[int, dict[str, Any]]:
    return admin_call(daemon, method, path, body, token, raw)


def request_id_of(daemon: DaemonProcess, path: str, token: str) -> uuid.UUID:
    """The X-Request-ID of a GET's answer, whatever its status."""
    request = urllib.request.Request(f"{daemon.base_url}{path}")
    request.add_header("Authorization", f"Bearer {token}")
    try:
        with urllib.request.urlopen(request, timeout=10) as response:
            return uuid.UUID(response.headers["x-request-id"])
    except urllib.error.HTTPError as error:
        return uuid.UUID(error.headers["x-request-id"])


def chat(daemon: DaemonProcess, tokens: int = 4, correlation_id: str | None = None) -> str:
    headers = {} if correlation_id is None else {"X-Correlation-ID": correlation_id}
    with openai.OpenAI(base_url=f"{daemon.base_url}/v1", api_key="-", max_retries=0) as client:
        raw = client.chat.completions.with_raw_response.create(
            model="mock", messages=MESSAGES, max_tokens=tokens, stream=True, extra_headers=headers
        )
        for _chunk in raw.parse():
            pass
    return str(raw.headers["x-request-id"])


@pytest.fixture
def env(sqlite_url: str, tmp_path: Path) -> dict[str, str]:
    return daemon_env(
        sqlite_url, tmp_path / "wal", admin_token=TOKEN, backup_dir=tmp_path / "backups"
    )


def test_without_a_token_configured_the_admin_api_and_console_are_off(
    sqlite_url: str, tmp_path: Path
) -> None:
    with DaemonProcess(daemon_env(sqlite_url, tmp_path / "wal")) as daemon:
        code, body = call(daemon, "GET", "/api/admin/status")
        with pytest.raises(urllib.error.HTTPError) as console:
            urllib.request.urlopen(f"{daemon.base_url}/console/", timeout=10)
        assert daemon.stop() == 0
    assert code == 404
    assert "admin API is off" in body["error"]["message"]
    assert console.value.code == 404  # the console too, saying how to turn it on
    assert "the console is off: set admin_token" in console.value.read().decode()


def test_a_missing_or_wrong_token_is_401_whether_or_not_the_route_exists(
    env: dict[str, str],
) -> None:
    with DaemonProcess(env) as daemon:
        answers = [
            call(daemon, method, path, token=token)
            for token in (None, "wrong", TOKEN + "x", "")
            for method, path in (("GET", "/api/admin/status"), ("GET", "/api/admin/nothing"))
        ]
        ok, status = call(daemon, "GET", "/api/admin/status")
        missing = call(daemon, "GET", "/api/admin/nothing")
        ids = [request_id_of(daemon, "/api/admin/status", token) for token in (TOKEN, "wrong")]
        assert daemon.stop() == 0
    assert len(set(ids)) == 2  # the 200 and the 401 alike say which request they answer
    assert f"path=/api/admin/status status=401 code=unauthorized request_id={ids[1]} " in (
        daemon.log
    )
    assert daemon.log.count(" rejected ") == len(answers) + 2  # the 404 and the last 401
    assert {code for code, _ in answers} == {401}
    assert len({json.dumps(body) for _, body in answers}) == 1  # one answer for all
    assert ok == 200
    assert status["instance"]
    assert [p["name"] for p in status["providers"]] == ["mock"]
    assert missing[0] == 404
    assert TOKEN not in daemon.log


def _ended(found: tuple[int, Any]) -> bool:
    """Whether an admin request detail shows the request and every attempt ended."""
    code, shown = found
    attempts = shown["attempts"] if code == 200 else []
    return bool(attempts) and all(a["status"] != "streaming" for a in attempts)


def test_a_request_is_shown_with_its_attempts_and_token_counts(env: dict[str, str]) -> None:
    with DaemonProcess(env) as daemon:
        daemon.wait_caught_up()  # the store is migrated
        chat(daemon, correlation_id="trace-shared")
        chat(daemon, correlation_id="trace-shared")
        # Last: stored in WAL order, so once it is in the store whole, the two before are.
        request_id = chat(daemon, tokens=6, correlation_id="req_admin-1")
        deadline = time.monotonic() + 10
        # The request's start and its attempt's end may reach the store in different flushes.
        while not _ended(found := call(daemon, "GET", f"/api/admin/requests/{request_id}")):
            assert time.monotonic() < deadline, ("never flushed whole", found)
            time.sleep(0.05)  # journaled; in the store with the next flush
        code, shown = found
        by_correlation = call(daemon, "GET", "/api/admin/requests/req_admin-1")
        shared = call(daemon, "GET", "/api/admin/requests/trace-shared")
        unknown = call(daemon, "GET", f"/api/admin/requests/{uuid.uuid4()}")
        status = call(daemon, "GET", "/api/admin/status")
        assert daemon.stop() == 0
    assert code == 200, (shown, daemon.log[-3000:])
    assert shown["request"]["id"] == request_id
    assert shown["request"]["created_at"].endswith("+00:00")
    assert by_correlation == found
    assert "messages" not in shown["request"]
    [attempt] = shown["attempts"]
    assert attempt["status"] == "completed"
    assert (attempt["tokens"]["stored"], attempt["tokens"]["first_seq"]) == (6, 0)
    assert attempt["tokens"]["last_seq"] == 5
    assert shared[0] == 400
    assert "several requests were sent with the correlation id 'trace-shared'" in str(shared[1])
    assert unknown[0] == 404
    assert status[0] == 200
    assert status[1]["status"] == "ok"  # as /api/health says it


def test_a_disabled_provider_is_never_called_and_stays_disabled_across_a_restart(
    env: dict[str, str],
) -> None:
    with DaemonProcess(env) as daemon:
        daemon.wait_caught_up()  # a switch is stored first
        code, switched = call(daemon, "POST", "/api/admin/providers/mock/disable")
        with pytest.raises(openai.APIStatusError) as refused:
            chat(daemon)
        unknown = call(daemon, "POST", "/api/admin/providers/nope/disable")
        wrong_method = call(daemon, "GET", "/api/admin/providers/mock/disable")
        assert daemon.stop() == 0
    assert (code, switched) == (200, {"provider": "mock", "enabled": False})
    assert refused.value.status_code == 503
    assert "provider 'mock' is disabled by an operator" in str(refused.value)
    [line] = [ln for ln in daemon.log.splitlines() if " request request_id=" in ln]
    assert " status=failed " in line
    assert line.endswith(" error=unavailable")  # refused, not a crash: not `internal`
    assert unknown[0] == 404
    assert wrong_method[0] == 405

    with DaemonProcess(env) as again:
        _, providers = call(again, "GET", "/api/admin/providers")
        assert providers == {
            "providers": [{"name": "mock", "enabled": False, "circuit": "closed", "attempts": {}}]
        }
        assert call(again, "POST", "/api/admin/providers/mock/enable")[0] == 200
        assert chat(again)
        assert again.stop() == 0
    assert "providers disabled by an operator: mock" in again.log


def test_switches_are_honoured_and_refused_while_the_database_is_away(
    env: dict[str, str], sqlite_url: str
) -> None:
    """A boot honours the switches from its local copy; a new one needs the database: 503."""
    env["LLMSVC_DATABASE_TIMEOUT_SECONDS"] = "1"
    with DaemonProcess(env) as daemon:
        daemon.wait_caught_up()
        assert call(daemon, "POST", "/api/admin/providers/mock/disable")[0] == 200
        assert daemon.stop() == 0
    holder = sqlite3.connect(sqlite_url.partition(":///")[2], isolation_level=None)
    holder.execute("BEGIN EXCLUSIVE")  # the database takes nothing
    try:
        with DaemonProcess(env) as again:
            with pytest.raises(openai.APIStatusError) as refused:
                chat(again)
            enable = call(again, "POST", "/api/admin/providers/mock/enable")
            with pytest.raises(openai.APIStatusError):
                chat(again)  # still disabled: the switch was not made
            holder.rollback()
            again.wait_caught_up()
            assert call(again, "POST", "/api/admin/providers/mock/enable")[0] == 200
            assert chat(again)
            assert again.stop() == 0
    finally:
        holder.close()
    assert refused.value.status_code == 503
    assert "provider 'mock' is disabled by an operator" in str(refused.value)
    assert enable[0] == 503
    assert "the switch is not made: the database did not store it" in str(enable[1])


def test_backup_list_and_restore_with_the_wal_replayed_since(
    env: dict[str, str], sqlite_url: str
) -> None:
    with DaemonProcess(env) as daemon:
        daemon.wait_caught_up()  # a restore is refused until then
        before = chat(daemon, tokens=5)
        code, made = call(daemon, "POST", "/api/admin/backup")
        after = chat(daemon, tokens=7)  # only in the WAL, as far as the backup knows
        _, listed = call(daemon, "GET", "/api/admin/backups")
        escapes = [
            call(daemon, "POST", "/api/admin/restore", {"file": name})
            for name in ("../llmsvc.db", "/etc/passwd", "llmsvc-none.dump")
        ]
        assert call(daemon, "POST", "/api/admin/providers/mock/disable")[0] == 200
        restored = call(daemon, "POST", "/api/admin/restore", {"file": made["found"]["file"]})
        _, providers = call(daemon, "GET", "/api/admin/providers")  # the switch is kept
        assert call(daemon, "POST", "/api/admin/providers/mock/enable")[0] == 200
        later = chat(daemon, tokens=3)
        store = read_store_after(sqlite_url, later)
        dry = call(daemon, "POST", "/api/admin/prune", {"dry_run": True, "older_than_days": 1})
        by_time = call(
            daemon, "POST", "/api/admin/prune", {"before": "2026-01-31", "dry_run": True}
        )
        everything = call(daemon, "POST", "/api/admin/prune", {"older_than_days": 0})
        bad = [
            call(daemon, "POST", "/api/admin/prune", body)
            for body in (
                {"older_than_days": 1, "before": "2026-01-31"},
                {"before": "yesterday"},
                {"older_than_days": -1},
            )
        ]
        malformed = call(daemon, "POST", "/api/admin/prune", raw=b"{not json")
        wrong_type = call(daemon, "POST", "/api/admin/prune", {"older_than_days": "ten"})
        assert daemon.stop() == 0, daemon.log

    assert (code, made["status"]) == (200, "ok")
    assert [b["name"] for b in listed["backups"]] == [made["found"]["file"]]
    assert [c for c, _ in escapes] == [400, 400, 400]
    assert restored[0] == 200, restored
    assert restored[1]["replayed"] > 0
    assert restored[1]["backup_had"] == {"provider mock": "no switch"}
    assert providers["providers"][0]["enabled"] is False
    assert dry[0] == 200
    assert dry[1]["repaired"] == {"dry_run": True}
    assert everything[0] == 200, everything
    assert everything[1]["repaired"]["requests"] == 3  # every one that had ended
    assert read_store(sqlite_url).requests == {}
    assert by_time[1]["found"]["cutoff"] == "2026-01-31T00:00:00+00:00"
    assert [(code, body["error"]["param"]) for code, body in bad] == [
        (400, "before"),
        (400, "before"),
        (400, "older_than_days"),
    ]
    assert malformed[0] == 400
    assert (wrong_type[0], wrong_type[1]["error"]["param"]) == (400, "older_than_days")
    for request_id, tokens in ((before, 5), (after, 7), (later, 3)):
        assert len(store.texts(request_id)) == tokens  # each once, in order
        assert store.request(request_id)["status"] == "completed"


def test_a_short_admin_token_is_a_configuration_error(env: dict[str, str]) -> None:
    done = run_cli({**env, "LLMSVC_ADMIN_TOKEN": "Zq8-tiny"}, "jobs")
    assert done.returncode == 2
    assert "admin_token (from LLMSVC_ADMIN_TOKEN): too short" in done.stderr
    assert "Zq8-tiny" not in done.stderr  # a secret, even a bad one, is never echoed


def test_a_route_whose_query_the_database_cannot_answer_is_503_not_500(tmp_path: Path) -> None:
    """A daemon serves before the database answers; its admin queries meanwhile are 503."""
    nowhere = f"postgresql://llmsvc@127.0.0.1:{free_port()}/llmsvc"  # nothing listens there
    env = daemon_env(nowhere, tmp_path / "wal", admin_token=TOKEN, database_timeout_seconds=1)
    with DaemonProcess(env) as daemon:
        code, body = call(daemon, "GET", "/api/admin/spend")
        assert daemon.stop() == 0, daemon.log
    assert code == 503, body
    assert body["error"]["code"] == "database_unavailable"
    assert "ConnectionRefusedError" in body["error"]["message"]
    assert "Traceback" not in daemon.log

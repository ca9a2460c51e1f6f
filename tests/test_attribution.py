"""Attribution end to end: a real daemon, the openai SDK, SQLite and PostgreSQL.

What a client says about who a request is for (`user`, `metadata` in the body and
the `x-llmsvc-metadata` header, a session id) and the deployment's settings reach
the request's row through the WAL, survive a kill -9 mid-stream, and are refused
with a 400 naming the problem, nothing journaled, when they break the bounds.
"""

from __future__ import annotations

import json
import urllib.parse
from pathlib import Path
from typing import Any

import openai
import pytest
from daemon_process import (
    DaemonProcess,
    admin_call,
    client_for,
    daemon_env,
    read_store,
    read_store_after,
)

import llmsvc

pytestmark = pytest.mark.timeout(90)

TOKEN = "attribution-admin-token-0123"
MESSAGES: list[Any] = [{"role": "user", "content": "hello"}]
CORRELATION = "5f0c4bde-0d8c-4a57-9b57-1d3b2a7c9e01"  # the whole request's X-Correlation-ID


@pytest.fixture
def env(database_url: str, tmp_path: Path) -> dict[str, str]:
    return daemon_env(
        database_url, tmp_path / "wal", admin_token=TOKEN, deployment_environment="prod-eu"
    )


def test_streamed_and_whole_requests_store_who_sent_them(
    env: dict[str, str], database_url: str
) -> None:
    with DaemonProcess(env) as daemon, client_for(daemon) as client:
        whole = client.chat.completions.with_raw_response.create(
            model="mock",
            messages=MESSAGES,
            max_tokens=3,
            user="user-1",
            metadata={"app": "web", "feature": "search"},
            extra_body={"session_id": "body-session"},
            extra_headers={
                "x-llmsvc-metadata": json.dumps({"app": "api", "tenant": "acme"}),
                "x-correlation-id": CORRELATION,
            },
        )
        streamed = client.chat.completions.with_raw_response.create(
            model="mock",
            messages=MESSAGES,
            max_tokens=3,
            stream=True,
            user="user-2",
            extra_body={"session_id": "body-session"},
            extra_headers={"x-llmsvc-session-id": "header-session"},
        )
        assert len([c for c in streamed.parse()]) > 1
        whole_id, streamed_id = whole.headers["x-request-id"], streamed.headers["x-request-id"]
        read_store_after(database_url, whole_id)
        store = read_store_after(database_url, streamed_id)

        row = store.request(whole_id)
        assert row["end_user"] == "user-1"
        # The header's keys are merged over the body's; its value wins a key both name.
        assert row["metadata"] == {"app": "api", "feature": "search", "tenant": "acme"}
        assert row["session_id"] == "body-session"
        assert (row["environment"], row["version"]) == ("prod-eu", llmsvc.__version__)
        assert (row["key_id"], row["team_id"]) == (None, None)  # auth = "none": no caller
        # What went to the provider: OpenAI's own fields as sent, llmsvc's session id not.
        assert row["params"]["user"] == "user-1"
        assert row["params"]["metadata"] == {"app": "web", "feature": "search"}
        assert "session_id" not in row["params"]

        row = store.request(streamed_id)
        assert (row["end_user"], row["metadata"]) == ("user-2", None)
        assert row["session_id"] == "header-session"  # the header wins over the body
        assert row["status"] == "completed"

        query = urllib.parse.urlencode(
            [("user", "user-1"), ("metadata", "tenant:acme"), ("since", "1h")]
        )
        status, body = admin_call(daemon, "GET", f"/api/admin/requests?{query}", None, TOKEN)
        assert status == 200, body
        assert [r["id"] for r in body["requests"]] == [whole_id]
        path = f"/api/admin/requests?correlation_id={CORRELATION}"
        status, body = admin_call(daemon, "GET", path, None, TOKEN)
        assert (status, [r["id"] for r in body["requests"]]) == (200, [whole_id])
        path = "/api/admin/requests?text=QUICK+brown&user=user-2"  # in the reply, any case
        status, body = admin_call(daemon, "GET", path, None, TOKEN)
        assert (status, [r["id"] for r in body["requests"]]) == (200, [streamed_id])
        assert (body["searched"]["requests"], body["searched"]["older_unread"]) == (1, False)
        status, body = admin_call(daemon, "GET", "/api/admin/spend?by=user", None, TOKEN)
        assert status == 200, body
        spent = {r["group"]: (r["requests"], r["completion_tokens"]) for r in body["spend"]}
        assert spent == {"user-1": (1, 3), "user-2": (1, 3)}
        assert daemon.stop() == 0, daemon.log


def test_admin_attribution_routes_refuse_bad_parameters_naming_them(
    env: dict[str, str],
) -> None:
    with DaemonProcess(env) as daemon:
        daemon.wait_caught_up()  # the schema is there
        for path, status, says in [
            ("/api/admin/spend?by=colour", 400, "one of key, team, user, model, provider, day"),
            ("/api/admin/spend?since=soon", 400, "since: 'soon' is neither a duration"),
            ("/api/admin/requests?limit=0", 400, "limit must be a whole number"),
            ("/api/admin/requests?metadata=app", 400, "metadata='app': give it as key:value"),
            ("/api/admin/requests?key=nobody", 404, "no key named 'nobody'"),
            ("/api/admin/requests?user=a&user=b", 400, "user is given 2 times"),
        ]:
            got, body = admin_call(daemon, "GET", path, None, TOKEN)
            assert (got, says in body["error"]["message"]) == (status, True), (path, body)
        assert daemon.stop() == 0, daemon.log


BAD: list[tuple[dict[str, Any], str]] = [
    ({"metadata": {f"k{i}": "v" for i in range(17)}}, "metadata: Dictionary should have at most"),
    ({"metadata": {"k" * 65: "v"}}, "String should have at most 64 characters"),
    ({"metadata": {"k": "v" * 513}}, "metadata.k: String should have at most 512 characters"),
    ({"extra_body": {"metadata": {"k": 1}}}, "metadata.k: Input should be a valid string"),
    ({"user": "u" * 257}, "user: String should have at most 256 characters"),
    ({"extra_body": {"session_id": "s" * 201}}, "session_id: String should have at most 200"),
    (
        {"extra_headers": {"x-llmsvc-metadata": "not json"}},
        "the x-llmsvc-metadata header must hold a JSON object of strings",
    ),
    (
        {"extra_headers": {"x-llmsvc-metadata": '["a"]'}},
        "the x-llmsvc-metadata header must hold a JSON object of strings",
    ),
    (
        {
            "metadata": {f"b{i}": "v" for i in range(10)},
            "extra_headers": {"x-llmsvc-metadata": json.dumps({f"h{i}": "v" for i in range(7)})},
        },
        "keys together are 17; at most 16 are allowed",
    ),
    (
        {"extra_headers": {"x-llmsvc-session-id": "s" * 201}},
        "the x-llmsvc-session-id header is 201 characters; at most 200",
    ),
]  # fmt: skip


def test_bad_attribution_is_a_400_naming_it_and_nothing_is_journaled(
    env: dict[str, str], database_url: str
) -> None:
    with DaemonProcess(env) as daemon, client_for(daemon) as client:
        for kwargs, says in BAD:
            with pytest.raises(openai.BadRequestError) as refused:
                client.chat.completions.create(model="mock", messages=MESSAGES, **kwargs)
            assert says in refused.value.message, (kwargs, refused.value.message)
        good = client.chat.completions.with_raw_response.create(
            model="mock", messages=MESSAGES, max_tokens=1, metadata={"k": "v" * 512}
        )
        store = read_store_after(database_url, good.headers["x-request-id"])
        assert daemon.stop() == 0, daemon.log
    # The WAL is stored in order: the refused requests, sent before, left no record.
    assert list(store.requests) == [store.request(good.headers["x-request-id"])["id"]]


def test_attribution_of_a_stream_cut_by_kill_9_is_stored_after_the_restart(
    env: dict[str, str], database_url: str
) -> None:
    with DaemonProcess(env) as daemon, client_for(daemon) as client:
        raw = client.chat.completions.with_raw_response.create(
            model="mock",
            messages=MESSAGES,
            max_tokens=500,
            stream=True,
            user="cut-user",
            metadata={"app": "batch"},
            extra_body={"mock_delay_ms": 50},
            extra_headers={"x-llmsvc-session-id": "cut-session"},
        )
        request_id = raw.headers["x-request-id"]
        chunks = iter(raw.parse())
        for _ in range(5):
            next(chunks)
        daemon.kill()
    with DaemonProcess(env) as again:
        assert again.stop() == 0, again.log
    row = read_store(database_url).request(request_id)
    assert row["status"] == "interrupted"
    assert (row["end_user"], row["metadata"]) == ("cut-user", {"app": "batch"})
    assert (row["session_id"], row["environment"]) == ("cut-session", "prod-eu")

"""Sessions end to end: the `openai` SDK → `llmsvc run` → the fake OpenAI upstream, on
SQLite and PostgreSQL.

A session made by POST carries its conversation: the second turn's provider is
sent the first turn and its reply (the upstream counts every word it was sent
as `prompt_tokens`), a failed turn adds nothing, GET shows the conversation, a
restart keeps it, DELETE ends it, and the `prune-sessions` job deletes a
session once it has expired.
"""

from __future__ import annotations

import json
import urllib.request
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import openai
import pytest
import sqlalchemy as sa
from daemon_process import (
    DaemonProcess,
    UpstreamProcess,
    admin_call,
    client_for,
    daemon_env,
    run_async,
    run_cli,
)

from llmsvc.store.engine import create_engine
from llmsvc.store.schema import llm_requests, llm_sessions
from llmsvc.store.sessions import Session, create_session

pytestmark = pytest.mark.timeout(120)

KEY = "sk-upstream-secret"
FIRST = {"role": "user", "content": "one two three"}
SECOND = {"role": "user", "content": "four five"}


def session_call(daemon: DaemonProcess, method: str, path: str = "", body: Any = None) -> Any:
    """(status, JSON body or None) of a `/v1/sessions` call."""
    if method != "DELETE":
        return admin_call(daemon, method, f"/v1/sessions{path}", body, None)
    request = urllib.request.Request(f"{daemon.base_url}/v1/sessions{path}", method="DELETE")
    try:
        with urllib.request.urlopen(request, timeout=30) as response:
            assert response.read() == b""
            return response.status, None
    except urllib.error.HTTPError as exc:
        with exc:
            return exc.code, json.loads(exc.read())


def stored(database_url: str) -> tuple[set[str], list[str | None]]:
    """The sessions' ids, and every request's session id."""

    async def read() -> tuple[set[str], list[str | None]]:
        engine = create_engine(database_url)
        try:
            async with engine.connect() as conn:
                ids = set((await conn.scalars(sa.select(llm_sessions.c.id))).all())
                labels = list((await conn.scalars(sa.select(llm_requests.c.session_id))).all())
            return ids, labels
        finally:
            await engine.dispose()

    return run_async(read)


def add_expired(database_url: str, session_id: str) -> None:
    async def add() -> None:
        engine = create_engine(database_url)
        try:
            now, hour = datetime.now(UTC), timedelta(hours=1)
            await create_session(
                engine, Session(session_id, None, None, now - 2 * hour, now - hour)
            )
        finally:
            await engine.dispose()

    run_async(add)


def test_a_session_carries_its_conversation_across_turns_and_a_restart(
    database_url: str, tmp_path: Path
) -> None:
    with UpstreamProcess(api_key=KEY) as upstream:
        failing = upstream.steered_url("X-Upstream-Fail", "status:500")
        providers = [
            {"name": name, "kind": "openai", "base_url": url, "api_key": KEY, "models": [model]}
            for name, url, model in [
                ("upstream", upstream.base_url, "gpt-test"),
                ("upstream-500", failing, "gpt-500"),
            ]
        ]
        env = daemon_env(database_url, tmp_path / "wal", providers=json.dumps(providers))
        with DaemonProcess(env) as daemon, client_for(daemon) as client:
            daemon.wait_caught_up()  # the store is migrated: sessions are rows of their own
            status, made = session_call(daemon, "POST", body={"metadata": {"app": "e2e"}})
            assert status == 201, made
            session = made["id"]
            first = client.chat.completions.create(
                model="gpt-test", messages=[FIRST], max_tokens=4, extra_body={"session_id": session}
            )
            assert first.choices[0].message.content == "t0 t1 t2 t3 "
            assert first.usage is not None
            assert first.usage.prompt_tokens == 3
            chunks = list(
                client.chat.completions.create(
                    model="gpt-test",
                    messages=[SECOND],
                    max_tokens=2,
                    stream=True,
                    stream_options={"include_usage": True},
                    extra_headers={"x-llmsvc-session-id": session},
                )
            )
            assert (
                "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == "t0 t1 "
            )
            usage = chunks[-1].usage
            assert usage is not None
            assert usage.prompt_tokens == 3 + 4 + 2  # the provider was sent the first turn too
            with pytest.raises(openai.InternalServerError):  # a failed turn adds nothing
                client.chat.completions.create(
                    model="gpt-500", messages=[FIRST], extra_body={"session_id": session}
                )
            conversation = [
                FIRST,
                {"role": "assistant", "content": "t0 t1 t2 t3 "},
                SECOND,
                {"role": "assistant", "content": "t0 t1 "},
            ]
            status, read = session_call(daemon, "GET", f"/{session}")
            assert status == 200, read
            assert read == {**made, "messages": conversation}
            assert daemon.stop() == 0, daemon.log

        with DaemonProcess(env) as daemon, client_for(daemon) as client:
            assert session_call(daemon, "GET", f"/{session}") == (200, read)
            assert session_call(daemon, "DELETE", f"/{session}") == (204, None)
            status, error = session_call(daemon, "GET", f"/{session}")
            assert status == 404
            assert session in error["error"]["message"]
            with pytest.raises(openai.NotFoundError, match=session):
                client.chat.completions.create(
                    model="gpt-test", messages=[FIRST], extra_body={"session_id": session}
                )
            # As README.md shows it: the SDK's own POST, the body as JSON, the answer a dict.
            kept = client.post("/sessions", cast_to=object, body={"ttl_seconds": 3600})
            assert isinstance(kept, dict)
            assert kept["expires_at"] - kept["created_at"] == 3600

    ids, labels = stored(database_url)
    assert ids == {kept["id"]}
    assert labels == [session] * 3  # the deleted session's requests stay in the audit log

    add_expired(database_url, "sess_expired")
    ran = run_cli(env, "jobs", "run", "prune-sessions")
    assert ran.returncode == 0, ran.stdout + ran.stderr
    assert ran.stdout.startswith("prune-sessions: ok  rows=1")
    assert stored(database_url)[0] == {kept["id"]}

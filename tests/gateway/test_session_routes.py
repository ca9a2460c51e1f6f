"""`/v1/sessions` over a real socket, on a real SQLite store: shapes, bounds and errors.

Chat turns through a session, their history and a restart are end to end in a
daemon process (tests/test_sessions.py); here the store never holds a turn,
so every session's messages are empty. (Not named test_sessions.py: pytest
takes test modules by their base name.)
"""

from __future__ import annotations

import uuid
from datetime import UTC, datetime, timedelta
from typing import Any

import orjson
import pytest
from served_gateway import Served, _assert_nothing_recorded, _by_type, _chat, _error, _post
from sqlalchemy.ext.asyncio import AsyncEngine

from llmsvc.config import SessionTtl
from llmsvc.errors import NotFound
from llmsvc.gateway.conversations import Conversations
from llmsvc.gateway.sessions import Sessions
from llmsvc.keytable import KeyTable
from llmsvc.store.keys import KeySpec, create_key
from llmsvc.store.sessions import Session, create_session, prune_sessions
from llmsvc.wal.codec import RecordType

TTL = SessionTtl(default=3600, max=7200)


@pytest.fixture
def database_url(sqlite_url: str) -> str:
    """The routes' store for conftest's `engine`: SQLite alone, as the store's own tests
    cover PostgreSQL."""
    return sqlite_url


@pytest.fixture
async def served_sessions(served: Served, engine: AsyncEngine) -> Served:
    """The served gateway with sessions in a real store; no flusher: the store holds no turn,
    and is caught up with the WAL by definition."""
    journaled = lambda: served.writer.end.lsn - 1  # noqa: E731
    conversations = Conversations(engine, journaled, journaled, lambda: None, wait_seconds=1)
    served.gateway.sessions = Sessions(conversations, TTL)
    return served


async def call(
    served: Served, method: str, path: str, body: Any = None
) -> tuple[int, dict[str, str], bytes]:
    data = orjson.dumps(body) if body is not None else None
    async with served.session.request(method, served.url + path, data=data) as r:
        return r.status, {k.lower(): v for k, v in r.headers.items()}, await r.read()


async def test_a_session_is_made_read_and_deleted(served_sessions: Served) -> None:
    before = int(datetime.now(UTC).timestamp())
    status, headers, raw = await call(
        served_sessions, "POST", "/v1/sessions", {"ttl_seconds": 60, "metadata": {"app": "x"}}
    )
    assert status == 201, raw
    made = orjson.loads(raw)
    assert set(made) == {"id", "object", "created_at", "expires_at", "metadata"}
    assert made["id"].startswith("sess_")
    assert len(made["id"]) == len("sess_") + 32
    assert made["object"] == "session"
    assert before <= made["created_at"] <= before + 2
    assert made["expires_at"] == made["created_at"] + 60
    assert made["metadata"] == {"app": "x"}
    assert headers["x-request-id"]

    status, _, raw = await call(served_sessions, "GET", f"/v1/sessions/{made['id']}")
    assert status == 200, raw
    assert orjson.loads(raw) == {**made, "messages": []}

    status, headers, raw = await call(served_sessions, "DELETE", f"/v1/sessions/{made['id']}")
    assert (status, raw) == (204, b"")
    assert headers["x-request-id"]
    for method in ("GET", "DELETE"):
        status, _, raw = await call(served_sessions, method, f"/v1/sessions/{made['id']}")
        assert made["id"] in _error(status, raw, 404)["message"]
    await _assert_nothing_recorded(served_sessions)


async def test_a_session_without_a_body_lives_the_default_ttl(served_sessions: Served) -> None:
    status, _, raw = await call(served_sessions, "POST", "/v1/sessions")
    made = orjson.loads(raw)
    assert status == 201, raw
    assert made["expires_at"] - made["created_at"] == TTL.default
    assert made["metadata"] == {}


@pytest.mark.parametrize(
    ("body", "param", "says"),
    [
        ({"ttl_seconds": 7201}, "ttl_seconds", "session_ttl_max_seconds"),
        ({"ttl_seconds": 0}, "ttl_seconds", "greater than or equal to 1"),
        ({"ttl_seconds": "60"}, "ttl_seconds", "valid integer"),
        ({"metadata": {"k": 1}}, "metadata.k", "valid string"),
        ({"metadata": {f"k{i}": "v" for i in range(17)}}, "metadata", "at most 16"),
        ({"title": "x"}, "title", "Extra inputs"),
        ([], None, "JSON object"),
    ],
    ids=[
        "ttl-over-max",
        "ttl-zero",
        "ttl-string",
        "metadata-value",
        "metadata-keys",
        "extra",
        "list",
    ],
)
async def test_a_bad_session_body_is_a_400_naming_the_field(
    served_sessions: Served, body: Any, param: str | None, says: str
) -> None:
    status, _, raw = await call(served_sessions, "POST", "/v1/sessions", body)
    error = _error(status, raw, 400)
    assert error["param"] == param
    assert says in error["message"]


async def test_session_routes_take_only_their_methods(served_sessions: Served) -> None:
    status, headers, raw = await call(served_sessions, "GET", "/v1/sessions")
    assert _error(status, raw, 405)["code"] == "method_not_allowed"
    assert headers["allow"] == "POST"
    status, headers, raw = await call(served_sessions, "POST", "/v1/sessions/sess_x")
    _error(status, raw, 405)
    assert headers["allow"] == "GET, DELETE, HEAD"


@pytest.mark.parametrize("where", ["body", "header"])
async def test_a_chat_naming_an_unknown_session_is_a_404_and_records_nothing(
    served_sessions: Served, where: str
) -> None:
    missing = "sess_" + uuid.uuid4().hex
    if where == "body":
        status, _, raw = await _post(served_sessions, _chat(session_id=missing))
    else:
        headers = {"x-llmsvc-session-id": missing}
        status, _, raw = await _post(served_sessions, _chat(), **headers)
    error = _error(status, raw, 404)
    assert missing in error["message"]
    await _assert_nothing_recorded(served_sessions)


async def test_a_chat_naming_a_session_with_no_turn_sends_its_messages_alone(
    served_sessions: Served,
) -> None:
    _, _, raw = await call(served_sessions, "POST", "/v1/sessions")
    session = orjson.loads(raw)["id"]
    status, _, raw = await _post(served_sessions, _chat(session_id=session))
    assert status == 200, raw
    starts = _by_type(await served_sessions.records(), RecordType.REQUEST_START)
    assert [start["messages"] for start in starts] == [_chat()["messages"]]
    assert starts[0]["session_id"] == session


async def test_an_id_not_made_by_post_stays_an_attribution_label(served_sessions: Served) -> None:
    status, _, raw = await _post(served_sessions, _chat(session_id="my-own-label"))
    assert status == 200, raw


async def test_without_a_store_sessions_are_unavailable(served: Served) -> None:
    status, _, raw = await call(served, "POST", "/v1/sessions")
    assert _error(status, raw, 503)["code"] == "unavailable"
    # A session id not made by POST is a label, and needs no store.
    status, _, raw = await _post(served, _chat(session_id="label"))
    assert status == 200, raw


async def test_only_the_key_that_made_a_session_may_use_it(
    served_sessions: Served, engine: AsyncEngine
) -> None:
    """With `auth = "keys"`: to another key the session does not exist, for every use."""
    secrets = [(await create_key(engine, KeySpec(name=name)))[1] for name in ("owner", "other")]
    keys = KeyTable(engine, served_sessions.wal_dir)
    await keys.read()
    served_sessions.gateway.keys = keys
    owner, other = ({"Authorization": f"Bearer {secret}"} for secret in secrets)

    async def as_key(key: dict[str, str], method: str, path: str) -> tuple[int, bytes]:
        url = served_sessions.url + path
        async with served_sessions.session.request(method, url, headers=key) as r:
            return r.status, await r.read()

    status, raw = await as_key(owner, "POST", "/v1/sessions")
    assert status == 201, raw
    path = "/v1/sessions/" + orjson.loads(raw)["id"]
    for method in ("GET", "DELETE"):
        status, raw = await as_key(other, method, path)
        _error(status, raw, 404)
    status, _, raw = await _post(served_sessions, _chat(session_id=path[-37:]), **other)
    _error(status, raw, 404)
    await _assert_nothing_recorded(served_sessions)
    assert (await as_key(owner, "GET", path))[0] == 200
    assert (await as_key(owner, "DELETE", path))[0] == 204


async def test_an_expired_session_is_gone_before_the_prune_and_pruned_after(
    engine: AsyncEngine,
) -> None:
    journaled = lambda: 0  # noqa: E731
    sessions = Sessions(Conversations(engine, journaled, journaled, lambda: None, 1), TTL)
    now = datetime.now(UTC)
    expired = Session(
        "sess_expired", None, None, now - timedelta(hours=2), now - timedelta(hours=1)
    )
    await create_session(engine, expired)
    live = await sessions.create(b"", None)
    with pytest.raises(NotFound, match="sess_expired"):
        await sessions.retrieve("sess_expired", None)
    assert await prune_sessions(engine, now) == 1
    assert await prune_sessions(engine, now) == 0
    assert (await sessions.retrieve(live["id"], None))["messages"] == []

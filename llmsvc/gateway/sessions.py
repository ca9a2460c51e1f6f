"""Server-side sessions: `/v1/sessions` and a chat request's `session_id` naming one.

A session made by `POST /v1/sessions` (its id starts `sess_`) is a row of its
own; its conversation is derived, not copied: its newest completed request
holds every message its provider was sent, history included, and its reply
(store/conversations.py). A chat request naming it gets that history put
before its own messages, so its start record stores what the provider was
sent, and its reply becomes the session's next turn once stored. Any other
`session_id` stays an attribution label (gateway/attribution.py).
"""

from __future__ import annotations

import uuid
from datetime import UTC, datetime, timedelta
from typing import Any, TypeGuard

from pydantic import BaseModel, ConfigDict, Field

from llmsvc.callers import Caller
from llmsvc.config import SessionTtl
from llmsvc.errors import ClientError, NotFound
from llmsvc.gateway.conversations import Conversations
from llmsvc.gateway.request import Integer, Metadata, parse_body
from llmsvc.store.sessions import Session, create_session, delete_session, live_session

SESSION_ID_PREFIX = "sess_"


class SessionBody(BaseModel):
    """`POST /v1/sessions`'s body, every field optional."""

    model_config = ConfigDict(extra="forbid", strict=True)

    ttl_seconds: Integer | None = Field(default=None, ge=1)
    metadata: Metadata | None = None


def is_session(session_id: str | None) -> TypeGuard[str]:
    """Whether a request's `session_id` names a session made by `POST /v1/sessions`."""
    return session_id is not None and session_id.startswith(SESSION_ID_PREFIX)


class Sessions:
    """Sessions in the store, each usable only by the key that made it (`auth = "keys"`)."""

    def __init__(self, conversations: Conversations, ttl: SessionTtl) -> None:
        self.conversations = conversations
        self.engine = conversations.engine
        self.ttl = ttl

    async def create(self, body: bytes, caller: Caller | None) -> dict[str, Any]:
        """A new session from `POST /v1/sessions`'s body (empty: the defaults), as its object."""
        request = parse_body(body, SessionBody)[1] if body.strip() else SessionBody()
        ttl = request.ttl_seconds if request.ttl_seconds is not None else self.ttl.default
        if ttl > self.ttl.max:
            raise ClientError(
                f"ttl_seconds: {ttl} is over the longest a session may live, {self.ttl.max} "
                "seconds (session_ttl_max_seconds)",
                param="ttl_seconds",
            )
        now = datetime.now(UTC).replace(microsecond=0)
        session = Session(
            f"{SESSION_ID_PREFIX}{uuid.uuid4().hex}",
            caller.key_id if caller is not None else None,
            request.metadata,
            now,
            now + timedelta(seconds=ttl),
        )
        await create_session(self.engine, session)
        return as_object(session)

    async def find(self, session_id: str, caller: Caller | None) -> Session:
        """The caller's live session with this id; NotFound for any other, saying which."""
        found = await live_session(self.engine, session_id, datetime.now(UTC))
        key_id = caller.key_id if caller is not None else None
        if found is None or found.key_id != key_id:
            raise NotFound(
                f"no session {session_id!r}: it does not exist, has expired or was deleted "
                "(POST /v1/sessions makes one)"
            )
        return found

    async def history(self, session_id: str, caller: Caller | None) -> list[dict[str, Any]]:
        """The session's conversation so far: its newest completed turn's messages and reply."""
        await self.find(session_id, caller)
        return await self._messages(session_id)

    async def retrieve(self, session_id: str, caller: Caller | None) -> dict[str, Any]:
        """`GET /v1/sessions/{id}`: the session's object and its messages."""
        session = await self.find(session_id, caller)
        return {**as_object(session), "messages": await self._messages(session_id)}

    async def _messages(self, session_id: str) -> list[dict[str, Any]]:
        turn = await self.conversations.latest_turn(session_id)
        return turn.history() if turn is not None else []

    async def delete(self, session_id: str, caller: Caller | None) -> None:
        """`DELETE /v1/sessions/{id}`: the row goes; its requests stay in the audit log."""
        await self.find(session_id, caller)
        await delete_session(self.engine, session_id)


def as_object(session: Session) -> dict[str, Any]:
    """The session as the API shows it: times in unix seconds."""
    expires = session.expires_at
    return {
        "id": session.id,
        "object": "session",
        "created_at": int(session.created_at.timestamp()),
        "expires_at": int(expires.timestamp()) if expires is not None else None,
        "metadata": session.metadata or {},
    }

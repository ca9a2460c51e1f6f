"""Conversations a client continues: a stored request and its reply as one turn.

A request's row holds the messages its provider was sent, history included,
so a conversation's history is its last turn's messages and that turn's
reply. `previous_response_id` names that turn; a session's is its newest
completed request. Both are read here, from the rows the flusher wrote.
"""

from __future__ import annotations

import uuid
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

import sqlalchemy as sa
from sqlalchemy.ext.asyncio import AsyncEngine

from llmsvc.store.queries import RequestDetail, request_detail
from llmsvc.store.schema import llm_requests


@dataclass
class Turn:
    """A stored request (its `llm_requests` row) and the reply its last attempt gave."""

    request: dict[str, Any]
    attempts: list[dict[str, Any]]
    reply: str
    tool_calls: list[dict[str, Any]]  # whole calls: id, name, arguments

    @property
    def ended(self) -> bool:
        return bool(self.request["status"] != "streaming")

    def reply_message(self) -> dict[str, Any]:
        """The reply as a chat-completion assistant message."""
        message: dict[str, Any] = {"role": "assistant", "content": self.reply or None}
        if self.tool_calls:
            message["tool_calls"] = [
                {
                    "id": call["id"],
                    "type": "function",
                    "function": {"name": call["name"], "arguments": call["arguments"]},
                }
                for call in self.tool_calls
            ]
        return message

    def history(self) -> list[dict[str, Any]]:
        """The messages a continuation starts from: those sent, then the reply."""
        return [*self.request["messages"], self.reply_message()]


def as_turn(detail: RequestDetail) -> Turn:
    last = detail.attempts[-1]["id"] if detail.attempts else None
    reply = detail.texts.get(last, "") if last is not None else ""
    calls = detail.tool_calls.get(last, []) if last is not None else []
    return Turn(detail.request, detail.attempts, reply, calls)


async def turn(engine: AsyncEngine, request_id: uuid.UUID) -> Turn | None:
    """The request with this id as a turn, or None if the store has no such row."""
    detail = await request_detail(engine, request_id)
    return None if detail is None else as_turn(detail)


async def latest_turn(engine: AsyncEngine, session_id: str) -> Turn | None:
    """The session's newest completed request, not deleted, as a turn; None if it has none."""
    async with engine.connect() as conn:
        newest = await conn.scalar(
            sa.select(llm_requests.c.id)
            .where(
                (llm_requests.c.session_id == session_id)
                & (llm_requests.c.status == "completed")
                & llm_requests.c.deleted_at.is_(None)
            )
            .order_by(llm_requests.c.created_at.desc())
            .limit(1)
        )
    return None if newest is None else await turn(engine, newest)


async def delete_response(engine: AsyncEngine, request_id: uuid.UUID) -> None:
    """Mark the request deleted (`DELETE /v1/responses/{id}`): the row stays, for the operator's
    records and spend, and is no longer a client's to read or continue."""
    async with engine.begin() as conn:
        await conn.execute(
            sa.update(llm_requests)
            .where(llm_requests.c.id == request_id)
            .values(deleted_at=datetime.now(UTC))
        )

"""The lifecycle records' bodies, defined once: what the journal writes and the flusher reads.

Each is one JSON object in the log; tokens and tool-call deltas stay binary
(codec.py). They are TypedDicts, not classes: a body is the very dict orjson
encodes and decodes, so the per-request path builds nothing more than before
and the bytes on disk keep their keys and order. A body read back is plain
JSON as written by whichever version wrote it: ends from older versions lack
the fields added since (an end's token sources, cost and provider), so
readers `.get` every end field but `id` and `ts`.
"""

from __future__ import annotations

from typing import Any, Literal, Required, TypedDict

# A request's or an attempt's state: `streaming` until its end record gives another.
# A Literal, not an Enum: it is stored, logged, a metric label and a JSON key as text.
Status = Literal["streaming", "completed", "failed", "interrupted"]


class Deployment(TypedDict, total=False):
    """The deployment's part of every start record (`deployment_*` settings), when set."""

    environment: str
    version: str


class Sender(TypedDict, total=False):
    """Who sent a request (gateway/attribution.py), only the fields known."""

    key_id: str
    team_id: str
    user: str
    metadata: dict[str, str]
    session_id: str


class Api(TypedDict, total=False):
    """The API a request came by, written only when not chat completions (older records have
    none, and a chat start's bytes stay as they were): responses, messages or embeddings."""

    api: str


class RequestStart(Deployment, Sender, Api):
    id: str
    correlation_id: str
    model: str
    stream: bool
    messages: list[Any]
    params: dict[str, Any]
    ts: int  # µs since the epoch, as every record's


class AttemptStart(TypedDict):
    id: str
    request_id: str
    attempt_no: int
    provider: str
    model: str
    ts: int


class AttemptEndFields(TypedDict, total=False):
    """What an attempt's end says; a boot's end of an attempt a crash left open says less."""

    status: Required[Status]
    http_status: int | None
    error_code: str | None
    error_message: str | None
    prompt_tokens: int | None
    completion_tokens: int | None
    token_count: int
    first_token_ts: int | None
    finish_reason: str | None  # as the client was told: one of OpenAI's
    stop_reason: str | None  # as the upstream said it (Anthropic's `refusal`, say)


class AttemptEnd(AttemptEndFields):
    id: str
    ts: int


class RequestEndFields(TypedDict, total=False):
    """What a request's end says; a boot's end of a request a crash left open says less."""

    status: Required[Status]
    prompt_tokens: int | None
    completion_tokens: int | None
    prompt_tokens_source: str | None
    completion_tokens_source: str | None
    cost: float | None
    provider: str
    error: str | None


class RequestEnd(RequestEndFields):
    id: str
    ts: int

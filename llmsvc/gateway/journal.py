"""The gateway's records, encoded and handed to the WAL writer.

Appends return the writer's batch future; awaiting it waits until the
records are journaled (a waiter's cancellation never cancels it). Records of
one request are appended in order, so waiting for the last one covers all;
the start records, which nobody waits on, do not wake the writer thread, and
records appended `when="next"` wait for the append right after them: a whole
reply's text and its ends are one write(2), not three.
"""

from __future__ import annotations

import asyncio
import time
import uuid
from typing import Any, Literal, Unpack

import orjson

from llmsvc.errors import BodyTooLarge, ClientError
from llmsvc.wal import (
    MAX_PAYLOAD,
    Api,
    AttemptEnd,
    AttemptEndFields,
    AttemptStart,
    Deployment,
    RecordType,
    RequestEnd,
    RequestEndFields,
    RequestStart,
    Sender,
    WalWriter,
    encode_json,
    encode_token,
    encode_tool_delta,
    fits,
)

# How soon an append is written: at once ("now", WalWriter.append), at the end of this loop
# round with every other batch appended in it ("round", append_soon), or with the next
# append ("next", queue), which the caller makes right after.
When = Literal["now", "round", "next"]
CHAT_API_FIELD = Api()  # a chat start says nothing of its API: its bytes stay as they were


def now_us() -> int:
    return time.time_ns() // 1000


class Journal:
    """`deployment`: fields every request start record carries (environment, version)."""

    def __init__(self, writer: WalWriter, deployment: Deployment | None = None) -> None:
        self.writer = writer
        self.deployment = deployment or {}

    def request_start(
        self,
        request_id: uuid.UUID,
        correlation_id: str,
        model: str,
        stream: bool,
        messages: list[Any],
        params: dict[str, Any],
        attribution: Sender | None = None,
        api: str = "chat",
    ) -> asyncio.Future[int]:
        """Queue the start, with who sent it (gateway/attribution.py's `record_fields`) and the
        API it came by; its future says whether it reached the log, if anyone asks.

        A body the WAL cannot encode or hold is the client's (parse_body bounds its depth
        and max_body_bytes its size, so this is the backstop): refused before anything of
        the request is journaled.
        """
        body: RequestStart = {
            "id": str(request_id),
            "correlation_id": correlation_id,
            "model": model,
            "stream": stream,
            "messages": messages,
            "params": params,
            "ts": now_us(),
            **self.deployment,
            **(attribution or {}),
            **(CHAT_API_FIELD if api == "chat" else Api(api=api)),
        }
        try:
            record = encode_json(RecordType.REQUEST_START, body)
        except orjson.JSONEncodeError as exc:
            raise ClientError(f"the request cannot be journaled: {exc}") from None
        if not fits(record):
            raise BodyTooLarge(
                f"the request is {len(record)} bytes as a WAL record; the WAL takes {MAX_PAYLOAD}"
            )
        return self.writer.queue(record)

    def attempt_start(
        self,
        attempt_id: uuid.UUID,
        request_id: uuid.UUID,
        attempt_no: int,
        provider: str,
        model: str,
    ) -> None:
        body: AttemptStart = {
            "id": str(attempt_id),
            "request_id": str(request_id),
            "attempt_no": attempt_no,
            "provider": provider,
            "model": model,
            "ts": now_us(),
        }
        self.writer.queue(encode_json(RecordType.ATTEMPT_START, body))

    def tokens(
        self, attempt_id: bytes, first_seq: int, texts: list[str], when: When = "now"
    ) -> asyncio.Future[int]:
        return self._append(_token_frames(attempt_id, first_seq, texts), when)

    def join_tokens(
        self, batch: asyncio.Future[int], attempt_id: bytes, first_seq: int, texts: list[str]
    ) -> bool:
        """`tokens` appended to the WAL batch `batch` stands for, written with it (the same
        future), if that batch is still gathering; False, nothing appended, once it is not."""
        return self.writer.append_to(batch, *_token_frames(attempt_id, first_seq, texts))

    def tool_deltas(
        self, attempt_id: bytes, first_seq: int, deltas: list[dict[str, Any]], when: When = "now"
    ) -> asyncio.Future[int]:
        """Tool-call deltas, numbered in their own seq space per attempt (tokens keep theirs)."""
        ts = now_us()
        frames = [encode_tool_delta(attempt_id, first_seq + i, ts, d) for i, d in enumerate(deltas)]
        return self._append(frames, when)

    def _append(self, frames: list[bytes], when: When) -> asyncio.Future[int]:
        if when == "now":
            return self.writer.append(*frames)
        if when == "round":
            return self.writer.append_soon(*frames)
        return self.writer.queue(*frames)

    def attempt_end(
        self, attempt_id: uuid.UUID, **fields: Unpack[AttemptEndFields]
    ) -> asyncio.Future[int]:
        return self.writer.append(_attempt_end(attempt_id, fields))

    def request_end(
        self, request_id: uuid.UUID, **fields: Unpack[RequestEndFields]
    ) -> asyncio.Future[int]:
        return self.writer.append(_request_end(request_id, fields))

    def ends(
        self,
        attempt_id: uuid.UUID | None,
        attempt_fields: AttemptEndFields,
        request_id: uuid.UUID,
        request_fields: RequestEndFields,
        when: When = "now",
    ) -> asyncio.Future[int]:
        """An attempt's end (if still open; None if not) and its request's, in one append."""
        return self._append(_ends(attempt_id, attempt_fields, request_id, request_fields), when)

    def hold_ends(
        self,
        attempt_id: uuid.UUID | None,
        attempt_fields: AttemptEndFields,
        request_id: uuid.UUID,
        request_fields: RequestEndFields,
    ) -> None:
        """`ends`, kept in memory while the disk is full (WalWriter.hold)."""
        self.writer.hold(*_ends(attempt_id, attempt_fields, request_id, request_fields))


def _ends(
    attempt_id: uuid.UUID | None,
    attempt_fields: AttemptEndFields,
    request_id: uuid.UUID,
    request_fields: RequestEndFields,
) -> list[bytes]:
    attempt = [] if attempt_id is None else [_attempt_end(attempt_id, attempt_fields)]
    return [*attempt, _request_end(request_id, request_fields)]


def _attempt_end(attempt_id: uuid.UUID, fields: AttemptEndFields) -> bytes:
    body: AttemptEnd = {"id": str(attempt_id), "ts": now_us(), **fields}
    return encode_json(RecordType.ATTEMPT_END, body)


def _request_end(request_id: uuid.UUID, fields: RequestEndFields) -> bytes:
    body: RequestEnd = {"id": str(request_id), "ts": now_us(), **fields}
    return encode_json(RecordType.REQUEST_END, body)


def _token_frames(attempt_id: bytes, first_seq: int, texts: list[str]) -> list[bytes]:
    """A batch's token records, numbered from `first_seq`, with one time: the read's."""
    ts = now_us()
    return [encode_token(attempt_id, first_seq + i, ts, text) for i, text in enumerate(texts)]

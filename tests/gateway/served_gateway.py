"""A gateway served in the test's own event loop, and helpers to talk to it over HTTP.

`served` (conftest.py) builds what the daemon builds (WalWriter, Journal, Router, Gateway)
minus the store, and serves it with uvicorn on 127.0.0.1 in the test's event
loop. Two providers: the mock (model `mock`) and an OpenAI-kind provider whose
port is bound but never listening, so every call to it is refused. `served_upstream`
serves one provider instead: the fake OpenAI upstream, in the same loop.
"""

from __future__ import annotations

import asyncio
import contextlib
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp
import orjson
import uvicorn

from llmsvc.gateway.app import Gateway
from llmsvc.wal.codec import RecordType, decode_json, decode_token
from llmsvc.wal.reader import WalReader
from llmsvc.wal.writer import WalWriter

MAX_BODY_BYTES = 4096


UNREACHABLE_KEY = "sk-unreachable-0123456789abcdef"


UNREACHABLE_MODEL = "far-model"


UPSTREAM_MODEL = "gpt-test"  # the fake OpenAI upstream's model (`served_upstream`)


ANTHROPIC_MODEL = "claude-test"  # the fake Anthropic upstream's model (`served_anthropic`)


class _QuietServer(uvicorn.Server):
    """uvicorn without its signal handlers: pytest owns the process's signals."""

    @contextlib.contextmanager
    def capture_signals(self) -> Iterator[None]:
        yield


@dataclass
class Served:
    """A running gateway: its URL, its parts, and what its WAL holds."""

    url: str
    host: str
    port: int
    gateway: Gateway
    writer: WalWriter
    wal_dir: Path
    wal_id: uuid.UUID
    session: aiohttp.ClientSession

    async def records(self) -> list[tuple[RecordType, Any]]:
        """Every record journaled so far, decoded: JSON bodies, or token tuples."""
        reader = WalReader(self.wal_dir, self.wal_id)
        try:
            await reader.seek(1)
            raw: list[tuple[int, bytes]] = []
            while batch := await reader.read(self.writer.end, 1000):
                raw += batch
        finally:
            await reader.close()
        return [(RecordType(rtype), _decoded(rtype, payload)) for rtype, payload in raw]


def _decoded(rtype: int, payload: bytes) -> Any:
    """A record's body: a token tuple, a tool delta's (its delta a dict), or the JSON."""
    if rtype == RecordType.TOKEN:
        return decode_token(payload)
    if rtype == RecordType.TOOL_DELTA:
        attempt, seq, delta, ts = decode_token(payload)
        return attempt, seq, orjson.loads(delta), ts
    return decode_json(payload)


CHAT = "/v1/chat/completions"


MESSAGES = [{"role": "user", "content": "hello there"}]  # two prompt tokens to the mock


ERROR_KEYS = {"message", "type", "param", "code"}


async def _post(served: Served, body: Any, **headers: str) -> tuple[int, dict[str, str], bytes]:
    """POST a body (a dict becomes JSON; bytes go as they are) and read the whole response."""
    data = body if isinstance(body, bytes) else orjson.dumps(body)
    headers = {"Content-Type": "application/json", **headers}
    async with served.session.post(served.url + CHAT, data=data, headers=headers) as r:
        return r.status, dict(r.headers), await r.read()


def _error(status: int, raw: bytes, expected_status: int) -> dict[str, Any]:
    """The OpenAI `error` object of a response, after checking its shape."""
    assert status == expected_status, raw
    doc = orjson.loads(raw)
    assert set(doc) == {"error"}
    assert set(doc["error"]) == ERROR_KEYS
    assert isinstance(doc["error"]["message"], str)
    assert doc["error"]["message"]
    return dict(doc["error"])


async def _assert_nothing_recorded(served: Served) -> None:
    assert served.writer.appended_lsn == 0
    assert await served.records() == []


def _events(raw: bytes) -> list[bytes]:
    """The data payloads of an SSE body, which must end with a complete event."""
    assert raw.endswith(b"\n\n"), raw[-200:]
    events = raw[:-2].split(b"\n\n")
    assert all(e.startswith(b"data: ") for e in events), events
    return [e[len(b"data: ") :] for e in events]


async def _raw_http(served: Served, request: bytes) -> tuple[int, bytes]:
    """Send exact request bytes and read the response until the server closes."""
    reader, writer = await asyncio.open_connection(served.host, served.port)
    try:
        writer.write(request)
        await writer.drain()
        async with asyncio.timeout(5):
            response = await reader.read()
    finally:
        writer.close()
        await writer.wait_closed()
    head, _, body = response.partition(b"\r\n\r\n")
    status = int(head.split(b" ", 2)[1])
    return status, body


def _by_type(records: list[tuple[RecordType, Any]], rtype: RecordType) -> list[Any]:
    return [body for t, body in records if t == rtype]


def _chat(**fields: Any) -> dict[str, Any]:
    """A valid request to the mock, with fields changed; a field set to _DROP is left out."""
    body = {"model": "mock", "messages": MESSAGES, **fields}
    return {k: v for k, v in body.items() if v is not _DROP}


_DROP = object()

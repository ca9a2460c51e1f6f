"""A PostgreSQL outage under a running daemon: clients never notice, the store loses nothing.

Real `llmsvc run`, the official `openai` SDK, a PostgreSQL cluster of this test's own that
is crashed (`pg_ctl stop -m immediate`) and brought back while the daemon serves.
"""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import openai
import pytest
from daemon_process import DaemonProcess, daemon_env, read_store
from postgres import PostgresCluster, sqlalchemy_url

from llmsvc.providers.mock import token as mock_token

pytestmark = pytest.mark.timeout(60)

MESSAGES: list[Any] = [{"role": "user", "content": "keep going"}]
FLUSH_FAILED = "flush failed, records wait in the WAL"


@dataclass
class Received:
    """What one client call got: the request id header and every token, in order."""

    request_id: str
    stream: bool
    tokens: list[str] = field(default_factory=list)

    @property
    def text(self) -> str:
        return "".join(self.tokens)


def stream(client: openai.OpenAI, n: int) -> Received:
    raw = client.chat.completions.with_raw_response.create(
        model="mock",
        messages=MESSAGES,
        max_tokens=n,
        stream=True,
        extra_body={"mock_delay_ms": 1},  # one token a chunk
    )
    got = Received(raw.headers["x-request-id"], True)
    for chunk in raw.parse():
        for choice in chunk.choices:
            if choice.delta.content:
                got.tokens.append(choice.delta.content)
    return got


def complete(client: openai.OpenAI, n: int) -> Received:
    raw = client.chat.completions.with_raw_response.create(
        model="mock", messages=MESSAGES, max_tokens=n
    )
    content = raw.parse().choices[0].message.content
    assert content is not None
    return Received(raw.headers["x-request-id"], False, [content])


def expected(n: int) -> list[str]:
    return [mock_token(i) for i in range(n)]


def test_requests_keep_working_through_a_database_outage_and_nothing_is_lost(
    own_cluster: PostgresCluster, tmp_path: Path
) -> None:
    url = asyncio.run(own_cluster.create_database("llmsvc"))
    env = daemon_env(url, tmp_path / "wal", flush_interval_ms=10, shutdown_grace_seconds=5)
    sizes: dict[str, int] = {}
    received: list[Received] = []

    def record(got: Received, n: int) -> None:
        sizes[got.request_id] = n
        received.append(got)
        if got.stream:
            assert got.tokens == expected(n)
        else:
            assert got.text == "".join(expected(n))

    with (
        DaemonProcess(env) as daemon,
        openai.OpenAI(
            base_url=f"{daemon.base_url}/v1", api_key="unused", max_retries=0, timeout=10
        ) as client,
    ):
        for n in (5, 12):
            record(stream(client, n), n)

        began = time.monotonic()
        own_cluster.stop("immediate")
        for n in (7, 20, 3):
            record(stream(client, n), n)
            record(complete(client, n + 1), n + 1)
        daemon.wait_for_log(FLUSH_FAILED, timeout=5)
        time.sleep(max(0.0, 2.0 - (time.monotonic() - began)))  # the flusher keeps retrying
        record(stream(client, 9), 9)
        record(complete(client, 4), 4)
        assert daemon.log.count(FLUSH_FAILED) == 1, daemon.log

        assert daemon.output is not None
        mark = daemon.output.mark()
        own_cluster.start()
        found = daemon.output.wait_for(r"flush recovered checkpoint=\d+", 10, start=mark)
        assert found is not None, daemon.log
        record(stream(client, 6), 6)

        assert daemon.stop() == 0, daemon.log
    assert daemon.log.count(FLUSH_FAILED) == 1, daemon.log
    assert "Traceback" not in daemon.log, daemon.log

    store = read_store(sqlalchemy_url(url))
    assert set(store.requests) == {store.request(r.request_id)["id"] for r in received}
    for got in received:
        request = store.request(got.request_id)
        attempt = store.only_attempt(got.request_id)
        assert (request["status"], attempt["status"]) == ("completed", "completed"), got
        # Seqs 0..n-1, once each, in order; a non-streamed reply is journaled as one token.
        stored = store.texts(got.request_id)
        assert stored == got.tokens
        assert "".join(stored) == "".join(expected(sizes[got.request_id]))
        assert attempt["token_count"] == len(stored)

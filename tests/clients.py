"""Clients of a daemon under a database outage, and what they check: every token stored once.

What each call received (the request id header and every token) is recorded,
then compared with the store. Health and metrics are read over real HTTP.
"""

from __future__ import annotations

import threading
import time
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import openai
from daemon_process import DaemonProcess, Stored, get_json, read_store
from postgres import sqlalchemy_url

from llmsvc.providers.mock import token as mock_token

MESSAGES: list[Any] = [{"role": "user", "content": "keep going"}]


@dataclass
class Received:
    """What one client call got: the request id header and every token, in order."""

    request_id: str
    stream: bool
    tokens: list[str] = field(default_factory=list)

    @property
    def text(self) -> str:
        return "".join(self.tokens)


def stream(
    client: openai.OpenAI, n: int, delay_ms: float = 1, accepted: threading.Event | None = None
) -> Received:
    """Stream `n` mock tokens, one a chunk, each at least `delay_ms` after the last.

    `accepted` is set once the response headers are in: the daemon took the request.
    """
    raw = client.chat.completions.with_raw_response.create(
        model="mock",
        messages=MESSAGES,
        max_tokens=n,
        stream=True,
        extra_body={"mock_delay_ms": delay_ms},
    )
    if accepted is not None:
        accepted.set()
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


class Clients:
    """What every client call received, checked against what the mock sends."""

    def __init__(self) -> None:
        self.sizes: dict[str, int] = {}
        self.received: list[Received] = []

    def record(self, got: Received, n: int) -> None:
        self.sizes[got.request_id] = n
        self.received.append(got)
        if got.stream:
            assert got.tokens == expected(n)
        else:
            assert got.text == "".join(expected(n))

    def assert_stored_once_in_order(self, url: str, store: Stored | None = None) -> None:
        """The store holds every request a client got, and every token it got, once, in order.

        `store`: as read already, less what the caller checked itself.
        """
        store = store or read_store(sqlalchemy_url(url))
        assert set(store.requests) == {store.request(r.request_id)["id"] for r in self.received}
        for got in self.received:
            request = store.request(got.request_id)
            attempt = store.only_attempt(got.request_id)
            assert (request["status"], attempt["status"]) == ("completed", "completed"), got
            # Seqs 0..n-1, once each, in order; a non-streamed reply is journaled as one token.
            stored = store.texts(got.request_id)
            assert stored == got.tokens
            assert "".join(stored) == "".join(expected(self.sizes[got.request_id]))
            assert attempt["token_count"] == len(stored)


def health(daemon: DaemonProcess) -> tuple[int, dict[str, Any]]:
    return get_json(f"{daemon.base_url}/api/health")


def health_until(
    daemon: DaemonProcess, done: Callable[[dict[str, Any]], bool], timeout: float = 15
) -> tuple[int, dict[str, Any]]:
    """Poll `/api/health` until `done(body)`; the last answer fails the test after `timeout`."""
    deadline = time.monotonic() + timeout
    while True:
        status, body = health(daemon)
        if done(body):
            return status, body
        assert time.monotonic() < deadline, (status, body)
        time.sleep(0.05)


def scrape(daemon: DaemonProcess) -> dict[str, float]:
    """The metrics port's samples, by name with labels as exposed (`a_total{reason="x"}`)."""
    port = daemon.wait_for_log(r"boot: metrics port=(\d+)").group(1)
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as response:
        text = response.read().decode()
    samples = {}
    for line in text.splitlines():
        if line and not line.startswith("#"):
            name, _, value = line.rpartition(" ")
            samples[name] = float(value)
    return samples


def openai_client(daemon: DaemonProcess) -> openai.OpenAI:
    return openai.OpenAI(
        base_url=f"{daemon.base_url}/v1", api_key="unused", max_retries=0, timeout=10
    )

"""Arbitrary JSON through one real daemon per database: every answer is a 200 or a 4xx,
never a 5xx, and afterwards the flusher has kept up and the store holds every 200.

Requests are valid chat requests whose extra parameters (`payload` and others) and message content
carry arbitrary keys (control characters and all) and values (deep nesting up to and past
the depth limit, integers past 64 bits, extreme floats), to the mock and to the local
OpenAI-compatible upstream, which reports an arbitrary `usage` (any JSON value).
"""

from __future__ import annotations

import json
import re
import time
import urllib.error
import urllib.request
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import orjson
import pytest
from daemon_process import (
    DaemonProcess,
    UpstreamProcess,
    daemon_env,
    get_json,
    read_store,
    run_async,
)
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from postgres import PostgresServer, sqlalchemy_url, unique_dbname

from llmsvc.gateway.request import MAX_DEPTH

pytestmark = pytest.mark.timeout(180)

KNOWN = {"model", "messages", "stream", "stream_options", "max_tokens", "max_completion_tokens",
         "temperature", "mock_delay_ms", "upstream_usage", "tools", "tool_choice", "n",
         "user", "metadata", "session_id", "payload"}  # fmt: skip

# Raw JSON the test cannot build as Python values for orjson to write (nesting past 254,
# integers past 64 bits, exponents): a marker string in the value, replaced after encoding.
MARK = "\ue000raw:"
MARKED = re.compile(rb'"\xee\x80\x80raw:([^"]*)\xee\x80\x80"')
raw_json = st.one_of(
    (st.integers(MAX_DEPTH - 8, MAX_DEPTH) | st.integers(1, 1100)).map(lambda k: "[" * k + "]" * k),
    st.integers(2**64, 10**40).map(str),
    st.integers(-(10**40), -(2**63) - 1).map(str),
    st.sampled_from(["1e308", "-1e-320", "1E400", "0e0", "-0"]),
).map(lambda raw: f"{MARK}{raw}\ue000")

odd_chars = st.sampled_from(
    ["\x00", "\x01", "\x1f", "\x7f", "\x85", "\u2028", "\ufeff", "\uffff", '"', "\\"]
)
keys = st.text(st.characters(exclude_categories=["Cs"]) | odd_chars, max_size=8)
texts = st.text(st.characters(exclude_categories=["Cs"]) | odd_chars | st.just("\x00"), max_size=16)
scalars = (
    st.none()
    | st.booleans()
    | st.integers(-(2**63), 2**64 - 1)
    | st.floats(allow_nan=False, allow_infinity=False)
    | texts
    | raw_json
)
values = st.recursive(
    scalars,
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(keys, inner, max_size=4),
    max_leaves=12,
)
usages = st.fixed_dictionaries({"prompt_tokens": values, "completion_tokens": values}) | values


@st.composite
def chat_requests(draw: st.DrawFn) -> bytes:
    """The bytes of a chat request carrying arbitrary keys and values where clients may."""
    model = draw(st.sampled_from(["mock", "gpt-test"]))
    parts = st.lists(st.dictionaries(keys, values, max_size=3), max_size=3)
    message = {
        **draw(st.dictionaries(keys.filter(lambda k: k not in ("role", "content")), values,
                               max_size=2)),
        "role": "user",
        "content": draw(texts | parts),
    }  # fmt: skip
    body: dict[str, Any] = {
        **draw(st.dictionaries(keys.filter(lambda k: k not in KNOWN), values, max_size=3)),
        "model": model,
        "messages": [message],
        "max_tokens": draw(st.integers(1, 6)),
        "stream": draw(st.booleans()),
        "payload": draw(st.dictionaries(keys, values, max_size=4)),
    }
    if model == "gpt-test":
        body["upstream_usage"] = draw(usages)
    return MARKED.sub(lambda m: m.group(1), orjson.dumps(body))


@dataclass
class Served:
    daemon: DaemonProcess
    database_url: str


@pytest.fixture(scope="module", params=["sqlite", "postgresql"])
def served(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Served]:
    """One daemon (mock and the local upstream) on a fresh database, for the module."""
    tmp = tmp_path_factory.mktemp(request.param)
    cluster: PostgresServer | None = None
    if request.param == "sqlite":
        url = f"sqlite+aiosqlite:///{tmp / 'llmsvc.db'}"
    else:
        cluster = request.getfixturevalue("pg_cluster")
        name = unique_dbname()
        url = sqlalchemy_url(run_async(lambda: cluster.create_database(name)))
    try:
        with UpstreamProcess() as upstream:
            providers = [
                {"name": "mock", "kind": "mock", "models": ["mock"]},
                {"name": "oai", "kind": "openai", "base_url": upstream.base_url,
                 "models": ["gpt-test"]},
            ]  # fmt: skip
            env = daemon_env(url, tmp / "wal", providers=json.dumps(providers))
            with DaemonProcess(env) as daemon:
                yield Served(daemon, url)
                assert daemon.stop() == 0, daemon.log
    finally:
        if cluster is not None:
            run_async(lambda: cluster.drop_database(name))


def post(daemon: DaemonProcess, body: bytes) -> tuple[int, str | None]:
    """(status, request id) of a chat request, its response read to the end."""
    request = urllib.request.Request(
        f"{daemon.base_url}/v1/chat/completions",
        data=body,
        headers={"Content-Type": "application/json"},
    )
    try:
        with urllib.request.urlopen(request, timeout=30) as response:
            data = response.read()
            if response.headers["content-type"] == "text/event-stream":
                assert data.endswith(b"data: [DONE]\n\n"), data[-300:]
            else:
                assert orjson.loads(data)["object"] == "chat.completion"
            return response.status, response.headers["x-request-id"]
    except urllib.error.HTTPError as exc:
        with exc:
            return exc.code, None


def test_arbitrary_requests_are_answered_without_5xx_and_all_stored(served: Served) -> None:
    daemon = served.daemon
    stored: list[str] = []
    statuses: dict[int, int] = {}

    @settings(max_examples=50, deadline=None, derandomize=True, database=None,
              suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])  # fmt: skip
    @given(body=chat_requests())
    def one(body: bytes) -> None:
        status, request_id = post(daemon, body)
        statuses[status] = statuses.get(status, 0) + 1
        assert status == 200 or 400 <= status < 500, (status, body[:500])
        if request_id is not None:
            stored.append(request_id)

    one()

    assert statuses.get(200, 0) >= 10, statuses  # most requests are served
    assert sum(n for s, n in statuses.items() if s != 200) >= 1, statuses  # some refused
    deadline = time.monotonic() + 15
    while True:
        _, health = get_json(f"{daemon.base_url}/api/health")
        caught_up = health["status"] == "ok" and health["wal"]["backlog_records"] == 0
        if caught_up or time.monotonic() > deadline:
            break
        time.sleep(0.05)
    assert (health["status"], health["wal"]["backlog_records"]) == ("ok", 0), health
    requests = read_store(served.database_url).requests
    missing = [rid for rid in stored if uuid.UUID(rid) not in requests]
    assert missing == []
    assert {requests[uuid.UUID(rid)]["status"] for rid in stored} == {"completed"}
    assert "Traceback" not in daemon.log
    assert " ERROR " not in daemon.log

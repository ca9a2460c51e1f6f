"""An upstream's odd usage through a real daemon, on SQLite and PostgreSQL: each request is
stored with that count None, a warning names provider and field, and the flusher keeps up.

Before the adapters checked usage, 3,000,000,000 prompt tokens (past int4) or a list
(which SQLite cannot bind) made every flush batch fail forever.
"""

from __future__ import annotations

import json
import time
import urllib.parse
from pathlib import Path
from typing import Any

import openai
import pytest
from daemon_process import (
    ANTHROPIC_SCRIPT,
    DaemonProcess,
    UpstreamProcess,
    client_for,
    daemon_env,
    get_json,
    read_store_after,
)

pytestmark = pytest.mark.timeout(120)

MESSAGES: list[Any] = [{"role": "user", "content": "odd usage"}]
# (usage as the upstream reports it, the prompt and completion counts the store must hold)
OPENAI_USAGES: list[tuple[Any, tuple[int | None, int | None]]] = [
    ({"prompt_tokens": 3_000_000_000, "completion_tokens": 4}, (None, 4)),
    ({"prompt_tokens": [1, 2], "completion_tokens": 4}, (None, 4)),
    ({"prompt_tokens": -1, "completion_tokens": 2**63}, (None, None)),
    ({"prompt_tokens": True, "completion_tokens": 1.5}, (None, None)),
    ({"prompt_tokens": "12", "completion_tokens": {"n": 4}}, (None, None)),
    ({"prompt_tokens": 2**31 - 1, "completion_tokens": 0}, (2**31 - 1, 0)),
    ([3, 4], (None, None)),
    ("lots", (None, None)),
]
ANTHROPIC_USAGES: list[tuple[Any, tuple[int | None, int | None]]] = [
    ({"input_tokens": 3_000_000_000, "output_tokens": [1]}, (None, None)),
    ({"input_tokens": "12", "output_tokens": -5}, (None, None)),
    ({"input_tokens": False, "output_tokens": 4}, (None, 4)),
]


def ask(daemon: DaemonProcess, model: str, stream: bool, **extra: Any) -> str:
    """One request through the SDK, read to its end; its request id."""
    with client_for(daemon) as client:
        raw = client.chat.completions.with_raw_response.create(
            model=model, messages=MESSAGES, max_tokens=4, stream=stream, extra_body=extra or None
        )
        parsed = raw.parse()
        if stream:
            assert isinstance(parsed, openai.Stream)
            assert "".join(c.choices[0].delta.content or "" for c in parsed if c.choices)
        return raw.headers["x-request-id"]


def wait_caught_up(daemon: DaemonProcess, timeout: float = 10.0) -> dict[str, Any]:
    """/api/health once it says `ok` with nothing left to store; the last one if never."""
    deadline = time.monotonic() + timeout
    while True:
        _, health = get_json(f"{daemon.base_url}/api/health")
        if health["status"] == "ok" and health["wal"]["backlog_records"] == 0:
            return health
        if time.monotonic() > deadline:
            return health
        time.sleep(0.05)


def test_odd_upstream_usage_is_stored_as_none_and_the_flusher_keeps_up(
    database_url: str, tmp_path: Path
) -> None:
    with (
        UpstreamProcess() as oai,
        UpstreamProcess(script=ANTHROPIC_SCRIPT) as ant,
    ):
        providers = [
            {"name": "oai", "kind": "openai", "base_url": oai.base_url, "models": ["gpt-test"]}
        ]
        for n, (usage, _) in enumerate(ANTHROPIC_USAGES):
            path = urllib.parse.quote(json.dumps(usage), safe="")
            providers.append({"name": f"ant{n}", "kind": "anthropic", "models": [f"claude-{n}"],
                              "base_url": f"{ant.root_url}/with/usage/{path}"})  # fmt: skip
        env = daemon_env(database_url, tmp_path / "wal", providers=json.dumps(providers))
        with DaemonProcess(env) as daemon:
            expected: dict[str, tuple[int | None, int | None]] = {}
            for stream in (True, False):
                for usage, counts in OPENAI_USAGES:
                    expected[ask(daemon, "gpt-test", stream, upstream_usage=usage)] = counts
                for n, (_, counts) in enumerate(ANTHROPIC_USAGES):
                    expected[ask(daemon, f"claude-{n}", stream)] = counts

            for request_id, counts in expected.items():
                store = read_store_after(database_url, request_id)
                request = store.request(request_id)
                attempt = store.only_attempt(request_id)
                assert request["status"] == "completed"
                assert (attempt["prompt_tokens"], attempt["completion_tokens"]) == counts
                fields = ("prompt_tokens", "completion_tokens")
                for field, count in zip(fields, counts, strict=True):
                    source = request[f"{field}_source"]
                    if count is not None:  # the provider's, as it sent it
                        assert (request[field], source) == (count, "provider")
                    else:  # dropped: unknown, or counted by llmsvc and marked so
                        assert source in (None, "tokenizer", "estimate", "deltas"), source
                        assert (request[field] is None) == (source is None)
            health = wait_caught_up(daemon)
            assert (health["status"], health["wal"]["backlog_records"]) == ("ok", 0), health
            assert health["database"]["last_error"] is None
            assert daemon.stop() == 0, daemon.log

    log = daemon.log
    assert "upstream value dropped provider=oai field=prompt_tokens value=3000000000" in log
    assert "upstream value dropped provider=ant0 field=input_tokens value=3000000000" in log
    assert "upstream value dropped provider=oai field=prompt_tokens value=list of length 2" in log
    assert "Traceback" not in log

"""Faults under the WAL, met by a real daemon: a failed fsync.

A failed fsync (issue 4, point 6) must end the daemon with exit code 1 and a CRITICAL log
line, since after it the page cache can no longer be trusted; the next boot recovers
from the log. tests/fault_daemon.py injects the failure (EIO from `os.fdatasync` once a
trigger file exists) into an otherwise unchanged `llmsvc run`.

Clients are the official `openai` SDK, recording every token they receive; the store
is read directly afterwards and must hold exactly that, once each, in order.
"""

from __future__ import annotations

import json
import re
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import openai
import pytest
from daemon_process import DaemonProcess, Stored, daemon_env, read_store, run_cli
from fault_daemon import INJECTED, TRIGGER_ENV

from llmsvc.providers.mock import token as mock_token

pytestmark = pytest.mark.timeout(60)

FAULT_DAEMON = Path(__file__).resolve().parent / "fault_daemon.py"
MESSAGES: list[Any] = [{"role": "user", "content": "fill the log"}]
SETTLED = {"completed", "failed", "interrupted"}
FSYNC_FAILED = (
    r"CRITICAL llmsvc\.wal\.writer wal write or fsync failed "
    r"error=wal: Input/output error on [0-9a-f]{16}\.wal: exiting to recover from the log"
)


@dataclass
class Seen:
    """One request as its client saw it."""

    request_id: str
    tokens: list[str] = field(default_factory=list)
    finished: bool = False  # read to its normal end
    error: Exception | None = None


def client_for(daemon: DaemonProcess, timeout: float = 15) -> openai.OpenAI:
    return openai.OpenAI(
        base_url=f"{daemon.base_url}/v1", api_key="unused", max_retries=0, timeout=timeout
    )


def stream_once(
    client: openai.OpenAI, max_tokens: int, delay_ms: int, seen: list[Seen] | None = None
) -> Seen:
    """One streaming request, every token recorded; a failure is kept on the Seen, not raised.

    A request refused before its stream began raises (there is nothing to record).
    """
    raw = client.chat.completions.with_raw_response.create(
        model="mock",
        messages=MESSAGES,
        max_tokens=max_tokens,
        stream=True,
        extra_body={"mock_delay_ms": delay_ms},
    )
    current = Seen(raw.headers["x-request-id"])
    if seen is not None:
        seen.append(current)
    try:
        for chunk in raw.parse():
            for choice in chunk.choices:
                if choice.delta.content:
                    current.tokens.append(choice.delta.content)
        current.finished = True
    except Exception as exc:
        current.error = exc
    return current


class Streamer(threading.Thread):
    """Streams requests one after another until stopped or a request fails."""

    def __init__(self, daemon: DaemonProcess, max_tokens: int, delay_ms: int) -> None:
        super().__init__(daemon=True)
        self.base_url = daemon.base_url
        self.daemon_process = daemon
        self.max_tokens = max_tokens
        self.delay_ms = delay_ms
        self.stop = threading.Event()
        self.seen: list[Seen] = []
        self.refused: Exception | None = None  # a request that failed before its stream began

    def run(self) -> None:
        with client_for(self.daemon_process) as client:
            while not self.stop.is_set():
                try:
                    got = stream_once(client, self.max_tokens, self.delay_ms, self.seen)
                except Exception as exc:
                    self.refused = exc
                    return
                if not got.finished:
                    return

    def tokens(self) -> int:
        return sum(len(s.tokens) for s in self.seen)


def assert_store_holds_what_clients_saw(store: Stored, seen: list[Seen], exact: bool) -> None:
    """Every received token stored once, in order; a stream read to its end stored whole.

    `exact`: the store holds no more than the client received (otherwise it may hold a
    few more: a token is journaled before it is sent, and a crash can fall in between).
    """
    unsettled = {r["id"]: r["status"] for r in store.requests.values()}
    unsettled = {k: v for k, v in unsettled.items() if v not in SETTLED}
    assert not unsettled, f"requests left unsettled: {unsettled}"
    for item in seen:
        request = store.request(item.request_id)
        attempt = store.only_attempt(item.request_id)
        stored = store.texts(item.request_id)  # seqs 0..n-1, once each
        assert stored[: len(item.tokens)] == item.tokens, (item, request["status"])
        assert stored == [mock_token(i) for i in range(len(stored))], item
        assert attempt["token_count"] == len(stored), (item, attempt)
        if item.finished:
            assert (request["status"], attempt["status"]) == ("completed", "completed"), item
            assert len(stored) == len(item.tokens), item
        elif exact:
            assert len(stored) == len(item.tokens), (item, len(stored))


def wait_until(predicate: Any, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, f"not within {timeout}s: {what}"
        time.sleep(0.02)


# -- point 6: a failed fsync -------------------------------------------------------------


@pytest.mark.parametrize("sync", ["write", "fsync"])
def test_failed_fsync_exits_1_and_the_restart_recovers_every_received_token(
    sync: str, database_url: str, wal_dir: Path, tmp_path: Path
) -> None:
    trigger = tmp_path / "fail-fdatasync"
    env = daemon_env(database_url, wal_dir, wal_sync=sync, wal_fsync_interval_ms=20)
    faulty_env = {**env, TRIGGER_ENV: str(trigger)}
    command = [sys.executable, str(FAULT_DAEMON)]

    with DaemonProcess(faulty_env, command=command) as daemon:
        clients = [Streamer(daemon, max_tokens=300, delay_ms=2) for _ in range(4)]
        for client in clients:
            client.start()
        wait_until(lambda: all(c.tokens() >= 20 for c in clients), 15, "every client streaming")
        trigger.touch()
        code = daemon.wait(20)  # a daemon that carries on or hangs is killed and fails here
        for client in clients:
            client.join(15)
            assert not client.is_alive(), "a client is still reading from a dead daemon"
    log = daemon.log
    assert code == 1, log
    assert INJECTED in log, log
    assert re.search(FSYNC_FAILED, log), log
    assert "shutdown: done exit_code=1" in log, log
    seen = [item for client in clients for item in client.seen]
    assert any(not item.finished for item in seen), "the failure cut no stream short"

    with DaemonProcess(env) as again:  # plain `llmsvc run`: boot replays the WAL
        assert again.stop() == 0, again.log
    assert re.search(r"boot: wal replayed records=\d+", again.log), again.log

    assert_store_holds_what_clients_saw(read_store(database_url), seen, exact=False)
    check = run_cli(env, "check", "--json")
    assert check.returncode == 0, check.stdout + check.stderr
    assert json.loads(check.stdout)["ok"] is True, check.stdout

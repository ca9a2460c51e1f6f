"""`/v1/messages` end to end: a real daemon with callers' keys, the official anthropic SDK,
SQLite and PostgreSQL, and a SIGKILL mid-stream.

What a Messages client received is what the store holds, each text delta once, in order,
after the crash too (the restart's boot recovers the killed request from the WAL).
"""

from __future__ import annotations

import json
import threading
import time
import uuid
from pathlib import Path
from typing import Any

import anthropic
import pytest
from daemon_process import DaemonProcess, daemon_env, read_store, run_cli

from llmsvc.providers.mock import token

pytestmark = pytest.mark.timeout(120)

TOKEN = "admin-" + uuid.uuid4().hex
MESSAGES: list[Any] = [{"role": "user", "content": "hello there"}]


def sdk(daemon: DaemonProcess, secret: str) -> anthropic.Anthropic:
    return anthropic.Anthropic(base_url=daemon.base_url, api_key=secret, max_retries=0, timeout=60)


class SlowStream:
    """A long streamed mock reply read on a thread, every text delta received recorded."""

    def __init__(self, daemon: DaemonProcess, secret: str) -> None:
        self.daemon, self.secret = daemon, secret
        self.request_id = ""
        self.texts: list[str] = []
        self.done = threading.Event()
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        try:
            with (
                sdk(self.daemon, self.secret) as client,
                client.messages.stream(
                    model="mock",
                    max_tokens=2000,
                    messages=MESSAGES,
                    extra_body={"mock_delay_ms": 20},
                ) as stream,
            ):
                self.request_id = stream.response.headers["x-request-id"]
                for text in stream.text_stream:
                    self.texts.append(text)
        except anthropic.APIError:
            pass  # the daemon was killed under it
        finally:
            self.done.set()

    def wait_for(self, n: int) -> None:
        deadline = time.monotonic() + 30
        while len(self.texts) < n:
            assert not self.done.is_set(), "the stream ended early"
            assert time.monotonic() < deadline, f"only {len(self.texts)} deltas in 30 s"
            time.sleep(0.01)


def test_messages_are_stored_as_received_whole_streamed_and_across_a_kill(
    database_url: str, tmp_path: Path
) -> None:
    env = daemon_env(database_url, tmp_path / "wal", auth="keys", admin_token=TOKEN)
    assert run_cli(env, "migrate").returncode == 0
    made = run_cli(env, "keys", "create", "claude-code", "--json")
    assert made.returncode == 0, made.stderr
    secret = json.loads(made.stdout)["secret"]
    with DaemonProcess(env) as daemon:
        daemon.wait_caught_up()  # the keys are read then
        with sdk(daemon, "sk-not-a-key") as client, pytest.raises(anthropic.AuthenticationError):
            client.messages.create(model="mock", max_tokens=2, messages=MESSAGES)
        with sdk(daemon, secret) as client:  # the SDK sends the key as x-api-key
            raw = client.messages.with_raw_response.create(
                model="mock", max_tokens=5, messages=MESSAGES
            )
            whole, whole_id = raw.parse(), raw.headers["x-request-id"]
            with client.messages.stream(
                model="mock", max_tokens=6, messages=MESSAGES, extra_body={"mock_delay_ms": 1}
            ) as stream:
                streamed_id = stream.response.headers["x-request-id"]
                streamed = list(stream.text_stream)
                final = stream.get_final_message()
        slow = SlowStream(daemon, secret)
        slow.wait_for(5)
        daemon.kill()
        assert slow.done.wait(30)
    assert secret not in daemon.log
    with DaemonProcess(env) as restarted:  # its boot stores what the WAL holds
        restarted.wait_caught_up()
        store = read_store(database_url)
        restarted.stop()
    assert secret not in restarted.log

    assert whole.content[0].type == "text"
    assert store.texts(whole_id) == [whole.content[0].text]
    assert streamed == [token(i) for i in range(6)]
    assert final.content[0].text == "".join(streamed)
    assert store.texts(streamed_id) == streamed  # each delta once, in order
    for request_id in (whole_id, streamed_id):
        row = store.request(request_id)
        assert (row["status"], row["api"]) == ("completed", "messages")
        assert row["key_id"] is not None
    assert final.usage.output_tokens == store.request(streamed_id)["completion_tokens"]

    killed = store.texts(slow.request_id)
    assert len(slow.texts) >= 5
    assert killed[: len(slow.texts)] == slow.texts  # every delta received, stored once, in order
    assert store.request(slow.request_id)["status"] == "interrupted"
    assert store.request(slow.request_id)["api"] == "messages"

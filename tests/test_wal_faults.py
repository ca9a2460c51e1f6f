"""Faults under the WAL, met by a real daemon: a failed fsync and a full disk.

A failed fsync (issue 4, point 6) must end the daemon with exit code 1 and a CRITICAL log
line, since after it the page cache can no longer be trusted; the next boot recovers
from the log. tests/fault_daemon.py injects the failure (EIO from `os.fdatasync` once a
trigger file exists) into an otherwise unchanged `llmsvc run`.

A full disk (point 7) is a real one: a 4 MiB tmpfs mounted for the test holds the WAL,
and a filler file leaves little room. New requests must get 503 at once, open streams
must end with an error event, and the daemon must recover by itself once space returns.
Mounting needs root; `LLMSVC_TEST_TMPFS=skip` skips that test, reported as skipped.

Clients are the official `openai` SDK, recording every token they receive; the store
is read directly afterwards and must hold exactly that, once each, in order.
"""

from __future__ import annotations

import http.client
import json
import os
import re
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import openai
import pytest
from daemon_process import DaemonProcess, Stored, daemon_env, get_json, read_store, run_cli
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

TMPFS_ENV = "LLMSVC_TEST_TMPFS"
TMPFS_BYTES = 4 * 1024 * 1024
ROOM_LEFT = 256 * 1024  # what the filler leaves for the WAL: a few seconds of streaming


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


def assert_checks_clean(env: dict[str, str]) -> None:
    """`llmsvc check` passes and had nothing to repair (a repair would hide a lost token)."""
    check = run_cli(env, "check", "--json")
    assert check.returncode == 0, check.stdout + check.stderr
    report = json.loads(check.stdout)
    assert report["ok"] is True, check.stdout
    assert not report.get("repaired", {}).get("refilled"), check.stdout


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
    assert "shutdown: done exit_code=1 reason=fatal WAL error: wal: " in log, log
    assert "Traceback" not in log, log
    seen = [item for client in clients for item in client.seen]
    cut = [item for item in seen if not item.finished]
    assert cut, "the failure cut no stream short"
    for item in cut:  # an error event and [DONE], not a dropped connection
        assert type(item.error) is openai.APIError, (item, log)

    with DaemonProcess(env) as again:  # plain `llmsvc run`: boot replays the WAL
        assert again.stop() == 0, again.log
    assert re.search(r"boot: wal replayed records=\d+", again.log), again.log
    # The replay alone left no hole: nothing had to be refilled from the WAL afterwards.
    assert "token gap refilled" not in again.log, again.log
    assert "boot: consistency check ok gaps=0 count_mismatches=0" in again.log, again.log

    assert_store_holds_what_clients_saw(read_store(database_url), seen, exact=False)
    assert_checks_clean(env)


# -- point 7: a full disk ----------------------------------------------------------------


@pytest.fixture
def tiny_fs(tmp_path: Path) -> Iterator[Path]:
    """A 4 MiB tmpfs of the test's own, always unmounted afterwards."""
    if os.environ.get(TMPFS_ENV) == "skip":
        pytest.skip(f"disk-full test skipped on request ({TMPFS_ENV}=skip)")
    mount_point = tmp_path / "tinyfs"
    mount_point.mkdir()
    cmd = ["mount", "-t", "tmpfs", "-o", f"size={TMPFS_BYTES}", "tmpfs", str(mount_point)]
    try:
        res = subprocess.run(cmd, capture_output=True, text=True, timeout=10, check=False)
        problem = res.stderr.strip() if res.returncode else ""
    except OSError as exc:
        problem = str(exc)
    if problem:
        pytest.fail(
            f"cannot mount a tmpfs for the disk-full test ({problem}): run the tests as root "
            f"(mount needs CAP_SYS_ADMIN), or set {TMPFS_ENV}=skip to skip it",
            pytrace=False,
        )
    try:
        yield mount_point
    finally:
        subprocess.run(["umount", "-l", str(mount_point)], timeout=10, check=False)


def fill(directory: Path, leave: int) -> Path:
    """A file taking all the free space of `directory`'s filesystem but `leave` bytes."""
    stat = os.statvfs(directory)
    size = stat.f_bavail * stat.f_frsize - leave
    assert size > 0, f"only {stat.f_bavail * stat.f_frsize} bytes free"
    filler = directory / "filler"
    with filler.open("wb") as f:
        chunk = b"\0" * (64 * 1024)
        while size > 0:
            size -= f.write(chunk[: min(size, len(chunk))])
    return filler


@dataclass
class RawStream:
    """A streaming request read as plain SSE, to see how the stream itself ends."""

    base_url: str
    request_id: str = ""
    tokens: list[str] = field(default_factory=list)
    errors: list[dict[str, Any]] = field(default_factory=list)
    done: bool = False  # `data: [DONE]` arrived
    failure: Exception | None = None  # the connection broke, or no response

    def read(self) -> None:
        body = {
            "model": "mock",
            "messages": MESSAGES,
            "max_tokens": 1_000_000,
            "stream": True,
            "mock_delay_ms": 1,
        }
        url = urlsplit(self.base_url)
        conn = http.client.HTTPConnection(url.hostname or "", url.port, timeout=15)
        try:
            conn.request(
                "POST",
                "/v1/chat/completions",
                json.dumps(body),
                {"content-type": "application/json"},
            )
            resp = conn.getresponse()
            assert resp.status == 200, resp.read()
            self.request_id = resp.headers["x-request-id"]
            # readline raises IncompleteRead if the chunked body is cut short
            while line := resp.readline():
                data = line.decode().strip().removeprefix("data: ")
                if not line.startswith(b"data: "):
                    continue
                if data == "[DONE]":
                    self.done = True
                    continue
                event = json.loads(data)
                if "error" in event:
                    self.errors.append(event["error"])
                for choice in event.get("choices", []):
                    if content := choice["delta"].get("content"):
                        self.tokens.append(content)
        except Exception as exc:
            self.failure = exc
        finally:
            conn.close()


def test_full_disk_refuses_new_requests_ends_open_streams_and_recovers_when_space_returns(
    tiny_fs: Path, sqlite_url: str
) -> None:
    # One segment that never fills (the default 100 MiB), so the disk runs out inside
    # write(2) on the live segment, which no flush can remove to make room.
    env = daemon_env(sqlite_url, tiny_fs / "wal", shutdown_grace_seconds=5)
    with DaemonProcess(env) as daemon:
        filler = fill(tiny_fs, leave=ROOM_LEFT)
        opened: list[Seen] = []
        sdk_threads = []

        def open_stream() -> None:
            with client_for(daemon) as client:
                stream_once(client, 1_000_000, 1, opened)

        for _ in range(3):
            thread = threading.Thread(target=open_stream, daemon=True)
            thread.start()
            sdk_threads.append(thread)
        raw = RawStream(daemon.base_url)
        raw_thread = threading.Thread(target=raw.read, daemon=True)
        raw_thread.start()

        daemon.wait_for_log(r"\bwal full\b", timeout=30)
        for thread in [*sdk_threads, raw_thread]:
            thread.join(15)
            assert not thread.is_alive(), "a stream open when the disk filled did not end"

        # Streams that were open end with an error event, then [DONE]: no hang, no cut.
        assert len(opened) == 3, opened
        for item in opened:
            assert item.tokens, item
            assert not item.finished, item
            assert type(item.error) is openai.APIError, repr(item.error)  # an SSE error event
            assert "space" in item.error.message.lower(), item.error.message
        assert raw.failure is None, repr(raw.failure)
        assert raw.tokens, raw
        assert raw.done, raw
        assert len(raw.errors) == 1, raw.errors
        assert "space" in raw.errors[0]["message"].lower(), raw.errors

        # New requests are refused at once: 503, saying why.
        with client_for(daemon, timeout=5) as client:
            for stream in (True, False):
                with pytest.raises(openai.APIStatusError) as refused:
                    client.chat.completions.create(
                        model="mock", messages=MESSAGES, max_tokens=5, stream=stream
                    )
                assert refused.value.status_code == 503, refused.value
                assert "space" in refused.value.message.lower(), refused.value.message

            # While the disk stays full the writer's retries (about once a second) find no
            # room, and it keeps refusing rather than flapping back to writable.
            time.sleep(2.5)
            with pytest.raises(openai.APIStatusError) as still:
                client.chat.completions.create(model="mock", messages=MESSAGES, max_tokens=5)
            assert still.value.status_code == 503, still.value
            assert "wal writable again" not in daemon.log, daemon.log
            code, health = get_json(f"{daemon.base_url}/api/health")
            assert (code, health["status"]) == (200, "refusing"), health
            assert "disk is full" in health["reason"], health
            code, ready = get_json(f"{daemon.base_url}/api/ready")
            assert (code, ready["ready"]) == (503, False), ready
            assert ready["reason"] == health["reason"]

            # Space returns: the daemon notices by itself, no restart.
            filler.unlink()
            recovered: list[Seen] = []
            deadline = time.monotonic() + 15
            while not recovered:
                try:
                    recovered.append(stream_once(client, 5, 0))
                except openai.APIStatusError as exc:
                    refusal = exc
                else:
                    break
                assert refusal.status_code == 503, refusal
                assert time.monotonic() < deadline, f"still refusing after 15s:\n{daemon.log}"
                time.sleep(0.2)
            daemon.wait_for_log(r"\bwal writable again\b", timeout=5)
            recovered.append(stream_once(client, 40, 1))
            reply = client.chat.completions.with_raw_response.create(
                model="mock", messages=MESSAGES, max_tokens=7
            )
            content = reply.parse().choices[0].message.content
            whole = Seen(reply.headers["x-request-id"], [content or ""], finished=True)
        for item in recovered:
            assert item.finished, item
        code, health = get_json(f"{daemon.base_url}/api/health")
        assert (code, health["status"]) == (200, "ok"), health
        assert daemon.stop() == 0, daemon.log
    log = daemon.log
    assert "Traceback" not in log, log
    assert "CRITICAL" not in log, log

    store = read_store(sqlite_url)
    cut = [*opened, Seen(raw.request_id, raw.tokens)]
    assert_store_holds_what_clients_saw(store, [*cut, *recovered], exact=True)
    for item in cut:  # ended by the full disk: failed, with exactly what the client got
        request, attempt = store.request(item.request_id), store.only_attempt(item.request_id)
        assert (request["status"], attempt["status"]) == ("failed", "failed"), item
    assert store.texts(whole.request_id) == ["".join(mock_token(i) for i in range(7))]
    assert store.request(whole.request_id)["status"] == "completed"

    verify = run_cli(env, "wal", "verify", "--json")
    assert verify.returncode == 0, verify.stdout + verify.stderr
    assert not [s for s in json.loads(verify.stdout) if s["problem"]], verify.stdout
    assert_checks_clean(env)

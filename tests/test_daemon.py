"""The daemon's lifecycle as an operator meets it: crashes, locks, bad settings, shutdown.

Real `llmsvc run` processes on a real SQLite file, real SIGKILL and SIGTERM.
"""

from __future__ import annotations

import inspect
import re
import signal
import socket
import time
import tomllib
from importlib.metadata import version
from pathlib import Path
from typing import Any

import openai
import pytest
import uvicorn
from daemon_process import (
    CAUGHT_UP,
    REPO,
    DaemonProcess,
    Stream,
    client_for,
    daemon_env,
    read_store,
    run_cli,
)
from private_state import assert_private

from llmsvc.providers.mock import token as mock_token
from llmsvc.serving import EmbeddedServer

pytestmark = pytest.mark.timeout(60)

MESSAGES: list[Any] = [{"role": "user", "content": "go slowly"}]


def assert_holds(stored: list[str], received: list[str]) -> list[str]:
    """The store holds what the client received, in order, once; at most one token more.

    A token is journaled, then sent: a stop landing between the two (a window of
    microseconds in a 50 ms token period) leaves one stored token the client never saw.
    """
    assert stored[: len(received)] == received
    assert len(stored) - len(received) in (0, 1)
    assert stored == [mock_token(i) for i in range(len(stored))]
    return stored


@pytest.fixture
def env(sqlite_url: str, tmp_path: Path) -> dict[str, str]:
    return daemon_env(sqlite_url, tmp_path / "wal")


def test_tokens_a_client_received_survive_kill_9(env: dict[str, str], sqlite_url: str) -> None:
    with DaemonProcess(env) as daemon:
        slow = Stream(daemon, 200, 50).start()
        slow.wait_for_tokens(10)
        daemon.kill()
        slow.wait_done()
    assert isinstance(slow.error, openai.APIConnectionError)
    received = list(slow.tokens)

    with DaemonProcess(env) as again:
        assert again.stop() == 0, again.log
    assert "marked interrupted count=1" in again.log

    store = read_store(sqlite_url)
    request = store.request(slow.request_id)
    attempt = store.only_attempt(slow.request_id)
    assert (request["status"], attempt["status"]) == ("interrupted", "interrupted")
    stored = assert_holds(store.texts(slow.request_id), received)
    assert attempt["token_count"] == len(stored)


@pytest.mark.usefixtures("umask_022")
def test_the_state_a_daemon_on_the_defaults_creates_is_private(
    env: dict[str, str], tmp_path: Path
) -> None:
    """As `scripts/run` meets a fresh machine: the database and its side files, the WAL,
    its lock, identity and checkpoint copy, a backup: no one else may read prompts."""
    del env["LLMSVC_DATABASE_URL"]  # the default, under XDG_STATE_HOME
    env["XDG_STATE_HOME"] = str(tmp_path / "new" / "state")
    wal_dir = Path(env["LLMSVC_WAL_DIR"])
    with DaemonProcess(env) as daemon:
        client_for(daemon).chat.completions.create(model="mock", messages=MESSAGES)
        daemon.wait_caught_up()  # a backup needs the schema the catch-up migrates
        assert run_cli(env, "backup").returncode == 0
        deadline = time.monotonic() + 30
        while not (wal_dir / "checkpoint").exists():  # written after the flusher's commit
            assert time.monotonic() < deadline, daemon.log
            time.sleep(0.05)
        state = assert_private(tmp_path / "new")
        wal = assert_private(wal_dir)
    assert {
        "state/llmsvc/llmsvc.db",
        "state/llmsvc/llmsvc.db-wal",
        "state/llmsvc/llmsvc.db-shm",
        "state/llmsvc/llmsvc.db.locks/migrate.lock",
        "state/llmsvc/llmsvc.db.locks/backup.lock",
        "state/llmsvc/backups",
    } <= set(state)
    assert len([name for name in state if name.startswith("state/llmsvc/backups/")]) == 2
    assert {"LOCK", "instance_id", "checkpoint"} <= set(wal)
    assert any(name.endswith(".wal") for name in wal)


def test_a_second_daemon_on_the_same_wal_dir_fails_fast(env: dict[str, str]) -> None:
    with DaemonProcess(env) as first:
        began = time.monotonic()
        second = DaemonProcess(env).start(wait_ready=False)
        code = second.wait(timeout=20)
        took = time.monotonic() - began
        # The first daemon is unharmed: it still serves, and stops cleanly.
        with client_for(first) as client:
            reply = client.chat.completions.create(model="mock", messages=MESSAGES, max_tokens=2)
        assert reply.choices[0].message.content == mock_token(0) + mock_token(1)
        assert first.stop() == 0, first.log
    assert code == 1, second.log
    assert took < 10  # it gave up at once, it did not wait for the lock
    holder = first.proc.pid if first.proc else None
    wal_dir = re.escape(env["LLMSVC_WAL_DIR"])
    # What the operator reads last: the exit code, and the directory and the lock holder.
    assert re.search(
        rf"shutdown: done exit_code=1 reason=boot failed: the WAL directory {wal_dir} is in use "
        rf".*\(pid {holder}\)",
        second.log.splitlines()[-1],
    ), second.log
    assert "exit_code=0" not in second.log, second.log
    assert "Traceback" not in second.log, second.log


@pytest.mark.parametrize("workers", [1, 2])
def test_a_port_in_use_exits_1_and_the_last_line_says_so(env: dict[str, str], workers: int) -> None:
    with socket.create_server(("127.0.0.1", 0)) as taken:
        port = taken.getsockname()[1]
        result = run_cli({**env, "LLMSVC_PORT": str(port), "LLMSVC_WORKERS": str(workers)}, "run")
    assert result.returncode == 1, result.stderr
    last = result.stderr.splitlines()[-1]
    assert re.search(
        rf"ERROR (llmsvc\.daemon|supervisor llmsvc\.supervisor) shutdown: done exit_code=1 "
        rf"reason=boot failed: cannot listen on 127\.0\.0\.1:{port} \(.*in use",
        last,
    ), result.stderr
    assert "exit_code=0" not in result.stderr, result.stderr
    assert "Traceback" not in result.stderr, result.stderr


@pytest.mark.parametrize(
    ("setting", "value", "says"),
    [
        ("LLMSVC_WAL_SYNC", "sometimes", "wal_sync (from LLMSVC_WAL_SYNC): "),
        ("LLMSVC_PORT", "99999", "port (from LLMSVC_PORT): out of range: it takes 0 to 65535"),
        (
            "LLMSVC_PROVIDERS",
            '[{"name": "up", "kind": "openai", "base_url": "ftp://x", '
            '"api_key": "sk-do-not-echo", "models": ["m"]}]',
            "providers[0] (from LLMSVC_PROVIDERS): ",
        ),
        (
            "LLMSVC_DATABASE",
            "postgresql://llmsvc:sk-do-not-echo@db/llmsvc",
            "LLMSVC_DATABASE is not a setting (did you mean LLMSVC_DATABASE_URL?)",
        ),
    ],
)
def test_bad_configuration_exits_2_naming_the_setting_and_its_variable(
    env: dict[str, str], setting: str, value: str, says: str
) -> None:
    result = run_cli({**env, setting: value}, "run")
    assert result.returncode == 2, result.stderr
    message = result.stderr.strip()
    assert message.startswith(f"llmsvc: invalid configuration: {says}")
    assert "\n\n" not in message  # one paragraph
    assert "Traceback" not in message
    assert "sk-do-not-echo" not in message
    assert result.stdout == ""


def test_embedded_server_still_overrides_uvicorns_capture_signals() -> None:
    """`capture_signals` is not a promised uvicorn API: an upgrade that renames it fails here."""
    pinned = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["dependencies"]
    (pin,) = [d for d in pinned if d.startswith("uvicorn")]
    assert pin.endswith(f"=={version('uvicorn')}"), "uvicorn is not the pinned version"

    original = inspect.getattr_static(uvicorn.Server, "capture_signals")
    assert inspect.isgeneratorfunction(original.__wrapped__)  # a @contextmanager
    assert "self.capture_signals()" in inspect.getsource(uvicorn.Server.serve)
    override = EmbeddedServer.__dict__["capture_signals"]
    assert inspect.isgeneratorfunction(override.__wrapped__)

    server = EmbeddedServer(uvicorn.Config(app=lambda *args: None))
    before = {s: signal.getsignal(s) for s in (signal.SIGTERM, signal.SIGINT)}
    with server.capture_signals():
        assert {s: signal.getsignal(s) for s in before} == before


def test_sigterm_interrupts_a_stream_after_the_grace(env: dict[str, str], sqlite_url: str) -> None:
    with DaemonProcess({**env, "LLMSVC_SHUTDOWN_GRACE_SECONDS": "0.5"}) as daemon:
        slow = Stream(daemon, 200, 50).start()
        slow.wait_for_tokens(5)
        began = time.monotonic()
        assert daemon.stop() == 0, daemon.log
        took = time.monotonic() - began
        slow.wait_done()
    assert 0.5 <= took < 5, daemon.log
    assert isinstance(slow.error, openai.APIError)
    assert not isinstance(slow.error, openai.APIConnectionError)  # an error event, not a cut
    assert "shut down" in slow.error.message
    assert "open requests interrupted count=1" in daemon.log
    last = daemon.log.splitlines()[-1]
    assert last.endswith("INFO llmsvc.daemon shutdown: done exit_code=0 reason=SIGTERM received")

    store = read_store(sqlite_url)
    request = store.request(slow.request_id)
    attempt = store.only_attempt(slow.request_id)
    assert (request["status"], attempt["status"]) == ("interrupted", "interrupted")
    stored = assert_holds(store.texts(slow.request_id), slow.tokens)
    assert attempt["token_count"] == len(stored)


def test_a_new_request_during_the_drain_gets_503(env: dict[str, str], sqlite_url: str) -> None:
    with DaemonProcess({**env, "LLMSVC_SHUTDOWN_GRACE_SECONDS": "3"}) as daemon:
        slow = Stream(daemon, 200, 50).start()
        slow.wait_for_tokens(2)
        daemon.signal(signal.SIGTERM)
        daemon.wait_for_log("SIGTERM received")
        with client_for(daemon) as client, pytest.raises(openai.APIStatusError) as refused:
            client.chat.completions.create(model="mock", messages=MESSAGES, max_tokens=2)
        assert not slow.done.is_set()  # the open stream is still being served
        assert daemon.wait() == 0, daemon.log
        slow.wait_done()
    assert refused.value.status_code == 503
    assert isinstance(slow.error, openai.APIError)

    store = read_store(sqlite_url)
    assert list(store.requests) == [store.request(slow.request_id)["id"]]  # nothing for the 503
    assert store.request(slow.request_id)["status"] == "interrupted"
    assert_holds(store.texts(slow.request_id), slow.tokens)


def test_a_wal_that_lost_what_the_database_holds_never_hides_this_runs_records(
    env: dict[str, str], sqlite_url: str
) -> None:
    """The log's segments and checkpoint copy are gone (a power loss, a careless hand) while the
    database holds their records: the new run's LSNs start over below the stored checkpoint,
    and must be stored all the same."""
    with DaemonProcess(env) as daemon:
        with client_for(daemon) as client:
            for _ in range(3):
                client.chat.completions.create(model="mock", messages=MESSAGES, max_tokens=4)
        assert daemon.stop() == 0, daemon.log
    wal_dir = Path(env["LLMSVC_WAL_DIR"])
    for lost in [*wal_dir.glob("*.wal"), wal_dir / "checkpoint"]:
        lost.unlink()

    with DaemonProcess(env) as again:
        with client_for(again) as client:
            raw = client.chat.completions.with_raw_response.create(
                model="mock", messages=MESSAGES, max_tokens=5
            )
        again.wait_for_log(CAUGHT_UP)
        assert again.stop() == 0, again.log
    assert "records after it are this run's" in again.log
    store = read_store(sqlite_url)
    request_id = raw.headers["x-request-id"]
    assert store.request(request_id)["status"] == "completed"
    assert store.texts(request_id) == ["".join(mock_token(i) for i in range(5))]  # one reply

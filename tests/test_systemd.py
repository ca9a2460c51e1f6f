"""The systemd notify protocol on a real unix datagram socket (the units: tests/test_units.py).

The test plays systemd: it binds the socket (a path, or a name in the abstract
namespace written with a leading `@`), starts a real `llmsvc run` with
NOTIFY_SOCKET and WATCHDOG_USEC set, and reads what the daemon says.
"""

from __future__ import annotations

import os
import sys
import time
import urllib.request
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
from daemon_process import CAUGHT_UP, LLMSVC, REPO, DaemonProcess, daemon_env, get_json
from fake_systemd import FakeSystemd
from fault_daemon import HANG_ENV

from llmsvc.systemd import Notifier

pytestmark = pytest.mark.timeout(90)


@pytest.fixture(params=["path", "abstract"])
def systemd(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[FakeSystemd]:
    if request.param == "path":
        path = str(tmp_path / "notify.sock")
        fake = FakeSystemd(path, path)
    else:
        name = f"llmsvc-test-{uuid.uuid4().hex}"
        fake = FakeSystemd("\0" + name, "@" + name)
    yield fake
    fake.sock.close()


def test_the_notifier_sends_one_datagram_per_call(systemd: FakeSystemd) -> None:
    notifier = Notifier(systemd.name, watchdog_usec=3_000_000)

    assert notifier.ready("serving")
    assert notifier.status("draining")
    assert notifier.watchdog()
    assert notifier.stopping("bye")
    notifier.close()

    got = [systemd.receive(1) for _ in range(4)]
    assert got == [
        {"READY": "1", "STATUS": "serving", "MAINPID": str(os.getpid())},
        {"STATUS": "draining"},
        {"WATCHDOG": "1"},
        {"STOPPING": "1", "STATUS": "bye"},
    ]
    assert notifier.watchdog_interval == 1.5


def test_without_a_notify_socket_every_call_is_a_silent_no_op() -> None:
    notifier = Notifier(None, None)
    assert not notifier.ready("serving")
    assert not notifier.watchdog()
    assert notifier.watchdog_interval is None


def test_a_full_queue_never_blocks_the_sender(systemd: FakeSystemd) -> None:
    notifier = Notifier(systemd.name)
    started = time.monotonic()
    sent = [notifier.watchdog() for _ in range(2000)]  # nobody reads: the queue fills
    notifier.close()
    assert time.monotonic() - started < 2
    assert sent[0]
    assert not sent[-1]


def test_a_socket_nobody_listens_on_is_logged_not_fatal(tmp_path: Path) -> None:
    notifier = Notifier(str(tmp_path / "gone.sock"))
    assert not notifier.ready("serving")
    notifier.close()


def test_the_daemon_says_booting_ready_alive_and_stopping(
    systemd: FakeSystemd, sqlite_url: str, tmp_path: Path
) -> None:
    env = daemon_env(sqlite_url, tmp_path / "wal")
    env.update(NOTIFY_SOCKET=systemd.name, WATCHDOG_USEC="400000")
    with DaemonProcess(env, command=[str(LLMSVC), "run"]) as daemon:
        ready = systemd.wait_for("READY")
        pings = systemd.count("WATCHDOG", 1.5)  # every 0.2 s
        daemon.signal(15)
        stopping = systemd.wait_for("STOPPING")
        assert daemon.wait() == 0, daemon.log

    statuses = [m["STATUS"] for m in systemd.messages if "STATUS" in m]
    assert statuses[0].startswith("booting: ")
    assert ready["STATUS"] == f"serving on 127.0.0.1:{daemon.port}"
    assert ready["MAINPID"] == str(daemon.proc.pid if daemon.proc else 0)
    assert 4 <= pings <= 9
    assert stopping["STATUS"].startswith("stopping: ")
    assert not any("READY" in m for m in systemd.messages[: systemd.messages.index(ready)])


@pytest.mark.parametrize("systemd", ["path"], indirect=True)
def test_the_watchdog_keeps_pinging_while_the_flusher_hangs_and_the_stall_is_logged(
    systemd: FakeSystemd, sqlite_url: str, tmp_path: Path
) -> None:
    """A database that stops answering is an outage the WAL absorbs, not a reason to be killed."""
    hang = tmp_path / "hang"
    env = daemon_env(sqlite_url, tmp_path / "wal", database_timeout_seconds=2)
    env.update(NOTIFY_SOCKET=systemd.name, WATCHDOG_USEC="1000000", **{HANG_ENV: str(hang)})
    command = [sys.executable, str(REPO / "tests" / "fault_daemon.py")]
    with DaemonProcess(env, command=command) as daemon:
        systemd.wait_for("READY")
        daemon.wait_for_log(CAUGHT_UP)
        hang.touch()  # the next flush never returns: a database that stopped answering
        chat = urllib.request.Request(  # a request gives the flusher something to flush
            f"{daemon.base_url}/v1/chat/completions",
            data=b'{"model": "mock", "messages": [{"role": "user", "content": "hi"}]}',
            headers={"content-type": "application/json"},
        )
        with urllib.request.urlopen(chat, timeout=10) as response:
            assert response.status == 200
        daemon.wait_for_log(r"database stalled: the database has not answered for \d+ s", 20)
        systemd.drain()
        pings = systemd.count("WATCHDOG", 2.5)
        _, health = get_json(f"{daemon.base_url}/api/health")
        hang.unlink()
        daemon.wait_for_log(r"database stall over", 20)
        assert daemon.stop() == 0, daemon.log

    assert pings >= 2
    assert health["status"] == "degraded"
    assert health["reason"].startswith("the database has not answered for ")
    assert health["database"]["connected"] is False
    assert "watchdog: not telling systemd" not in daemon.log

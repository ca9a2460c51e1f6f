"""The flush process: the daemon's batches written by a child process of its own.

Real `llmsvc run` processes on a real SQLite file (which both processes write),
the official `openai` SDK, real SIGSTOP, SIGCONT and SIGKILL.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import uvloop
from daemon_process import (
    DaemonProcess,
    Stream,
    client_for,
    daemon_env,
    get_json,
    read_store,
    read_store_after,
)
from processes import alive, children, wait_until

from llmsvc.providers.mock import token as mock_token
from llmsvc.store.flush_process import FlushProcess

pytestmark = [pytest.mark.timeout(90), pytest.mark.usefixtures("flush_process")]

MESSAGES: list[Any] = [{"role": "user", "content": "hello"}]
CHILD = "llmsvc.store.flush_child"


@contextlib.contextmanager
def stopped(pid: int) -> Iterator[None]:
    """The process held with SIGSTOP for the block, then let go on with SIGCONT."""
    os.kill(pid, signal.SIGSTOP)
    try:
        yield
    finally:
        os.kill(pid, signal.SIGCONT)


def policies(pid: int) -> set[int]:
    """The scheduling policies of the threads of `pid`."""
    found = set()
    for task in Path(f"/proc/{pid}/task").iterdir():
        try:
            found.add(os.sched_getscheduler(int(task.name)))
        except ProcessLookupError:  # a thread that ended meanwhile
            continue
    return found


def lowered(daemon: DaemonProcess, child: int, sqlite_url: str) -> bool:
    """Whether every thread of the flush process is SCHED_IDLE after one more batch. It
    lowers itself at each batch, but on a loaded machine an idle process may answer late
    and be raised again: then the next call's batch lowers it anew."""
    read_store_after(sqlite_url, ask(daemon))
    return policies(child) == {os.SCHED_IDLE}


def writing_process(daemon: DaemonProcess) -> int | None:
    """The flush process health says writes the batches, if one does."""
    pid: int | None = get_json(f"{daemon.base_url}/api/health")[1]["database"]["flush_process"]
    return pid


def the_flush_process(daemon: DaemonProcess, other_than: int = 0) -> int:
    """The daemon's flush process (not `other_than`), once it writes the batches."""

    def new() -> int | None:
        pid = writing_process(daemon)
        return pid if pid != other_than else None

    child: int = wait_until(new, "a flush process writing the batches")
    assert daemon.proc is not None
    assert children(daemon.proc.pid, CHILD) == [child]
    return child


@pytest.fixture
def env(sqlite_url: str, tmp_path: Path) -> dict[str, str]:
    return daemon_env(sqlite_url, tmp_path / "wal", database_timeout_seconds=1)


def ask(daemon: DaemonProcess) -> str:
    """One whole request; its request id."""
    raw = client_for(daemon).chat.completions.with_raw_response.create(
        model="mock", messages=MESSAGES
    )
    return raw.headers["x-request-id"]


def test_the_daemons_batches_are_written_by_its_flush_process(
    env: dict[str, str], sqlite_url: str
) -> None:
    with DaemonProcess(env) as daemon:
        daemon.wait_caught_up()
        child = the_flush_process(daemon)

        with stopped(child):  # the daemon's own writes would go on meanwhile
            held = ask(daemon)
            time.sleep(2.0)  # 40 flush intervals, and the bound of one flush twice over
            assert held not in {str(r) for r in read_store(sqlite_url).requests}
        read_store_after(sqlite_url, held)  # stored once the flush process goes on
        assert children(daemon.proc.pid, CHILD) == [child]  # type: ignore[union-attr]
        assert daemon.stop() == 0, daemon.log
    assert not alive(child)
    assert "Traceback" not in daemon.log


def test_the_flush_process_yields_the_cpu_and_is_raised_when_its_answer_is_late(
    env: dict[str, str], sqlite_url: str
) -> None:
    with DaemonProcess(env) as daemon:
        daemon.wait_caught_up()
        child = the_flush_process(daemon)
        assert daemon.proc is not None
        assert os.getsid(child) == os.getsid(daemon.proc.pid)  # the daemon's autogroup
        assert os.getpgid(child) == child  # out of the terminal's Ctrl-C
        wait_until(lambda: lowered(daemon, child, sqlite_url), "the flush process idle")

        with stopped(child):  # its answer is late, as when starved of CPU
            held = ask(daemon)
            wait_until(lambda: policies(child) == {os.SCHED_OTHER}, "the late one raised", 5)
        read_store_after(sqlite_url, held)
        wait_until(lambda: lowered(daemon, child, sqlite_url), "the flush process idle again")
        assert daemon.stop() == 0, daemon.log
    assert f"flush process ready pid={child} yields_cpu=True" in daemon.log


def test_only_a_flush_process_that_can_be_raised_again_yields_the_cpu() -> None:
    """Without CAP_SYS_NICE or an RLIMIT_NICE of 20 a SCHED_IDLE process could not be
    raised, and would starve while the serving process is busy: it must not yield."""
    assert os.geteuid() == 0, "run the suite as root: the probe is run with and without caps"
    probe = "from llmsvc.store.flush_priority import can_yield; print(can_yield())"
    as_root = subprocess.run([sys.executable, "-c", probe], capture_output=True, timeout=30)
    assert as_root.stdout == b"True\n", as_root.stderr
    # Still root (so the venv is readable), but with every capability gone and RLIMIT_NICE
    # at its usual default, 0.
    no_caps = ["setpriv", "--inh-caps=-all", "--bounding-set=-all", "--no-new-privs"]
    nice_limit = ["prlimit", "--nice=0:0"]
    done = subprocess.run(
        [*nice_limit, *no_caps, sys.executable, "-c", probe], capture_output=True, timeout=30
    )
    assert (done.stdout, done.stderr) == (b"False\n", b"")


def test_a_flush_process_that_is_killed_loses_nothing_and_is_replaced(
    env: dict[str, str], sqlite_url: str
) -> None:
    with DaemonProcess(env) as daemon:
        daemon.wait_caught_up()
        first = the_flush_process(daemon)
        stream = Stream(daemon, 120, 20).start()
        stream.wait_for_tokens(20)
        os.kill(first, signal.SIGKILL)
        daemon.wait_for_log("the flush process ended, flushing in the daemon")
        during = ask(daemon)
        read_store_after(sqlite_url, during)  # written by the daemon meanwhile
        second = the_flush_process(daemon, other_than=first)
        stream.wait_done()
        after = ask(daemon)
        read_store_after(sqlite_url, after)
        assert writing_process(daemon) == second
        assert daemon.stop() == 0, daemon.log
    assert stream.error is None
    assert "Traceback" not in daemon.log
    stored = read_store(sqlite_url)
    assert stored.texts(stream.request_id) == [mock_token(i) for i in range(120)]
    assert stored.request(stream.request_id)["status"] == "completed"


def test_the_flush_process_dies_with_the_daemon(env: dict[str, str]) -> None:
    with DaemonProcess(env) as daemon:
        child = the_flush_process(daemon)
        daemon.kill()
    wait_until(lambda: not alive(child), "the flush process gone after its daemon's SIGKILL", 5)


def test_flush_process_false_writes_every_batch_in_the_daemon(
    sqlite_url: str, tmp_path: Path
) -> None:
    env = daemon_env(sqlite_url, tmp_path / "wal", flush_process=False)
    with DaemonProcess(env) as daemon:
        daemon.wait_caught_up()
        request_id = ask(daemon)
        read_store_after(sqlite_url, request_id)
        assert daemon.proc is not None
        assert children(daemon.proc.pid, CHILD) == []
        assert writing_process(daemon) is None
        assert daemon.stop() == 0, daemon.log


def test_a_flush_process_whose_daemon_died_before_it_started_exits_and_writes_nothing(
    sqlite_url: str, tmp_path: Path
) -> None:
    """Its daemon is gone before the child could ask to die with it: it must not write
    (a restarted daemon may be replaying the same WAL)."""
    config = {
        "daemon_pid": 1,  # not its parent: the one it was started by has died
        "database_url": sqlite_url,
        "timeout": 1.0,
        "wal_dir": str(tmp_path / "wal"),
        "instance": "00000000-0000-0000-0000-000000000001",
        "log_level": "INFO",
        "log_json": False,
        "secrets": [],
        "process": "flusher",
    }
    request = {"start": [1, 36, 1], "end": [1, 100, 3], "max_records": 10, "checkpoint": 0}
    lines = b"".join(json.dumps(line).encode() + b"\n" for line in (config, request))
    done = subprocess.run(
        [sys.executable, "-m", CHILD], input=lines, capture_output=True, timeout=30
    )
    assert (done.returncode, done.stdout, done.stderr) == (0, b"", b"")
    assert not Path(sqlite_url.split("///", 1)[1]).exists()


def test_closing_a_flush_process_that_ends_as_its_wait_runs_out_raises_nothing(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The loop may know the child has ended before its `wait()` is done: the daemon's stop
    then found the wait run out and killed a process already gone (uvloop's ProcessLookupError),
    and the flusher ended with a traceback. A wait of 0 s makes that moment certain."""
    monkeypatch.setattr("llmsvc.store.flush_process.STOP_SECONDS", 0)

    async def close_an_ended_child() -> int | None:
        proc = await asyncio.create_subprocess_exec(
            sys.executable, "-c", "pass", stdin=subprocess.PIPE, stdout=subprocess.PIPE
        )
        await proc.wait()  # ended; a new wait() is not done before the loop runs it
        await FlushProcess(proc).close()
        return proc.returncode

    assert uvloop.run(close_an_ended_child()) == 0

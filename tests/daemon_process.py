"""Real processes for end-to-end tests: `llmsvc run`, the OpenAI-compatible upstream, the store.

Every wait here is bounded: a daemon that never says `ready`, or never exits after a
signal, fails the test with its log instead of hanging the run.

Run as a script (`python tests/daemon_process.py upstream --api-key K`) it serves
tests/upstreams/openai_upstream.py with one extra route, `/with/{header}/{value}/v1/...`,
which behaves as if the request had carried that header. llmsvc forwards the
client's body but not its headers, so a provider whose `base_url` is such a path
is how a test steers the upstream (fail with a status, drop a stream, pace tokens).
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import json
import os
import re
import signal
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
import uuid
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType
from typing import Any, TypeVar

import openai
import orjson
from postgres import free_port

REPO = Path(__file__).resolve().parents[1]
LLMSVC = Path(sys.executable).parent / "llmsvc"
UPSTREAM_SCRIPT = REPO / "tests" / "upstreams" / "openai_upstream.py"
ANTHROPIC_SCRIPT = REPO / "tests" / "upstreams" / "anthropic_upstream.py"  # base URL: `root_url`
READY_TIMEOUT = 30.0
CAUGHT_UP = "boot: caught up with the database"  # a daemon's catch-up is done (after `ready`)
READY = r'\bready host=\S+ port=\d+|"message":"ready","host":'  # plain text or JSON logs
EXIT_TIMEOUT = 30.0

T = TypeVar("T")


def get_json(url: str) -> tuple[int, dict[str, Any]]:
    """GET over real HTTP: (status, JSON body), for 5xx answers too."""
    return fetch_json(urllib.request.Request(url), timeout=5)


def fetch_json(request: urllib.request.Request, timeout: float) -> tuple[int, dict[str, Any]]:
    """(status, JSON body) of a request, for 4xx and 5xx answers too."""
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            return response.status, orjson.loads(response.read())
    except urllib.error.HTTPError as exc:
        with exc:
            return exc.code, orjson.loads(exc.read())


FLUSH_PROCESS = False  # daemon_env's default for `flush_process`; see there


def daemon_env(database_url: str, wal_dir: Path, **settings: Any) -> dict[str, str]:
    """The environment for `llmsvc`: this one without any LLMSVC_* setting, plus the given.

    `settings` are setting names (`shutdown_grace_seconds=0.5`); the state folder points
    into the WAL's parent so a default never lands in the developer's home.

    The flush process is off unless `FLUSH_PROCESS` is set (the modules that test the flush
    path set it for each of their tests) or a test passes `flush_process`: it is the
    default, but each daemon's child costs ~0.6 s of CPU to start, a minute of the suite.
    """
    env = {k: v for k, v in os.environ.items() if not k.startswith("LLMSVC_")}
    env["XDG_STATE_HOME"] = str(wal_dir.parent / "state")
    env["LLMSVC_DATABASE_URL"] = database_url
    env["LLMSVC_WAL_DIR"] = str(wal_dir)
    env["LLMSVC_METRICS_PORT"] = "0"  # any free port: test daemons run side by side
    env["LLMSVC_FLUSH_PROCESS"] = str(FLUSH_PROCESS).lower()
    for name, value in settings.items():
        env[f"LLMSVC_{name.upper()}"] = str(value)
    return env


class _Output:
    """A child's merged stdout/stderr, read by a thread so the pipe never fills."""

    def __init__(self, proc: subprocess.Popen[str]) -> None:
        assert proc.stdout is not None
        self._pipe = proc.stdout
        self._lines: list[str] = []
        self._changed = threading.Condition()
        self._closed = False
        self._thread = threading.Thread(target=self._read, daemon=True)
        self._thread.start()

    def _read(self) -> None:
        for line in self._pipe:
            with self._changed:
                self._lines.append(line)
                self._changed.notify_all()
        with self._changed:
            self._closed = True
            self._changed.notify_all()

    @property
    def text(self) -> str:
        with self._changed:
            return "".join(self._lines)

    def wait_for(self, pattern: str, timeout: float, start: int = 0) -> re.Match[str] | None:
        """The first line from `start` on matching `pattern`; None if the output ends first."""
        regex = re.compile(pattern)
        deadline = time.monotonic() + timeout
        with self._changed:
            while True:
                for line in self._lines[start:]:
                    if found := regex.search(line):
                        return found
                start = len(self._lines)
                left = deadline - time.monotonic()
                if self._closed:
                    return None
                if left <= 0:
                    raise TimeoutError(f"no line matching {pattern!r} within {timeout}s")
                self._changed.wait(left)

    def mark(self) -> int:
        with self._changed:
            return len(self._lines)

    def close(self) -> None:
        self._thread.join(timeout=10)
        self._pipe.close()


# The free port picked for a daemon was taken by another process before the daemon bound it
# (the OS's words, "Address already in use", in the daemon's error; read without case).
PORT_TAKEN = "address already in use"


class DaemonProcess:
    """`llmsvc run` as a child process: started, waited for until `ready`, signalled.

    `command` replaces `llmsvc run` with a program that runs the daemon another way
    (tests/fault_daemon.py injects faults into it).
    """

    def __init__(
        self, env: dict[str, str], port: int | None = None, command: list[str] | None = None
    ) -> None:
        self.port = port or free_port()
        self.port_chosen = port is None  # another process may take a free port first: retried
        self.env = {**env, "LLMSVC_PORT": str(self.port)}
        self.command = command or [str(LLMSVC), "run"]
        self.proc: subprocess.Popen[str] | None = None
        self.output: _Output | None = None
        self.returncode: int | None = None

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def log(self) -> str:
        return self.output.text if self.output else ""

    def start(self, wait_ready: bool = True) -> DaemonProcess:
        self.returncode = None  # a process of its own: a restart, or a retry on a taken port
        self.proc = subprocess.Popen(
            self.command,
            env=self.env,
            cwd=Path(self.env["LLMSVC_WAL_DIR"]).parent,  # nothing may depend on the cwd
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        self.output = _Output(self.proc)
        if wait_ready:
            try:
                found = self.output.wait_for(READY, READY_TIMEOUT)
            except TimeoutError:
                self.kill()  # `with` never reaches __exit__ when __enter__ fails
                raise AssertionError(f"llmsvc not ready in {READY_TIMEOUT}s:\n{self.log}") from None
            if found is None:
                code = self.wait(EXIT_TIMEOUT)
                if self.port_chosen and PORT_TAKEN in self.log.lower():
                    self.port_chosen = False  # once: a second race is a problem of its own
                    self.port = free_port()
                    self.env["LLMSVC_PORT"] = str(self.port)
                    return self.start(wait_ready)
                raise AssertionError(f"llmsvc exited {code} before ready:\n{self.log}")
        return self

    def wait_for_log(self, pattern: str, timeout: float = 10.0) -> re.Match[str]:
        assert self.output is not None
        found = self.output.wait_for(pattern, timeout)
        if found is None:
            raise AssertionError(f"llmsvc ended without logging {pattern!r}:\n{self.log}")
        return found

    def wait_caught_up(self, daemons: int = 1, timeout: float = 30.0) -> None:
        """Until `daemons` daemons (a supervisor's workers) said their catch-up is done."""
        deadline = time.monotonic() + timeout
        while self.log.count(CAUGHT_UP) < daemons:
            assert self.returncode is None, self.log
            assert time.monotonic() < deadline, f"not caught up in {timeout}s:\n{self.log}"
            time.sleep(0.05)

    def signal(self, signum: int) -> None:
        assert self.proc is not None
        self.proc.send_signal(signum)

    def wait(self, timeout: float = EXIT_TIMEOUT) -> int:
        """The exit code; a daemon still running after `timeout` is killed and fails the test."""
        assert self.proc is not None
        assert self.output is not None
        if self.returncode is not None:
            return self.returncode
        try:
            self.returncode = self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(10)
            self.output.close()
            raise AssertionError(f"llmsvc did not exit within {timeout}s:\n{self.log}") from None
        self.output.close()
        return self.returncode

    def stop(self, timeout: float = EXIT_TIMEOUT) -> int:
        """SIGTERM, then the exit code."""
        self.signal(signal.SIGTERM)
        return self.wait(timeout)

    def kill(self) -> int:
        """SIGKILL: the crash the WAL exists for."""
        self.signal(signal.SIGKILL)
        return self.wait(10)

    def __enter__(self) -> DaemonProcess:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        if self.proc is not None and self.returncode is None:
            self.kill()


class UpstreamProcess:
    """tests/upstreams/openai_upstream.py (with the `/with/...` steering route), a child process."""

    def __init__(
        self,
        api_key: str | None = None,
        token_delay_ms: float = 0.0,
        port: int = 0,
        script: Path = UPSTREAM_SCRIPT,
    ) -> None:
        args = [sys.executable, str(script), "--port", str(port)]
        if script == UPSTREAM_SCRIPT:
            args += ["--token-delay-ms", str(token_delay_ms)]
        if api_key:
            args += ["--api-key", api_key]
        self.args = args
        self.port = 0
        self.proc: subprocess.Popen[str] | None = None
        self.output: _Output | None = None

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}/v1"

    @property
    def root_url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def steered_url(self, header: str, value: str) -> str:
        """A base_url whose requests act as if they carried `header: value`."""
        return f"http://127.0.0.1:{self.port}/with/{header}/{value}/v1"

    def __enter__(self) -> UpstreamProcess:
        self.proc = subprocess.Popen(
            self.args,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        self.output = _Output(self.proc)
        found = self.output.wait_for(r"^LISTENING (\d+)", READY_TIMEOUT)
        if found is None:
            self.proc.wait(10)
            self.output.close()
            raise AssertionError(f"the upstream did not start:\n{self.output.text}")
        self.port = int(found.group(1))
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        assert self.proc is not None
        assert self.output is not None
        self.proc.send_signal(signal.SIGTERM)
        try:
            self.proc.wait(10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(10)
        self.output.close()


def run_cli(
    env: dict[str, str], *args: str, timeout: float = 30.0
) -> subprocess.CompletedProcess[str]:
    """`llmsvc ARGS` to completion, output captured."""
    return subprocess.run(
        [str(LLMSVC), *args],
        env=env,
        stdin=subprocess.DEVNULL,
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )


# -- the store, read directly ----------------------------------------------------------


@dataclass
class Stored:
    """Everything the store holds, keyed for assertions."""

    requests: dict[uuid.UUID, dict[str, Any]]
    attempts: dict[uuid.UUID, list[dict[str, Any]]]  # request id -> attempts by number
    tokens: dict[uuid.UUID, list[tuple[int, str]]]  # attempt id -> (seq, text) by seq
    checkpoints: dict[uuid.UUID, int]

    def only_attempt(self, request_id: uuid.UUID | str) -> dict[str, Any]:
        attempts = self.attempts[uuid.UUID(str(request_id))]
        assert len(attempts) == 1, attempts
        return attempts[0]

    def request(self, request_id: uuid.UUID | str) -> dict[str, Any]:
        return self.requests[uuid.UUID(str(request_id))]

    def texts(self, request_id: uuid.UUID | str) -> list[str]:
        """The one attempt's token texts in seq order, checking seqs are 0..n-1 once each."""
        rows = self.tokens.get(self.only_attempt(request_id)["id"], [])
        seqs = [seq for seq, _ in rows]
        assert seqs == list(range(len(rows))), f"token seqs are not 0..n-1 once each: {seqs}"
        return [text for _, text in rows]


def read_store(database_url: str) -> Stored:
    """Read every llmsvc table (on a thread of its own, so any test style can call it)."""

    async def read() -> Stored:
        import sqlalchemy as sa
        from sqlalchemy.ext.asyncio import create_async_engine

        from llmsvc.store.schema import llm_attempts, llm_requests, llm_token_log, wal_checkpoints

        engine = create_async_engine(database_url)
        try:
            async with engine.connect() as conn:
                requests = {
                    row.id: dict(row._mapping)
                    for row in await conn.execute(sa.select(llm_requests))
                }
                attempts: dict[uuid.UUID, list[dict[str, Any]]] = {}
                query = sa.select(llm_attempts).order_by(llm_attempts.c.attempt_no)
                for row in await conn.execute(query):
                    attempts.setdefault(row.request_id, []).append(dict(row._mapping))
                tokens: dict[uuid.UUID, list[tuple[int, str]]] = {}
                query = sa.select(llm_token_log).order_by(
                    llm_token_log.c.attempt_id, llm_token_log.c.seq
                )
                for row in await conn.execute(query):
                    tokens.setdefault(row.attempt_id, []).append((row.seq, row.text))
                checkpoints = {
                    row.instance_id: row.lsn
                    for row in await conn.execute(sa.select(wal_checkpoints))
                }
        finally:
            await engine.dispose()
        return Stored(requests, attempts, tokens, checkpoints)

    return run_async(read)


def run_async(make: Callable[[], Awaitable[T]], timeout: float = 30.0) -> T:
    """Run a coroutine to completion on a fresh loop in a fresh thread."""

    async def main() -> T:
        return await make()

    with concurrent.futures.ThreadPoolExecutor(1) as pool:
        return pool.submit(asyncio.run, main()).result(timeout)


def read_store_after(database_url: str, request_id: str, timeout: float = 10.0) -> Stored:
    """The store once the request has ended in it: a running daemon flushes a moment later.

    Right after `ready` the schema may not be there yet: the daemon migrates as it catches up.
    """
    deadline = time.monotonic() + timeout
    while True:
        try:
            store = read_store(database_url)
        except Exception:
            if time.monotonic() > deadline:
                raise
        else:
            request = store.requests.get(uuid.UUID(request_id))
            if request is not None and request["status"] != "streaming":
                return store
            assert time.monotonic() < deadline, f"request {request_id} not stored in {timeout}s"
        time.sleep(0.05)


def response_request_id(response_id: str) -> str:
    """The request id a `/v1/responses` id (`resp_<hex>`) names."""
    return str(uuid.UUID(hex=response_id.removeprefix("resp_")))


def client_for(daemon: DaemonProcess) -> openai.OpenAI:
    """An SDK client of its own: a new connection (with workers, the kernel picks one)."""
    return openai.OpenAI(
        base_url=f"{daemon.base_url}/v1", api_key="unused", max_retries=0, timeout=60
    )


@dataclass
class Stream:
    """One streamed mock request read on a thread, every token the client received recorded."""

    daemon: DaemonProcess
    tokens_wanted: int
    delay_ms: int
    model: str = "mock"
    request_id: str = ""
    tokens: list[str] = field(default_factory=list)
    error: Exception | None = None
    done: threading.Event = field(default_factory=threading.Event)

    def start(self) -> Stream:
        threading.Thread(target=self._read, daemon=True).start()
        return self

    def _read(self) -> None:
        try:
            with client_for(self.daemon) as client:
                raw = client.chat.completions.with_raw_response.create(
                    model=self.model,
                    messages=[{"role": "user", "content": "go slowly"}],
                    max_tokens=self.tokens_wanted,
                    stream=True,
                    extra_body={"mock_delay_ms": self.delay_ms},
                )
                self.request_id = raw.headers["x-request-id"]
                for chunk in raw.parse():
                    for choice in chunk.choices:
                        if choice.delta.content:
                            self.tokens.append(choice.delta.content)
        except Exception as exc:
            self.error = exc
        finally:
            self.done.set()

    def wait_for_tokens(self, n: int, timeout: float = 30) -> None:
        deadline = time.monotonic() + timeout
        while len(self.tokens) < n:
            assert not self.done.is_set(), f"the stream ended early: {self.error!r}"
            assert time.monotonic() < deadline, f"only {len(self.tokens)} tokens in {timeout}s"
            time.sleep(0.01)

    def wait_done(self, timeout: float = 60) -> None:
        assert self.done.wait(timeout), "the client is still reading"


def admin_call(
    daemon: DaemonProcess,
    method: str,
    path: str,
    body: Any,
    token: str | None,
    raw: bytes | None = None,
) -> tuple[int, dict[str, Any]]:
    """An HTTP call with a bearer token (none: no header): (status, JSON body)."""
    data = raw if raw is not None else (json.dumps(body).encode() if body is not None else None)
    request = urllib.request.Request(f"{daemon.base_url}{path}", data=data, method=method)
    if token is not None:
        request.add_header("Authorization", f"Bearer {token}")
    return fetch_json(request, timeout=60)

"""SIGTERM with 100 streams in flight, and a second SIGTERM, on a real daemon.

A hundred clients (the `openai` SDK's async client) stream from the mock: half
would finish within the shutdown grace, half would not. The test plays systemd
on a notify socket to see STOPPING=1.
"""

from __future__ import annotations

import asyncio
import inspect
import re
import signal
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import openai
import pytest
from daemon_process import DaemonProcess, daemon_env, read_store, run_cli
from fake_systemd import FakeSystemd

from llmsvc.providers.mock import token as mock_token

pytestmark = pytest.mark.timeout(120)

MESSAGES: list[Any] = [{"role": "user", "content": "stream"}]
STREAMS = 100
DELAY_MS = 20


@dataclass
class Received:
    tokens: int  # asked for
    request_id: str = ""
    texts: list[str] = field(default_factory=list)
    finished: bool = False  # [DONE] and a finish_reason, no error
    error: str = ""


async def stream(client: openai.AsyncOpenAI, got: Received, started: asyncio.Event) -> None:
    try:
        raw = await client.chat.completions.with_raw_response.create(
            model="mock",
            messages=MESSAGES,
            max_tokens=got.tokens,
            stream=True,
            extra_body={"mock_delay_ms": DELAY_MS},
        )
        got.request_id = raw.headers["x-request-id"]
        chunks = raw.parse()
        if inspect.isawaitable(chunks):  # older SDKs: parse() is a coroutine
            chunks = await chunks
        async for chunk in chunks:
            for choice in chunk.choices:
                if choice.delta.content:
                    got.texts.append(choice.delta.content)
                    started.set()
                if choice.finish_reason:
                    got.finished = True
    except Exception as exc:  # the SSE error event of an interrupted stream, or a cut
        got.error, got.finished = str(exc), False


async def start_streams(
    base_url: str, plan: list[int]
) -> tuple[list[Received], list[asyncio.Task[None]], openai.AsyncOpenAI]:
    client = openai.AsyncOpenAI(base_url=f"{base_url}/v1", api_key="x", max_retries=0, timeout=60)
    got = [Received(n) for n in plan]
    started = [asyncio.Event() for _ in plan]
    tasks = [asyncio.create_task(stream(client, g, e)) for g, e in zip(got, started, strict=True)]
    await asyncio.wait_for(asyncio.gather(*(e.wait() for e in started)), 30)
    return got, tasks, client


def check_store(database_url: str, got: list[Received]) -> dict[str, int]:
    """Every client's tokens stored once, in order (at most one more); statuses settled."""
    store = read_store(database_url)
    statuses: dict[str, int] = {}
    for g in got:
        assert g.request_id, g
        stored = store.texts(g.request_id)
        assert stored[: len(g.texts)] == g.texts
        assert len(stored) - len(g.texts) in (0, 1), (len(stored), len(g.texts))
        assert stored == [mock_token(i) for i in range(len(stored))]
        status = store.request(g.request_id)["status"]
        statuses[status] = statuses.get(status, 0) + 1
    assert "streaming" not in statuses
    return statuses


def test_sigterm_with_100_streams_finishes_some_interrupts_the_rest_and_exits_0(
    sqlite_url: str, tmp_path: Path
) -> None:
    systemd = FakeSystemd(str(tmp_path / "notify.sock"), str(tmp_path / "notify.sock"))
    env = daemon_env(sqlite_url, tmp_path / "wal", shutdown_grace_seconds=2)
    env["NOTIFY_SOCKET"] = systemd.name
    # Short streams have at most 40 x 20 ms left when the signal comes: within the grace.
    plan = [40 if n % 2 else 1000 for n in range(STREAMS)]

    async def scenario(daemon: DaemonProcess) -> tuple[list[Received], int, float]:
        got, tasks, client = await start_streams(daemon.base_url, plan)
        signalled = time.monotonic()
        daemon.signal(signal.SIGTERM)
        await asyncio.sleep(0.2)
        try:
            await client.chat.completions.create(model="mock", messages=MESSAGES, max_tokens=2)
            refused = 200
        except openai.APIStatusError as exc:
            refused = exc.status_code
        await asyncio.wait_for(asyncio.gather(*tasks), 30)
        await client.close()
        return got, refused, time.monotonic() - signalled

    with DaemonProcess(env) as daemon:
        got, refused, took = asyncio.run(scenario(daemon))
        code = daemon.wait()
    while systemd.receive(0.1) is not None:  # what the daemon told "systemd", queued
        pass
    systemd.sock.close()

    assert code == 0, daemon.log
    assert refused == 503
    assert took < 2 + 5  # the grace, then the interrupted streams end at once
    short = [g for g in got if g.tokens == 40]
    long = [g for g in got if g.tokens == 1000]
    assert all(g.finished and len(g.texts) == 40 for g in short), [g.error for g in short]
    assert all(not g.finished and "shut down" in g.error for g in long), long[0]
    waiting = r"shutdown: waiting for open requests count=(\d+) grace_seconds=2(\.0)?\b"
    waited = re.search(waiting, daemon.log)
    assert waited is not None, daemon.log  # the grace says what it waits for
    assert len(long) <= int(waited[1]) <= STREAMS  # short streams may have ended before it
    assert f"shutdown: open requests interrupted count={len(long)}" in daemon.log
    assert check_store(sqlite_url, got) == {"completed": 50, "interrupted": 50}
    assert any(m.get("STOPPING") == "1" for m in systemd.messages)
    # Nothing left in the WAL for the next boot: the store is complete and consistent.
    assert "records left in the WAL" not in daemon.log
    checked = run_cli(env, "check")
    assert checked.returncode == 0, checked.stdout
    assert "backlog 0;" in checked.stdout


def test_a_second_sigterm_exits_at_once_and_the_restart_loses_nothing(
    sqlite_url: str, tmp_path: Path
) -> None:
    env = daemon_env(sqlite_url, tmp_path / "wal", shutdown_grace_seconds=60)
    plan = [1000] * 20

    async def scenario(daemon: DaemonProcess) -> tuple[list[Received], float]:
        got, tasks, client = await start_streams(daemon.base_url, plan)
        await asyncio.sleep(0.3)
        daemon.signal(signal.SIGTERM)
        await asyncio.sleep(0.3)
        second = time.monotonic()
        daemon.signal(signal.SIGTERM)
        await asyncio.wait_for(asyncio.gather(*tasks), 30)
        await client.close()
        return got, second

    with DaemonProcess(env) as daemon:
        got, second = asyncio.run(scenario(daemon))
        code = daemon.wait(10)
        took = time.monotonic() - second
    assert code == 1, daemon.log
    assert took < 5  # not the 60 s grace
    last = daemon.log.splitlines()[-1]
    assert "shutdown: done exit_code=1 reason=second SIGTERM: exiting now" in last, daemon.log

    with DaemonProcess(env) as again:
        assert again.stop() == 0, again.log
    assert f"marked interrupted count={len(plan)}" in again.log
    assert check_store(sqlite_url, got) == {"interrupted": len(plan)}

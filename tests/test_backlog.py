"""The WAL backlog as operators see it: its size in bytes, the metrics, health and admission.

The daemon end to end under a real outage and a real limit is in tests/test_outage.py;
here the parts are checked against figures computed independently from the segment
files, and the metrics port's lifecycle in a real daemon on SQLite.
"""

from __future__ import annotations

import asyncio
import socket
import urllib.error
import urllib.request
import uuid
from collections.abc import Callable
from dataclasses import replace
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import orjson
import pytest
import sqlalchemy as sa
from conftest import OpenWriter
from daemon_process import CAUGHT_UP, DaemonProcess, daemon_env
from policies import circuit_policy, flush_policy, retry_policy, wal_policy

from llmsvc.config import ProviderConfig
from llmsvc.gateway.app import Gateway
from llmsvc.gateway.breaker import Breakers
from llmsvc.gateway.journal import Journal
from llmsvc.gateway.router import Router
from llmsvc.metrics import Metrics, WalStatus
from llmsvc.providers import build_provider
from llmsvc.store.engine import create_engine, upgrade_to_head
from llmsvc.store.flusher import Flusher
from llmsvc.store.schema import wal_checkpoints
from llmsvc.wal.codec import FRAME
from llmsvc.wal.reader import scan_segment
from llmsvc.wal.segment import list_segments
from llmsvc.wal.writer import WalWriter

OK = WalStatus(
    database_up=True,
    backlog_records=0,
    backlog_bytes=0,
    backlog_limit_bytes=4096,
    checkpoint=41,
    last_lsn=41,
)


def frame_sizes(wal_dir: Path, wal_id: uuid.UUID) -> list[int]:
    """Every record's frame size, in LSN order, read from the segment files themselves."""
    sizes: list[int] = []

    def add(records: list[tuple[int, bytes]]) -> None:
        sizes.extend(FRAME.size + len(payload) for _, payload in records)

    for segment in list_segments(wal_dir):
        scan_segment(segment, wal_id, add)
    return sizes


async def journal_request(journal: Journal, tokens: int) -> None:
    request_id, attempt_id = uuid.uuid4(), uuid.uuid4()
    journal.request_start(request_id, uuid.uuid4(), "mock", True, [], {})
    journal.attempt_start(attempt_id, request_id, 1, "mock", "mock")
    for seq in range(tokens):
        await journal.tokens(attempt_id.bytes, seq, [f"token {seq} "])
    journal.attempt_end(attempt_id, status="completed", token_count=tokens)
    await journal.request_end(request_id, status="completed")


async def test_backlog_bytes_are_the_frames_after_the_checkpoint_across_segments(
    sqlite_url: str, wal_dir: Path, wal_id: uuid.UUID, open_writer: OpenWriter
) -> None:
    engine = create_engine(sqlite_url)
    await upgrade_to_head(engine)
    writer = open_writer(segment_max_bytes=1024)
    journal = Journal(writer)
    for _ in range(5):
        await journal_request(journal, 15)
    assert len(list_segments(wal_dir)) >= 4  # the backlog spans sealed segments and the live one
    sizes = frame_sizes(wal_dir, wal_id)
    assert len(sizes) == writer.end.lsn - 1

    flusher = Flusher(engine, wal_dir, wal_id, lambda: writer.end, flush_policy(batch_records=7))
    try:
        await flusher.start()
        assert flusher.backlog_bytes() == sum(sizes)
        while not flusher.caught_up:
            assert await flusher.flush_once() > 0
            assert flusher.backlog_bytes() == sum(sizes[flusher.checkpoint :]), flusher.checkpoint
        assert flusher.backlog_bytes() == 0

        await journal_request(journal, 3)  # the writer moves on: the backlog follows it
        behind = writer.end.lsn - 1 - flusher.checkpoint
        assert behind == 7
        assert flusher.backlog_bytes() == sum(frame_sizes(wal_dir, wal_id)[-behind:])
        await flusher.drain(within=10)
        assert flusher.backlog_bytes() == 0
    finally:
        await flusher.close()
        await engine.dispose()


@pytest.mark.parametrize("flusher_first", [False, True], ids=["writer-first", "flusher-first"])
async def test_a_log_that_ends_before_the_checkpoint_has_no_backlog_until_new_records(
    sqlite_url: str,
    wal_dir: Path,
    wal_id: uuid.UUID,
    open_writer: OpenWriter,
    flusher_first: bool,
) -> None:
    """After a lost tail the writer goes on after the checkpoint; older segments are no backlog.

    The daemon opens the writer first; with the flusher first, its reader starts outside
    any segment, and the count must still skip what lies below the checkpoint.
    """
    engine = create_engine(sqlite_url)
    await upgrade_to_head(engine)
    old = open_writer(segment_max_bytes=1024)
    for _ in range(3):
        await journal_request(Journal(old), 15)
    await old.close()
    assert len(list_segments(wal_dir)) >= 3
    checkpoint = old.end.lsn - 1 + 20  # the database is ahead of what the log kept
    async with engine.begin() as conn:
        await conn.execute(
            sa.insert(wal_checkpoints),
            {"instance_id": wal_id, "lsn": checkpoint, "updated_at": datetime.now(UTC)},
        )
    writer = WalWriter(wal_dir, wal_id, wal_policy(segment_max_bytes=1024))
    flusher = Flusher(engine, wal_dir, wal_id, lambda: writer.end, flush_policy())
    try:
        if flusher_first:
            await flusher.start()
        writer.open(asyncio.get_running_loop(), lambda exc: None, checkpoint)
        if not flusher_first:
            await flusher.start()
        assert writer.end.segment == checkpoint + 1
        assert flusher.backlog_bytes() == 0

        await journal_request(Journal(writer), 2)
        assert flusher.backlog_bytes() == sum(frame_sizes(wal_dir, wal_id)[-6:])
        await flusher.drain(within=10)
        assert flusher.backlog_bytes() == 0
    finally:
        await writer.close()
        await flusher.close()
        await engine.dispose()


def test_metrics_read_the_wal_status_at_each_scrape() -> None:
    status = [replace(OK, database_up=False, backlog_records=7, backlog_bytes=900, last_lsn=48)]
    metrics = Metrics()
    metrics.watch(lambda: status[0])
    metrics.requests_refused.labels(reason="backlog").inc()

    def value(name: str, **labels: str) -> float | None:
        return metrics.registry.get_sample_value(name, labels)

    assert value("llmsvc_database_up") == 0
    assert value("llmsvc_wal_backlog_records") == 7
    assert value("llmsvc_wal_backlog_bytes") == 900
    assert value("llmsvc_wal_backlog_limit_bytes") == 4096
    assert value("llmsvc_wal_checkpoint_lsn") == 41
    assert value("llmsvc_wal_last_lsn") == 48
    assert value("llmsvc_wal_disk_full") == 0
    assert value("llmsvc_requests_refused_total", reason="backlog") == 1
    assert value("llmsvc_requests_refused_total", reason="shutdown") == 0

    status[0] = replace(OK, disk_full=True)  # nothing to push: the next scrape sees the new state
    assert value("llmsvc_database_up") == 1
    assert value("llmsvc_wal_disk_full") == 1
    assert value("llmsvc_wal_backlog_bytes") == 0
    fresh = Metrics()  # a registry of its own: another daemon's counts never leak in
    assert (
        fresh.registry.get_sample_value("llmsvc_requests_refused_total", {"reason": "backlog"}) == 0
    )


def _gateway(writer: Any, status: Callable[[], WalStatus]) -> Gateway:
    config = ProviderConfig(name="mock", kind="mock", models=["mock"])
    router = Router([config], {"mock": build_provider(config)}, Breakers(circuit_policy()))
    return Gateway(Journal(writer), router, 4096, retry_policy(), wal_status=status)


async def _post_chat(gateway: Gateway) -> tuple[int, dict[str, Any]]:
    body = orjson.dumps({"model": "mock", "messages": [{"role": "user", "content": "hi"}]})
    sent: list[dict[str, Any]] = []

    async def receive() -> dict[str, Any]:
        return {"type": "http.request", "body": body, "more_body": False}

    async def send(message: dict[str, Any]) -> None:
        sent.append(message)

    scope = {
        "type": "http",
        "method": "POST",
        "path": "/v1/chat/completions",
        "headers": [(b"content-length", str(len(body)).encode())],
    }
    await gateway(scope, receive, send)
    return sent[0]["status"], orjson.loads(b"".join(m.get("body", b"") for m in sent[1:]))


async def test_health_says_how_and_ready_says_whether_requests_are_taken(
    open_writer: OpenWriter,
) -> None:
    status = [OK]
    gateway = _gateway(open_writer(), lambda: status[0])
    assert gateway.health_report() == {"status": "ok"}
    assert gateway.refusal() is None

    # A database outage alone: degraded, yet ready (the WAL absorbs it).
    status[0] = replace(OK, database_up=False, backlog_records=3, backlog_bytes=4096)
    report = gateway.health_report()
    assert report["status"] == "degraded"
    assert "unreachable" in report["reason"]
    assert gateway.refusal() is None

    status[0] = replace(status[0], backlog_bytes=4097)
    report = gateway.health_report()
    assert report["status"] == "refusing"
    assert "backlog of 4097 bytes" in report["reason"]
    assert "wal_backlog_limit_bytes=4096" in report["reason"]
    assert gateway.refusal() == report["reason"]

    status[0] = replace(OK, disk_full=True)
    assert gateway.health_report()["status"] == "refusing"
    assert "disk is full" in str(gateway.refusal())

    # A stall says so; the catch-up of a boot says what it does and waits for: still ready.
    stalled = "the database has not answered for 7 s"
    status[0] = replace(OK, database_up=False, database_problem=stalled)
    assert gateway.health_report()["reason"].startswith(stalled)
    assert gateway.refusal() is None
    status[0] = replace(OK, catching_up="migrating the database (for 3 s)")
    report = gateway.health_report()
    assert report["status"] == "degraded"
    assert report["reason"].startswith("catching up with the database: migrating the database")
    assert gateway.refusal() is None

    status[0] = OK

    gateway.draining = True
    assert gateway.health_report()["status"] == "stopping"
    assert "shutting down" in str(gateway.refusal())


async def test_a_request_over_the_backlog_limit_is_refused_before_anything_is_journaled(
    open_writer: OpenWriter,
) -> None:
    writer = open_writer()
    status = [replace(OK, backlog_bytes=5000, backlog_records=40)]  # database up, but behind
    gateway = _gateway(writer, lambda: status[0])
    before = writer.appended_lsn

    code, body = await _post_chat(gateway)
    assert code == 503
    assert body["error"]["code"] == "unavailable"
    assert body["error"]["message"].startswith(
        "llmsvc takes no new requests: the database is behind"
    )
    assert "wal_backlog_limit_bytes=4096" in body["error"]["message"]
    assert writer.appended_lsn == before
    refused = gateway.metrics.registry.get_sample_value(
        "llmsvc_requests_refused_total", {"reason": "backlog"}
    )
    assert refused == 1

    status[0] = OK  # drained below the limit: accepted again, with no one switching it back
    code, body = await _post_chat(gateway)
    assert code == 200, body
    assert writer.appended_lsn > before


def _scrape(port: int) -> str:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as response:
        return str(response.read().decode())


@pytest.mark.timeout(60)
def test_the_metrics_port_serves_from_boot_and_is_closed_at_shutdown(
    sqlite_url: str, tmp_path: Path
) -> None:
    with DaemonProcess(daemon_env(sqlite_url, tmp_path / "wal", metrics_port=0)) as daemon:
        port = int(daemon.wait_for_log(r"boot: metrics port=(\d+) host=127\.0\.0\.1").group(1))
        assert "llmsvc_database_up 1.0" in _scrape(port)
        assert daemon.stop() == 0, daemon.log
    assert "shutdown: metrics port closed" in daemon.log
    with pytest.raises(urllib.error.URLError, match="refused"):
        _scrape(port)


@pytest.mark.timeout(60)
def test_a_metrics_port_in_use_is_logged_and_the_gateway_still_serves(
    sqlite_url: str, tmp_path: Path
) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        env = daemon_env(sqlite_url, tmp_path / "wal", metrics_port=port)
        with DaemonProcess(env) as daemon:
            daemon.wait_for_log(
                rf"boot: metrics port not served, cannot listen on 127.0.0.1:{port}"
            )
            daemon.wait_for_log(CAUGHT_UP)
            with urllib.request.urlopen(f"{daemon.base_url}/api/health", timeout=5) as response:
                assert orjson.loads(response.read())["status"] == "ok"
            assert daemon.stop() == 0, daemon.log
    assert "Traceback" not in daemon.log, daemon.log

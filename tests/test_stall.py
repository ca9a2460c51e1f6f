"""A stalled database: every process of PostgreSQL SIGSTOPped under a running daemon.

A stall (a storage freeze, a partition without a reset, a failover) answers
nothing and refuses nothing. The WAL absorbs it like any outage: clients are
served, health and metrics say so within seconds, the watchdog keeps pinging,
a daemon starts and serves without the database, SIGTERM ends it within its
bound, and once the database answers every token a client received is stored
once, in order. Real `llmsvc run`, a PostgreSQL cluster of the test's own,
the official `openai` SDK.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import os
import re
import signal
import threading
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest
from clients import Clients, complete, health_until, openai_client, scrape, stream
from daemon_process import CAUGHT_UP, DaemonProcess, daemon_env, read_store
from fake_systemd import FakeSystemd
from postgres import PostgresCluster, sqlalchemy_url
from test_workers import systemd_for, two_free_ports, worker_pid

from llmsvc.config import Settings
from llmsvc.providers.mock import token as mock_token

pytestmark = [pytest.mark.timeout(120), pytest.mark.usefixtures("flush_process")]

STALLED = "the database has not answered for "


@contextlib.contextmanager
def streaming_load(clients: Clients, daemon: DaemonProcess, n: int = 3) -> Iterator[None]:
    """`n` clients streaming one request after another for the block, each checked as it ends."""
    done = threading.Event()

    def client_loop() -> None:
        with openai_client(daemon) as client:
            while not done.is_set():
                clients.record(stream(client, 20, 5), 20)

    with concurrent.futures.ThreadPoolExecutor(n) as pool:
        running = [pool.submit(client_loop) for _ in range(n)]
        try:
            yield
        finally:
            done.set()
        for future in running:
            future.result(timeout=30)  # a client that failed fails the test


def test_a_stall_is_degraded_within_seconds_the_watchdog_pings_and_nothing_is_lost(
    own_cluster: PostgresCluster, tmp_path: Path
) -> None:
    url = asyncio.run(own_cluster.create_database("llmsvc"))
    systemd = FakeSystemd(str(tmp_path / "notify.sock"), str(tmp_path / "notify.sock"))
    env = daemon_env(url, tmp_path / "wal", flush_interval_ms=10, database_timeout_seconds=2)
    env.update(NOTIFY_SOCKET=systemd.name, WATCHDOG_USEC="3000000")  # a ping every 1.5 s
    clients = Clients()
    with DaemonProcess(env) as daemon:
        daemon.wait_for_log(CAUGHT_UP)
        with streaming_load(clients, daemon), own_cluster.frozen():
            frozen = time.monotonic()
            _, stalled = health_until(daemon, lambda b: b["status"] == "degraded")
            seen_in = time.monotonic() - frozen
            database_up = scrape(daemon)["llmsvc_database_up"]
            served_before = len(clients.received)
            systemd.drain()
            pings = systemd.count("WATCHDOG", 7)  # past two watchdog periods of 3 s
            served_during = len(clients.received) - served_before
        health_until(
            daemon, lambda b: b["status"] == "ok" and b["wal"]["backlog_records"] == 0, timeout=30
        )
        assert daemon.stop() == 0, daemon.log
    systemd.sock.close()

    assert seen_in < 10, stalled
    assert stalled["reason"].startswith(STALLED), stalled
    assert stalled["database"]["connected"] is False
    assert database_up == 0
    assert served_during > 0
    assert pings >= 4
    assert "database stalled: the database has not answered for" in daemon.log
    assert "watchdog: not telling systemd" not in daemon.log
    assert "Traceback" not in daemon.log, daemon.log
    clients.assert_stored_once_in_order(url)


@contextlib.contextmanager
def stopped(cluster: PostgresCluster) -> Iterator[None]:
    cluster.stop("immediate")
    try:
        yield
    finally:
        cluster.start()


@pytest.mark.parametrize("away", ["frozen", "stopped"])
def test_a_daemon_started_while_the_database_is_away_serves_and_stores_it_all_once_back(
    own_cluster: PostgresCluster, tmp_path: Path, away: str
) -> None:
    url = asyncio.run(own_cluster.create_database("llmsvc"))
    env = daemon_env(url, tmp_path / "wal", database_timeout_seconds=2)
    clients = Clients()
    # The previous run: killed with a stream open and nothing flushed.
    with DaemonProcess({**env, "LLMSVC_FLUSH_INTERVAL_MS": "60000"}) as previous:
        previous.wait_for_log(CAUGHT_UP)  # the flusher has looked once: the next look is in 60 s
        with openai_client(previous) as client:
            clients.record(complete(client, 3), 3)
        cut = threading.Event()
        with concurrent.futures.ThreadPoolExecutor(1) as pool, openai_client(previous) as client:
            running = pool.submit(stream, client, 200, 20, cut)
            assert cut.wait(10)
            time.sleep(0.3)
            previous.kill()
            assert running.exception(timeout=10) is not None  # cut off mid-stream

    daemon = DaemonProcess(env)
    try:
        with own_cluster.frozen() if away == "frozen" else stopped(own_cluster):
            daemon.start()  # ready without the database
            with openai_client(daemon) as client:
                clients.record(stream(client, 7), 7)
                clients.record(complete(client, 4), 4)
            _, waiting = health_until(daemon, lambda b: "waiting" in b.get("reason", ""))
        daemon.wait_for_log(CAUGHT_UP, 30)
        assert daemon.stop() == 0, daemon.log
    finally:
        if daemon.returncode is None:
            daemon.kill()

    assert waiting["status"] == "degraded"
    assert waiting["reason"].startswith("catching up with the database: migrating the database")
    assert waiting["database"]["connected"] is False
    assert waiting["database"]["last_error"]  # why the catch-up waits, as its reason says
    assert waiting["database"]["last_error"] in waiting["reason"]
    assert "Traceback" not in daemon.log, daemon.log
    store = read_store(sqlalchemy_url(url))
    cut_off = [r for r in store.requests.values() if r["status"] == "interrupted"]
    assert len(cut_off) == 1  # the previous run's stream, marked by this run's catch-up
    texts = store.texts(cut_off[0]["id"])
    assert texts == [mock_token(i) for i in range(len(texts))]
    assert texts, "the interrupted stream's tokens were not stored"
    del store.requests[cut_off[0]["id"]]
    clients.assert_stored_once_in_order(url, store)


@pytest.mark.parametrize("stalled", ["serving", "catching up"])
def test_sigterm_during_a_stall_ends_the_daemon_within_its_bound_and_the_next_boot_stores_all(
    own_cluster: PostgresCluster, tmp_path: Path, stalled: str
) -> None:
    """Stalled once the daemon caught up, or from its boot on: it ends within its bound."""
    url = asyncio.run(own_cluster.create_database("llmsvc"))
    grace, drain = 1, 3
    env = daemon_env(
        url,
        tmp_path / "wal",
        shutdown_grace_seconds=grace,
        shutdown_drain_seconds=drain,
        database_timeout_seconds=2,
    )
    settings = Settings.model_construct(shutdown_grace_seconds=grace, shutdown_drain_seconds=drain)
    bound = settings.shutdown_seconds()  # what the daemon must end within
    clients = Clients()
    daemon = DaemonProcess(env)
    try:
        if stalled == "serving":
            daemon.start().wait_caught_up()
            with openai_client(daemon) as client:
                clients.record(stream(client, 5), 5)
        with own_cluster.frozen():
            if stalled == "catching up":
                daemon.start()
            with openai_client(daemon) as client:
                clients.record(stream(client, 9), 9)
                clients.record(complete(client, 6), 6)
            daemon.signal(signal.SIGTERM)
            signalled = time.monotonic()
            code = daemon.wait(bound)
            took = time.monotonic() - signalled
    finally:
        if daemon.returncode is None:
            daemon.kill()
    left = re.search(r"records left in the WAL for the next boot count=(\d+)", daemon.log)

    with DaemonProcess(env) as again:
        again.wait_caught_up()
        assert again.stop() == 0, again.log

    assert code == 0, daemon.log
    assert took < bound
    assert left is not None, daemon.log
    assert int(left.group(1)) > 0
    assert "Traceback" not in daemon.log, daemon.log
    assert "Traceback" not in again.log, again.log
    clients.assert_stored_once_in_order(url)


def requests_served(metrics_port: int) -> float:
    """Chat requests a worker has served, from its own metrics port."""
    url = f"http://127.0.0.1:{metrics_port}/metrics"
    with urllib.request.urlopen(url, timeout=5) as response:
        text = response.read().decode()
    return sum(
        float(line.rpartition(" ")[2])
        for line in text.splitlines()
        if line.startswith("llmsvc_requests_total{")
    )


def test_with_two_workers_a_stall_kills_nobody_and_a_worker_killed_in_it_is_replaced_and_serves(
    own_cluster: PostgresCluster, tmp_path: Path
) -> None:
    url = asyncio.run(own_cluster.create_database("llmsvc"))
    metrics_port = two_free_ports()
    env = daemon_env(
        url, tmp_path / "wal", workers=2, metrics_port=metrics_port, database_timeout_seconds=2
    )
    clients = Clients()

    def call(n: int) -> None:
        """One request on a connection of its own: the kernel picks the worker."""
        with openai_client(daemon) as client:
            clients.record(complete(client, n), n)

    with (
        systemd_for(env, tmp_path, 3_000_000) as systemd,  # each worker pings every 1.5 s
        DaemonProcess(env) as daemon,
    ):
        systemd.wait_for("READY")
        daemon.wait_caught_up(2)
        with own_cluster.frozen():
            frozen = time.monotonic()
            for n in range(1, 9):
                call(n)
            os.kill(worker_pid(daemon, 0), signal.SIGKILL)
            daemon.wait_for_log(r"worker-0 ready again", 30)
            for n in range(1, 41):  # until the replacement has served some
                call(n)
                if requests_served(metrics_port) >= 2:
                    break
            replacement_served = requests_served(metrics_port)
            time.sleep(max(0.0, 7 - (time.monotonic() - frozen)))  # past two watchdog periods
            systemd.drain()
            pings = systemd.count("WATCHDOG", 2)
        daemon.wait_caught_up(3)  # the replacement's catch-up, once it can
        assert daemon.stop() == 0, daemon.log

    assert replacement_served >= 2
    assert pings >= 1
    assert "stopped pinging its watchdog" not in daemon.log
    assert daemon.log.count("exited signal=") == 1  # only the worker the test killed
    assert "Traceback" not in daemon.log, daemon.log
    clients.assert_stored_once_in_order(url)

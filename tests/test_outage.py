"""A PostgreSQL outage under a running daemon: clients never notice, the store loses nothing.

Real `llmsvc run`, the official `openai` SDK, a PostgreSQL cluster of this test's own that
is crashed (`pg_ctl stop -m immediate`) and brought back while the daemon serves. Operators
see the outage on `/api/health` and the metrics port; past `wal_backlog_limit_bytes` new
requests are refused with 503 until the backlog drains.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import threading
import time
from pathlib import Path

import openai
import pytest
from clients import Clients, complete, health, health_until, openai_client, scrape, stream
from daemon_process import CAUGHT_UP, DaemonProcess, daemon_env, get_json
from postgres import PostgresCluster

pytestmark = pytest.mark.timeout(60)

FLUSH_FAILED = "flush failed, records wait in the WAL"
FLUSH_RECOVERED = r"flush recovered checkpoint=\d+"


def test_requests_keep_working_through_a_database_outage_and_nothing_is_lost(
    own_cluster: PostgresCluster, tmp_path: Path
) -> None:
    url = asyncio.run(own_cluster.create_database("llmsvc"))
    env = daemon_env(
        url, tmp_path / "wal", flush_interval_ms=10, shutdown_grace_seconds=5, metrics_port=0
    )
    clients = Clients()
    record = clients.record

    with DaemonProcess(env) as daemon, openai_client(daemon) as client:
        daemon.wait_for_log(CAUGHT_UP)
        for n in (5, 12):
            record(stream(client, n), n)

        began = time.monotonic()
        own_cluster.stop("immediate")
        for n in (7, 20, 3):
            record(stream(client, n), n)
            record(complete(client, n + 1), n + 1)
        daemon.wait_for_log(FLUSH_FAILED, timeout=5)
        time.sleep(max(0.0, 2.0 - (time.monotonic() - began)))  # the flusher keeps retrying
        record(stream(client, 9), 9)
        record(complete(client, 4), 4)
        assert daemon.log.count(FLUSH_FAILED) == 1, daemon.log

        assert daemon.output is not None
        mark = daemon.output.mark()
        own_cluster.start()
        found = daemon.output.wait_for(FLUSH_RECOVERED, 10, start=mark)
        assert found is not None, daemon.log
        record(stream(client, 6), 6)

        assert daemon.stop() == 0, daemon.log
    assert daemon.log.count(FLUSH_FAILED) == 1, daemon.log
    assert "Traceback" not in daemon.log, daemon.log
    clients.assert_stored_once_in_order(url)


def test_health_and_metrics_show_the_outage_and_the_growing_backlog(
    own_cluster: PostgresCluster, tmp_path: Path
) -> None:
    url = asyncio.run(own_cluster.create_database("llmsvc"))
    env = daemon_env(
        url, tmp_path / "wal", flush_interval_ms=10, shutdown_grace_seconds=5, metrics_port=0
    )
    clients = Clients()

    with (
        DaemonProcess(env) as daemon,
        openai_client(daemon) as client,
        concurrent.futures.ThreadPoolExecutor(1) as pool,
    ):
        clients.record(stream(client, 5), 5)
        status, body = health_until(
            daemon, lambda b: b["status"] == "ok" and b["wal"]["backlog_records"] == 0
        )
        assert (status, body["status"], body["database"]["connected"]) == (200, "ok", True), body
        assert scrape(daemon)["llmsvc_database_up"] == 1

        own_cluster.stop("immediate")
        accepted = threading.Event()
        running = pool.submit(stream, client, 300, 5, accepted)  # a stream through the polls
        assert accepted.wait(10)
        clients.record(stream(client, 7), 7)
        daemon.wait_for_log(FLUSH_FAILED, timeout=10)

        status, first = health(daemon)
        assert (status, first["status"], first["database"]["connected"]) == (200, "degraded", False)
        assert "database is unreachable" in first["reason"]
        before = scrape(daemon)
        assert before["llmsvc_database_up"] == 0
        clients.record(stream(client, 12), 12)
        clients.record(complete(client, 3), 3)
        status, second = health(daemon)
        assert (status, second["status"]) == (200, "degraded"), second
        assert second["wal"]["backlog_records"] > first["wal"]["backlog_records"], second
        assert second["wal"]["backlog_bytes"] > first["wal"]["backlog_bytes"], second
        assert second["wal"]["checkpoint"] == first["wal"]["checkpoint"], second
        after = scrape(daemon)
        for gauge in ("llmsvc_wal_backlog_records", "llmsvc_wal_backlog_bytes"):
            assert after[gauge] > before[gauge] > 0, (gauge, before, after)
        assert after["llmsvc_wal_last_lsn"] > before["llmsvc_wal_last_lsn"]
        clients.record(running.result(timeout=30), 300)

        own_cluster.start()
        status, body = health_until(
            daemon, lambda b: b["status"] == "ok" and b["wal"]["backlog_records"] == 0
        )
        assert (status, body["database"]["connected"], body["wal"]["backlog_bytes"]) == (
            200,
            True,
            0,
        )
        assert body["wal"]["checkpoint"] == body["wal"]["last_lsn"], body
        samples = scrape(daemon)
        assert samples["llmsvc_database_up"] == 1
        assert samples["llmsvc_wal_backlog_bytes"] == 0
        clients.record(stream(client, 6), 6)
        assert daemon.stop() == 0, daemon.log
    assert "Traceback" not in daemon.log, daemon.log
    clients.assert_stored_once_in_order(url)


def test_past_the_backlog_limit_new_requests_get_503_until_the_backlog_drains(
    own_cluster: PostgresCluster, tmp_path: Path
) -> None:
    limit = 4096  # a few hundred mock tokens
    url = asyncio.run(own_cluster.create_database("llmsvc"))
    env = daemon_env(
        url,
        tmp_path / "wal",
        flush_interval_ms=10,
        shutdown_grace_seconds=5,
        metrics_port=0,
        wal_backlog_limit_bytes=limit,
    )
    clients = Clients()

    with (
        DaemonProcess(env) as daemon,
        openai_client(daemon) as client,
        concurrent.futures.ThreadPoolExecutor(1) as pool,
    ):
        clients.record(stream(client, 5), 5)
        daemon.wait_for_log(CAUGHT_UP)
        own_cluster.stop("immediate")
        # Taken under the limit, this stream runs (at least 5 s: 500 tokens 10 ms apart)
        # while its own tokens push the backlog over it.
        accepted = threading.Event()
        running = pool.submit(stream, client, 500, 10, accepted)
        assert accepted.wait(10)
        daemon.wait_for_log(FLUSH_FAILED, timeout=10)
        health_until(daemon, lambda b: b["wal"]["backlog_bytes"] > limit)

        with pytest.raises(openai.APIStatusError) as refused:
            stream(client, 3)
        assert refused.value.status_code == 503
        message = refused.value.body["message"]  # type: ignore[index]
        assert f"wal_backlog_limit_bytes={limit}" in message, message
        assert "database is unreachable" in message, message
        with pytest.raises(openai.APIStatusError, match="wal_backlog_limit_bytes"):
            complete(client, 3)
        assert not running.done(), "the running stream should still be streaming"

        status, body = health(daemon)
        assert (status, body["status"], body["database"]["connected"]) == (200, "refusing", False)
        assert get_json(f"{daemon.base_url}/api/ready")[0] == 503
        assert body["wal"]["backlog_bytes"] > body["wal"]["backlog_limit_bytes"] == limit, body
        assert f"wal_backlog_limit_bytes={limit}" in body["reason"], body
        samples = scrape(daemon)
        assert samples['llmsvc_requests_refused_total{reason="backlog"}'] == 2, samples
        assert samples["llmsvc_wal_backlog_bytes"] > samples["llmsvc_wal_backlog_limit_bytes"]
        clients.record(running.result(timeout=30), 500)  # already streaming: not cut off

        own_cluster.start()
        status, body = health_until(daemon, lambda b: b["status"] == "ok")
        assert (status, body["database"]["connected"]) == (200, True), body
        assert body["wal"]["backlog_bytes"] <= limit, body
        clients.record(stream(client, 8), 8)  # accepted again, by itself
        clients.record(complete(client, 4), 4)
        assert daemon.stop() == 0, daemon.log
    assert "Traceback" not in daemon.log, daemon.log
    clients.assert_stored_once_in_order(url)  # the refused requests left nothing behind


def test_a_job_due_during_the_outage_misses_its_slot_in_one_line_and_runs_once_it_is_back(
    own_cluster: PostgresCluster, tmp_path: Path
) -> None:
    url = asyncio.run(own_cluster.create_database("llmsvc"))
    every_second = "* * * * * *"  # seconds first: a slot every second
    env = daemon_env(url, tmp_path / "wal", prune_schedule=every_second)
    with DaemonProcess(env) as daemon:
        daemon.wait_for_log(r"job prune status=ok")
        own_cluster.stop()
        daemon.wait_for_log(r"job prune missed slot=\S+ error=\w+")
        runs_before = daemon.log.count("job prune status=ok")
        own_cluster.start()
        deadline = time.monotonic() + 15
        while daemon.log.count("job prune status=ok") == runs_before:
            assert time.monotonic() < deadline, daemon.log
            time.sleep(0.1)
        assert daemon.stop() == 0, daemon.log
    assert "Traceback" not in daemon.log, daemon.log

"""One record the database refuses never stops the store: a real daemon on both databases.

The request from the finding that wedged PostgreSQL for good (a metadata key
holding U+0000) is stored and every request after it flows; a record no form
of which the database takes, left in the WAL by an earlier run, is set aside
at boot, the restart becomes ready, and `llmsvc check` reports it until an
operator acknowledges it.
"""

from __future__ import annotations

import asyncio
import json
import time
import urllib.request
import uuid
from pathlib import Path

import pytest
from daemon_process import DaemonProcess, daemon_env, get_json, read_store, run_cli
from policies import wal_policy
from postgres import sqlalchemy_url
from test_outage import Clients, openai_client, stream

from llmsvc.gateway.journal import Journal
from llmsvc.wal import codec
from llmsvc.wal.segment import instance_id
from llmsvc.wal.writer import WalWriter

pytestmark = [pytest.mark.timeout(90), pytest.mark.usefixtures("flush_process")]


def _post_raw(daemon: DaemonProcess, body: bytes) -> tuple[int, str]:
    request = urllib.request.Request(
        f"{daemon.base_url}/v1/chat/completions",
        data=body,
        headers={"content-type": "application/json"},
    )
    with urllib.request.urlopen(request, timeout=10) as response:
        return response.status, response.headers["x-request-id"]


def _caught_up(daemon: DaemonProcess, timeout: float = 20) -> dict[str, object]:
    deadline = time.monotonic() + timeout
    while True:
        _, body = get_json(f"{daemon.base_url}/api/health")
        if body["status"] == "ok" and body["wal"]["backlog_records"] == 0:
            return body
        assert time.monotonic() < deadline, body
        time.sleep(0.05)


def test_a_metadata_key_holding_u0000_is_stored_and_every_later_request_flows(
    database_url: str, wal_dir: Path
) -> None:
    body = b'{"model":"mock","messages":[{"role":"user","content":"hi"}],'
    body += b'"metadata":{"a\\u0000b":"1"},"extra":{"c\\u0000":{"d\\u0000":[1]}}}'
    with DaemonProcess(daemon_env(database_url, wal_dir)) as daemon:
        status, request_id = _post_raw(daemon, body)
        assert status == 200
        clients = Clients()
        client = openai_client(daemon)
        for n in (3, 5, 8):
            clients.record(stream(client, n), n)
        _caught_up(daemon)

    store = read_store(sqlalchemy_url(database_url))
    odd = store.request(request_id)
    assert odd["status"] == "completed"
    nul = "\ufffd" if "postgresql" in database_url else "\x00"
    assert odd["metadata"] == {f"a{nul}b": "1"}
    assert odd["params"]["extra"] == {f"c{nul}": {f"d{nul}": [1]}}
    for got in clients.received:
        assert store.texts(got.request_id) == got.tokens


async def _journal_poison_then_a_stream(wal_dir: Path) -> uuid.UUID:
    """An earlier run's WAL: a start record that is no request at all, then a whole request."""
    writer = WalWriter(wal_dir, instance_id(wal_dir), wal_policy())
    writer.open(asyncio.get_running_loop(), lambda exc: None)
    journal = Journal(writer)
    poison = codec.encode_json(codec.RecordType.REQUEST_START, {"id": "not-a-uuid", "ts": 1})
    writer.append(poison)
    request_id, attempt_id = uuid.uuid4(), uuid.uuid4()
    journal.request_start(request_id, uuid.uuid4(), "mock", True, [], {})
    journal.attempt_start(attempt_id, request_id, 1, "mock", "mock")
    journal.tokens(attempt_id.bytes, 0, ["after ", "the ", "poison"])
    journal.attempt_end(attempt_id, status="completed", token_count=3)
    await journal.request_end(request_id, status="completed", provider="mock")
    await writer.close()
    return request_id


def test_a_wal_holding_a_record_no_form_of_which_is_storable_boots_and_check_reports_it(
    database_url: str, wal_dir: Path
) -> None:
    request_id = asyncio.run(_journal_poison_then_a_stream(wal_dir))
    env = daemon_env(database_url, wal_dir)
    with DaemonProcess(env) as daemon:
        health = _caught_up(daemon)
        assert health["database"]["refused_records"] == {"sanitised": 0, "set_aside": 1}
        clients = Clients()
        clients.record(stream(openai_client(daemon), 4), 4)
        _caught_up(daemon)
        daemon.wait_for_log(r"flush: record refused by the database, set aside lsn=1 ")

    store = read_store(sqlalchemy_url(database_url))
    assert store.texts(str(request_id)) == ["after ", "the ", "poison"]
    assert store.texts(clients.received[0].request_id) == clients.received[0].tokens

    checked = run_cli(env, "check", "--json")
    assert checked.returncode == 1, checked.stderr
    report = json.loads(checked.stdout)
    [letter] = report["refused"]
    assert (letter["lsn"], letter["record_type"], letter["outcome"]) == (
        1,
        "request_start",
        "set_aside",
    )
    assert any("refused WAL record 1 (request_start" in p for p in report["problems"])
    assert "ValueError" in letter["reason"]

    acknowledged = run_cli(env, "check", "--acknowledge")
    assert acknowledged.returncode == 0, acknowledged.stdout + acknowledged.stderr
    assert "acknowledged:    1 refused records" in acknowledged.stdout
    assert run_cli(env, "check").returncode == 0

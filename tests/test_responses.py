"""`/v1/responses` against a real daemon on SQLite and PostgreSQL, through the `openai` SDK:
create, stream, retrieve, list input items, delete, continue with `previous_response_id`
across a restart, and a SIGKILL mid-stream that loses and doubles no delta a client got."""

from __future__ import annotations

import json
import threading
from pathlib import Path

import openai
import pytest
from daemon_process import (
    DaemonProcess,
    client_for,
    daemon_env,
    read_store_after,
    response_request_id,
    run_cli,
)
from openai_schema import assert_valid

from llmsvc.providers.mock import token


def new_key(env: dict[str, str], name: str) -> str:
    """A new key's secret (made before the daemon starts: it reads its keys then)."""
    done = run_cli(env, "keys", "create", name, "--json")
    assert done.returncode == 0, done.stderr
    return str(json.loads(done.stdout)["secret"])


def keyed(daemon: DaemonProcess, secret: str) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{daemon.base_url}/v1", api_key=secret, max_retries=0)


def streamed(
    client: openai.OpenAI, **body: object
) -> tuple[list[str], openai.types.responses.Response]:
    """The text deltas a stream sent and the response its last event carried."""
    deltas = []
    last = None
    for event in client.responses.create(stream=True, **body):
        if event.type == "response.output_text.delta":
            deltas.append(event.delta)
        last = event
    assert last is not None
    return deltas, last.response


def test_responses_are_stored_retrieved_deleted_and_continued_across_a_restart(
    database_url: str, tmp_path: Path
) -> None:
    env = daemon_env(database_url, tmp_path / "wal", auth="keys")
    assert run_cli(env, "migrate").returncode == 0
    one, two = new_key(env, "one"), new_key(env, "two")
    with DaemonProcess(env) as daemon:
        daemon.wait_caught_up()  # its keys are read from the database by then
        with keyed(daemon, one) as client:
            first = client.responses.create(
                model="mock", input="hello there", instructions="be brief", max_output_tokens=3
            )
            assert first.output_text == "".join(token(i) for i in range(3))
            deltas, second = streamed(
                client,
                model="mock",
                input=[{"role": "user", "content": "again"}],
                previous_response_id=first.id,
                max_output_tokens=4,
            )
            assert "".join(deltas) == "".join(token(i) for i in range(4)) == second.output_text
            got = client.responses.retrieve(second.id)
            for raw in (  # as OpenAI's published schema has them
                client.responses.with_raw_response.retrieve(second.id),
                client.responses.with_raw_response.create(model="mock", input="hi"),
            ):
                assert_valid(json.loads(raw.text), "Response")
            assert got.output_text == second.output_text
            assert [item.id for item in got.output] == [item.id for item in second.output]
            assert got.usage == second.usage  # the stored counts, as the stream's end said
            assert got.previous_response_id == first.id
            assert got.status == second.status == "incomplete"  # cut at max_output_tokens
            assert got.incomplete_details == second.incomplete_details
            assert got.incomplete_details is not None
            assert got.incomplete_details.reason == "max_output_tokens"
            assert got.usage is not None
            assert got.usage.output_tokens == 4
            items = client.responses.input_items.list(second.id)
            assert [(i.type, i.role) for i in items.data] == [("message", "user")]
            listed = client.responses.create(
                model="mock",
                input=[
                    {"role": "user", "content": "find x"},
                    {"type": "function_call", "call_id": "c1", "name": "f", "arguments": "{}"},
                    {"type": "function_call_output", "call_id": "c1", "output": "3"},
                ],
                max_output_tokens=1,
            )
            pages = client.responses.input_items.list(listed.id, limit=2, order="asc")
            raw_items = client.responses.input_items.with_raw_response.list(listed.id)
            assert_valid(json.loads(raw_items.text), "ResponseItemList")
            assert [i.type for i in pages] == ["message", "function_call", "function_call_output"]
            assert pages.has_more  # the first page of two
            newest = client.responses.input_items.list(listed.id, limit=1)  # desc by default
            assert [i.type for i in newest.data] == ["function_call_output"]
            hidden = client.responses.create(model="mock", input="x", store=False)
            with pytest.raises(openai.NotFoundError):
                client.responses.retrieve(hidden.id)
        assert daemon.stop() == 0, daemon.log

    with (
        DaemonProcess(env, port=daemon.port) as daemon,
        keyed(daemon, two) as other,
        keyed(daemon, one) as client,
    ):
        daemon.wait_caught_up()  # its keys are read from the database by then
        with pytest.raises(openai.NotFoundError):  # another key's response is not found
            other.responses.retrieve(second.id)
        with pytest.raises(openai.BadRequestError, match="not found"):
            other.responses.create(model="mock", input="on", previous_response_id=second.id)
        third = client.responses.create(
            model="mock", input="more", previous_response_id=second.id, max_output_tokens=2
        )
        third_id = response_request_id(third.id)
        stored = read_store_after(database_url, third_id).request(third_id)
        assert stored["api"] == "responses"
        assert stored["params"]["previous_response_id"] == second.id
        assert stored["messages"] == [  # the first's instructions are not carried over
            {"role": "user", "content": "hello there"},
            {"role": "assistant", "content": first.output_text},
            {"role": "user", "content": "again"},
            {"role": "assistant", "content": second.output_text},
            {"role": "user", "content": "more"},
        ]
        deleted = client.responses.delete(third.id)
        assert deleted is None  # the SDK reads OpenAI's {"id", "object", "deleted"} as nothing
        with pytest.raises(openai.NotFoundError):
            client.responses.retrieve(third.id)
        with pytest.raises(openai.BadRequestError, match="not found"):
            client.responses.create(model="mock", input="on", previous_response_id=third.id)
        assert daemon.stop() == 0, daemon.log


def test_a_continued_conversation_hurries_the_flush_instead_of_waiting_its_interval(
    database_url: str, tmp_path: Path
) -> None:
    """An agent's next turn asks for the one just answered: with a minute between flushes
    and a 5 s bound on waiting for the store, it is answered, not refused."""
    env = daemon_env(
        database_url, tmp_path / "wal", flush_interval_ms=60_000, database_timeout_seconds=5
    )
    with DaemonProcess(env) as daemon, client_for(daemon) as client:
        daemon.wait_caught_up()
        first = client.responses.create(model="mock", input="hello", max_output_tokens=2)
        second = client.responses.create(
            model="mock", input="and then", previous_response_id=first.id, max_output_tokens=3
        )
        assert second.previous_response_id == first.id
        assert second.output_text == "".join(token(i) for i in range(3))
        assert client.responses.retrieve(second.id).output_text == second.output_text
        assert daemon.stop() == 0, daemon.log


def test_a_stream_killed_mid_way_keeps_each_delta_sent_once_in_order(
    database_url: str, tmp_path: Path
) -> None:
    env = daemon_env(database_url, tmp_path / "wal")
    daemon = DaemonProcess(env)
    received: list[str] = []
    response_ids: list[str] = []
    ended = threading.Event()

    def read() -> None:
        try:
            with client_for(daemon) as client:
                for event in client.responses.create(
                    model="mock",
                    input="go slowly",
                    max_output_tokens=500,
                    stream=True,
                    extra_body={"mock_delay_ms": 20},
                ):
                    if event.type == "response.created":
                        response_ids.append(event.response.id)
                    elif event.type == "response.output_text.delta":
                        received.append(event.delta)
        except (openai.APIError, openai.APIConnectionError):
            pass  # the daemon died under it
        finally:
            ended.set()

    with daemon:
        threading.Thread(target=read, daemon=True).start()
        while len(received) < 5:
            assert not ended.wait(0.01), "the stream ended before the kill"
        daemon.kill()
    assert ended.wait(30)
    with DaemonProcess(env, port=daemon.port) as again:
        again.wait_caught_up()
        rid = response_request_id(response_ids[0])
        store = read_store_after(database_url, rid)
        assert store.request(rid)["status"] == "interrupted"
        stored = store.texts(rid)
        assert stored[: len(received)] == received  # each delta once, in order (one a batch)
        assert again.stop() == 0, again.log

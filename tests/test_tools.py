"""Tool calls end to end: streamed and whole, from OpenAI-compatible and Anthropic upstreams,
through the official `openai` SDK, stored delta by delta and shown assembled."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import openai
import pytest
from daemon_process import (
    ANTHROPIC_SCRIPT,
    DaemonProcess,
    UpstreamProcess,
    daemon_env,
    read_store_after,
    run_cli,
)

pytestmark = pytest.mark.timeout(120)

KEY = "sk-tools-test-0123456789"
TOOLS: list[Any] = [
    {
        "type": "function",
        "function": {
            "name": "lookup",
            "description": "look something up",
            "parameters": {"type": "object", "properties": {"q": {"type": "string"}}},
        },
    }
]
CALL: list[Any] = [{"role": "user", "content": "call:lookup"}]


@pytest.fixture
def env(sqlite_url: str, tmp_path: Path) -> Iterator[dict[str, str]]:
    with (
        UpstreamProcess(api_key=KEY) as oai,
        UpstreamProcess(api_key=KEY, script=ANTHROPIC_SCRIPT) as ant,
    ):
        providers = [
            {"name": "oai", "kind": "openai", "base_url": oai.base_url, "api_key": KEY,
             "models": ["gpt-test"]},
            {"name": "ant", "kind": "anthropic", "base_url": ant.root_url, "api_key": KEY,
             "models": ["claude-test"]},
        ]  # fmt: skip
        yield daemon_env(sqlite_url, tmp_path / "wal", providers=json.dumps(providers))


def stream_tool_call(daemon: DaemonProcess, model: str) -> tuple[str, dict[str, Any], str]:
    """(request id, the call the SDK assembled from the deltas, finish reason)."""
    client = openai.OpenAI(base_url=f"{daemon.base_url}/v1", api_key="x", max_retries=0)
    raw = client.chat.completions.with_raw_response.create(
        model=model, messages=CALL, tools=TOOLS, tool_choice="auto", stream=True, max_tokens=50
    )
    call: dict[str, Any] = {"id": None, "name": None, "arguments": ""}
    finish = ""
    for chunk in raw.parse():
        for choice in chunk.choices:
            for delta in choice.delta.tool_calls or ():
                assert delta.index == 0
                call["id"] = call["id"] or delta.id
                if delta.function is not None:
                    call["name"] = call["name"] or delta.function.name
                    call["arguments"] += delta.function.arguments or ""
            finish = choice.finish_reason or finish
    return raw.headers["x-request-id"], call, finish


@pytest.mark.parametrize(
    ("model", "call_id"), [("gpt-test", "call_test"), ("claude-test", "toolu_test")]
)
def test_a_streamed_tool_call_reaches_the_client_and_the_store(
    env: dict[str, str], sqlite_url: str, model: str, call_id: str
) -> None:
    with DaemonProcess(env) as daemon:
        request_id, call, finish = stream_tool_call(daemon, model)
        read_store_after(sqlite_url, request_id)
        assert daemon.stop() == 0, daemon.log

    assert call == {"id": call_id, "name": "lookup", "arguments": '{"q": "x"}'}
    assert finish == "tool_calls"
    shown = json.loads(run_cli(env, "show", request_id, "--json").stdout)
    [attempt] = shown["attempts"]
    assert attempt["tool_calls"] == [call]
    assert attempt["status"] == "completed"
    text = run_cli(env, "show", request_id).stdout
    assert f'tool call: lookup({{"q": "x"}}) id={call_id}' in text


@pytest.mark.parametrize("model", ["gpt-test", "claude-test"])
def test_a_whole_tool_call_reply(env: dict[str, str], sqlite_url: str, model: str) -> None:
    with DaemonProcess(env) as daemon:
        client = openai.OpenAI(base_url=f"{daemon.base_url}/v1", api_key="x", max_retries=0)
        raw = client.chat.completions.with_raw_response.create(
            model=model, messages=CALL, tools=TOOLS, max_tokens=50
        )
        reply = raw.parse()
        assert daemon.stop() == 0, daemon.log

    choice = reply.choices[0]
    assert choice.finish_reason == "tool_calls"
    [call] = choice.message.tool_calls or []
    assert call.type == "function"
    assert (call.function.name, json.loads(call.function.arguments)) == ("lookup", {"q": "x"})
    shown = json.loads(run_cli(env, "show", raw.headers["x-request-id"], "--json").stdout)
    [stored] = shown["attempts"][0]["tool_calls"]
    assert (stored["name"], json.loads(stored["arguments"])) == ("lookup", {"q": "x"})

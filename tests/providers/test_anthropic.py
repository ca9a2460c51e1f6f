"""The Anthropic provider: the translation both ways, and the daemon against an upstream that
speaks Anthropic's exact wire format (tests/upstreams/anthropic_upstream.py), via the `openai`
SDK."""

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
)

from llmsvc.config import ProviderConfig
from llmsvc.errors import ProviderError
from llmsvc.providers.anthropic import AnthropicProvider, finish_reason, to_anthropic

pytestmark = pytest.mark.timeout(120)

KEY = "sk-ant-test-0123456789abcdef"


def test_an_openai_body_becomes_a_messages_body() -> None:
    body = {
        "model": "claude-fast",
        "messages": [
            {"role": "system", "content": "Be brief."},
            {"role": "developer", "content": [{"type": "text", "text": "No lists."}]},
            {"role": "user", "content": "Hi"},
            {"role": "user", "content": [{"type": "text", "text": "there"}]},
            {"role": "assistant", "content": "Hello."},
            {"role": "user", "content": "Bye"},
        ],
        "temperature": 0.5,
        "stop": "END",
        "tools": [
            {
                "type": "function",
                "function": {"name": "f", "description": "d", "parameters": {"type": "object"}},
            }
        ],
        "tool_choice": "required",
    }

    out = to_anthropic(body, "claude-3-5-haiku-latest", stream=True)

    assert out["model"] == "claude-3-5-haiku-latest"
    assert out["system"] == "Be brief.\n\nNo lists."
    assert [m["role"] for m in out["messages"]] == ["user", "assistant", "user"]
    assert out["messages"][0]["content"] == [
        {"type": "text", "text": "Hi"},
        {"type": "text", "text": "there"},
    ]
    assert (out["max_tokens"], out["temperature"], out["stream"]) == (4096, 0.5, True)
    assert out["stop_sequences"] == ["END"]
    assert out["tools"] == [{"name": "f", "description": "d", "input_schema": {"type": "object"}}]
    assert out["tool_choice"] == {"type": "any"}
    assert "stop" not in out
    assert "tool_calls" not in json.dumps(out)


def test_tool_calls_and_results_become_tool_use_and_tool_result_blocks() -> None:
    body = {
        "messages": [
            {"role": "user", "content": "weather?"},
            {
                "role": "assistant",
                "content": None,
                "tool_calls": [
                    {"id": "c1", "type": "function",
                     "function": {"name": "weather", "arguments": '{"city": "Oslo"}'}}
                ],
            },
            {"role": "tool", "tool_call_id": "c1", "content": "cold"},
        ],
        "max_tokens": 50,
    }  # fmt: skip

    out = to_anthropic(body, "m", stream=False)

    assert out["messages"][1] == {
        "role": "assistant",
        "content": [{"type": "tool_use", "id": "c1", "name": "weather", "input": {"city": "Oslo"}}],
    }
    assert out["messages"][2] == {
        "role": "user",
        "content": [{"type": "tool_result", "tool_use_id": "c1", "content": "cold"}],
    }
    assert out["max_tokens"] == 50


@pytest.mark.parametrize(
    ("stop", "finish"),
    [("end_turn", "stop"), ("stop_sequence", "stop"), ("max_tokens", "length"),
     ("tool_use", "tool_calls"), ("refusal", "content_filter"),
     ("model_context_window_exceeded", "length"), ("pause_turn", "stop"),
     ("a_reason_from_the_future", "stop"), (None, None)],
)  # fmt: skip
def test_stop_reasons_become_openai_finish_reasons(stop: str | None, finish: str | None) -> None:
    """Every one is a value of OpenAI's finish_reason enum, whatever Anthropic adds."""
    assert finish_reason(stop) == finish


@pytest.fixture
def upstream() -> Iterator[UpstreamProcess]:
    with UpstreamProcess(api_key=KEY, script=ANTHROPIC_SCRIPT) as up:
        yield up


def anthropic(name: str, url: str, model: str = "claude-test") -> dict[str, Any]:
    return {"name": name, "kind": "anthropic", "base_url": url, "api_key": KEY, "models": [model]}


@pytest.fixture
def daemon(upstream: UpstreamProcess, sqlite_url: str, tmp_path: Path) -> Iterator[DaemonProcess]:
    providers = [
        anthropic("claude", upstream.root_url),
        anthropic("claude-breaks", f"{upstream.root_url}/with/fail/error-after:3", "claude-breaks"),
        anthropic("claude-refuses", f"{upstream.root_url}/with/fail/status:400", "claude-bad"),
    ]
    env = daemon_env(
        sqlite_url, tmp_path / "wal", providers=json.dumps(providers), retries_per_target=0
    )
    with DaemonProcess(env) as running:
        yield running
        assert running.stop() == 0, running.log
    assert KEY not in running.log


def client(daemon: DaemonProcess) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{daemon.base_url}/v1", api_key="x", max_retries=0)


def test_streaming_through_the_openai_sdk(daemon: DaemonProcess, sqlite_url: str) -> None:
    raw = client(daemon).chat.completions.with_raw_response.create(
        model="claude-test",
        messages=[{"role": "system", "content": "sys"}, {"role": "user", "content": "go"}],
        max_tokens=6,
        stream=True,
        stream_options={"include_usage": True},
    )
    tokens, finish, usage = [], None, None
    for chunk in raw.parse():
        for choice in chunk.choices:
            if choice.delta.content:
                tokens.append(choice.delta.content)
            finish = choice.finish_reason or finish
        usage = chunk.usage or usage
    assert tokens == [f"w{i} " for i in range(6)]
    assert finish == "length"
    assert usage is not None
    assert (usage.prompt_tokens, usage.completion_tokens) == (2, 6)  # "sys" and "go"
    request_id = raw.headers["x-request-id"]
    store = read_store_after(sqlite_url, request_id)
    assert store.texts(request_id) == tokens
    attempt = store.only_attempt(request_id)
    assert (attempt["provider"], attempt["model"], attempt["status"]) == (
        "claude",
        "claude-test",
        "completed",
    )
    assert (attempt["prompt_tokens"], attempt["completion_tokens"]) == (2, 6)
    assert (attempt["finish_reason"], attempt["stop_reason"]) == ("length", "max_tokens")


def test_a_refusal_is_content_filter_to_the_client_and_refusal_on_the_attempt(
    daemon: DaemonProcess, sqlite_url: str
) -> None:
    """OpenAI's enum has no `refusal`: the client is told `content_filter`, and the attempt
    row keeps both, so the operator still sees Anthropic's own word."""
    raw = client(daemon).chat.completions.with_raw_response.create(
        model="claude-test",
        messages=[{"role": "user", "content": "refuse this"}],
        max_tokens=6,
        stream=True,
    )
    chunks = list(raw.parse())
    tokens = [c.delta.content for chunk in chunks for c in chunk.choices if c.delta.content]
    finishes = [c.finish_reason for chunk in chunks for c in chunk.choices if c.finish_reason]
    assert (tokens, finishes) == (["w0 ", "w1 "], ["content_filter"])
    request_id = raw.headers["x-request-id"]
    attempt = read_store_after(sqlite_url, request_id).only_attempt(request_id)
    assert (attempt["finish_reason"], attempt["stop_reason"]) == ("content_filter", "refusal")


def test_non_streaming_with_a_stop_sequence(daemon: DaemonProcess, sqlite_url: str) -> None:
    reply = client(daemon).chat.completions.create(
        model="claude-test",
        messages=[{"role": "user", "content": "go"}],
        max_tokens=8,
        stop=["w3"],
    )
    assert reply.choices[0].message.content == "w0 w1 w2 "
    assert reply.choices[0].finish_reason == "stop"
    assert reply.usage is not None
    assert reply.usage.completion_tokens == 3


def test_an_error_event_mid_stream_ends_the_stream_and_the_store_keeps_what_was_sent(
    daemon: DaemonProcess, sqlite_url: str
) -> None:
    raw = client(daemon).chat.completions.with_raw_response.create(
        model="claude-breaks",
        messages=[{"role": "user", "content": "go"}],
        max_tokens=8,
        stream=True,
    )
    tokens: list[str] = []
    error = ""
    try:
        for chunk in raw.parse():
            tokens += [c.delta.content for c in chunk.choices if c.delta.content]
    except openai.APIError as exc:
        error = str(exc)
    assert "Overloaded" in error
    assert tokens == ["w0 ", "w1 ", "w2 "]
    request_id = raw.headers["x-request-id"]
    store = read_store_after(sqlite_url, request_id)
    assert store.texts(request_id) == tokens
    attempt = store.only_attempt(request_id)
    assert (attempt["status"], attempt["error_code"]) == ("failed", "overloaded_error")


def test_an_invalid_request_is_a_400_with_anthropics_message(daemon: DaemonProcess) -> None:
    with client(daemon) as sdk, pytest.raises(openai.BadRequestError, match="steered 400"):
        sdk.chat.completions.create(
            model="claude-bad", messages=[{"role": "user", "content": "go"}]
        )


@pytest.mark.parametrize(
    "fields",
    [
        {"tools": [5]},
        {"tools": [{"type": "function"}]},
        {"tools": "lookup"},
        {"stop": 5},
        {"tools": [{"type": "function", "function": {}}]},
        {"messages": [{"role": "assistant", "content": None, "tool_calls": [5]}]},
        {"messages": [{"role": "assistant", "content": None, "tool_calls": 5}]},
    ],
    ids=repr,
)
async def test_a_request_of_the_wrong_shape_for_anthropic_is_a_400_not_a_crash(
    fields: dict[str, Any],
) -> None:
    """OpenAI's fields are passed through unchecked; translating ones of the wrong shape
    for Anthropic is the client's error, refused before anything goes upstream."""
    body = {"model": "m", "messages": [{"role": "user", "content": "hi"}], **fields}
    config = ProviderConfig(name="claude", kind="anthropic", base_url="http://127.0.0.1:9",
                            models=["m"])  # fmt: skip
    provider = AnthropicProvider(config)
    try:
        with pytest.raises(ProviderError) as raised:
            await provider.open(body, "m", stream=True)
    finally:
        await provider.close()

    assert (raised.value.status, raised.value.code) == (400, "invalid_request")
    assert raised.value.retryable is False

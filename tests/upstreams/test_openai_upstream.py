"""Tests for openai_upstream.py beside it, the fake OpenAI provider of e2e tests and benchmarks.

The official SDK is the judge of wire compatibility; raw HTTP checks pin the byte layout.
"""

from __future__ import annotations

import importlib.util
import json
import os
import signal
import subprocess
import sys
import urllib.request
from collections.abc import AsyncIterator
from pathlib import Path
from types import ModuleType
from typing import Any

import aiohttp
import openai
import orjson
import pytest

SCRIPT = Path(__file__).resolve().parent / "openai_upstream.py"
KEY = "sk-test-key"
MESSAGES: list[Any] = [
    {"role": "system", "content": "be brief"},
    {"role": "user", "content": "  say   hello world "},
]
PROMPT_TOKENS = 5  # words across the string contents above


def _load() -> ModuleType:
    spec = importlib.util.spec_from_file_location("openai_upstream", SCRIPT)
    assert spec is not None
    assert spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


up_mod = _load()


@pytest.fixture
async def upstream() -> AsyncIterator[Any]:
    up = await up_mod.serve("127.0.0.1", 0, api_key=KEY)
    try:
        yield up
    finally:
        await up.close()


@pytest.fixture
async def client(upstream: Any) -> AsyncIterator[openai.AsyncOpenAI]:
    async with openai.AsyncOpenAI(
        base_url=upstream.base_url, api_key=KEY, max_retries=0, timeout=5
    ) as c:
        yield c


async def _raw(upstream: Any, body: dict[str, Any], **headers: str) -> bytes:
    """POST and return the raw response body."""
    async with (
        aiohttp.ClientSession() as s,
        s.post(
            f"{upstream.base_url}/chat/completions",
            json=body,
            headers={"Authorization": f"Bearer {KEY}", **headers},
        ) as r,
    ):
        assert r.status == 200
        assert r.headers["Content-Type"] == "text/event-stream; charset=utf-8"
        return await r.read()


def _events(raw: bytes) -> list[bytes]:
    assert raw.endswith(b"\n\n")
    parts = raw[:-2].split(b"\n\n")
    assert all(p.startswith(b"data: ") for p in parts)
    return [p[len(b"data: ") :] for p in parts]


async def test_stream_tokens_and_usage(client: openai.AsyncOpenAI) -> None:
    stream = await client.chat.completions.create(
        model="gpt-test",
        messages=MESSAGES,
        max_tokens=5,
        stream=True,
        stream_options={"include_usage": True},
    )
    chunks = [c async for c in stream]
    assert chunks[0].choices[0].delta.role == "assistant"
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == "t0 t1 t2 t3 t4 "
    assert [c.choices[0].delta.content for c in chunks[1:6]] == [f"t{i} " for i in range(5)]
    assert chunks[-2].choices[0].finish_reason == "length"
    assert chunks[-1].choices == []
    assert chunks[-1].usage is not None
    assert chunks[-1].usage.prompt_tokens == PROMPT_TOKENS
    assert chunks[-1].usage.completion_tokens == 5
    assert chunks[-1].usage.total_tokens == PROMPT_TOKENS + 5
    assert {c.id for c in chunks} == {chunks[0].id}
    assert chunks[0].id.startswith("chatcmpl-")
    assert all(c.model == "gpt-test" for c in chunks)


async def test_stream_defaults_without_usage(client: openai.AsyncOpenAI) -> None:
    stream = await client.chat.completions.create(
        model="other-model", messages=MESSAGES, stream=True
    )
    chunks = [c async for c in stream]
    assert len(chunks) == 1 + 16 + 1
    assert all(c.usage is None and c.choices for c in chunks)
    assert "".join(c.choices[0].delta.content or "" for c in chunks) == up_mod.expected_content(16)
    assert chunks[-1].choices[0].finish_reason == "stop"


async def test_non_streaming(client: openai.AsyncOpenAI) -> None:
    resp = await client.chat.completions.create(model="gpt-test", messages=MESSAGES, max_tokens=3)
    assert resp.object == "chat.completion"
    assert resp.id.startswith("chatcmpl-")
    assert resp.model == "gpt-test"
    assert resp.choices[0].message.role == "assistant"
    assert resp.choices[0].message.content == "t0 t1 t2 "
    assert resp.choices[0].finish_reason == "length"
    assert resp.usage is not None
    assert (resp.usage.prompt_tokens, resp.usage.completion_tokens) == (PROMPT_TOKENS, 3)
    assert resp.usage.total_tokens == PROMPT_TOKENS + 3

    resp = await client.chat.completions.create(
        model="gpt-test", messages=MESSAGES, max_completion_tokens=0
    )
    assert resp.choices[0].message.content == ""
    resp = await client.chat.completions.create(model="gpt-test", messages=MESSAGES)
    assert resp.choices[0].message.content == up_mod.expected_content(16)
    assert resp.choices[0].finish_reason == "stop"


async def test_models(client: openai.AsyncOpenAI) -> None:
    models = await client.models.list()
    assert [m.id for m in models.data] == ["gpt-test"]
    assert models.data[0].owned_by == "upstream"


async def test_embeddings_in_floats_and_base64(client: openai.AsyncOpenAI, upstream: Any) -> None:
    encoded = await client.embeddings.create(model="e", input=["a b", "c"], dimensions=4)
    floats = await client.embeddings.create(model="e", input=[5, 6], encoding_format="float")
    assert [d.embedding for d in encoded.data] == [
        up_mod.expected_embedding("a b", 4),
        up_mod.expected_embedding("c", 4),
    ]
    assert (encoded.usage.prompt_tokens, encoded.usage.total_tokens) == (3, 3)
    assert floats.data[0].embedding == up_mod.expected_embedding([5, 6])
    with pytest.raises(openai.BadRequestError) as refused:
        await client.embeddings.create(model="e", input="a", extra_body={"stream": False})
    assert "stream" in refused.value.message
    async with aiohttp.ClientSession() as session:
        body = {"model": "e", "input": "a", "encoding_format": "float"}
        headers = {"Authorization": f"Bearer {KEY}"}
        async with session.post(upstream.base_url + "/embeddings", json=body, headers=headers) as r:
            doc = orjson.loads(await r.read())
    assert doc == {
        "object": "list",
        "data": [{"object": "embedding", "index": 0, "embedding": up_mod.expected_embedding("a")}],
        "model": "e",
        "usage": {"prompt_tokens": 1, "total_tokens": 1},
    }


async def test_wrong_key(upstream: Any) -> None:
    async with openai.AsyncOpenAI(
        base_url=upstream.base_url, api_key="sk-wrong", max_retries=0
    ) as bad:
        with pytest.raises(openai.AuthenticationError) as err:
            await bad.chat.completions.create(model="gpt-test", messages=MESSAGES)
    assert err.value.status_code == 401
    assert err.value.code == "invalid_api_key"
    assert err.value.type == "invalid_request_error"


async def test_fail_status(client: openai.AsyncOpenAI) -> None:
    with pytest.raises(openai.InternalServerError) as err:
        await client.chat.completions.create(
            model="gpt-test",
            messages=MESSAGES,
            stream=True,
            extra_headers={"X-Upstream-Fail": "status:500"},
        )
    assert err.value.status_code == 500
    assert err.value.type == "server_error"
    with pytest.raises(openai.RateLimitError):
        await client.chat.completions.create(
            model="gpt-test", messages=MESSAGES, extra_headers={"X-Upstream-Fail": "status:429"}
        )


async def test_validation(client: openai.AsyncOpenAI, upstream: Any) -> None:
    with pytest.raises(openai.BadRequestError) as err:
        await client.chat.completions.create(model="gpt-test", messages=[])
    assert err.value.code == "empty_array"
    assert err.value.param == "messages"
    async with aiohttp.ClientSession(headers={"Authorization": f"Bearer {KEY}"}) as s:
        for body in (b"{not json", b"[]", b'{"messages":[{}]}', b'{"model":1,"messages":[{}]}'):
            async with s.post(f"{upstream.base_url}/chat/completions", data=body) as r:
                assert r.status == 400
                err_body = await r.json()
                assert set(err_body["error"]) == {"message", "type", "param", "code"}
                assert err_body["error"]["type"] == "invalid_request_error"


@pytest.mark.parametrize("delay_ms", ["0", "1"])
@pytest.mark.parametrize("include_usage", [True, False])
async def test_byte_layout(upstream: Any, delay_ms: str, include_usage: bool) -> None:
    """Each event is exactly the compact JSON OpenAI sends, key order included."""
    body: dict[str, Any] = {
        "model": "gpt-test",
        "messages": MESSAGES,
        "max_tokens": 2,
        "stream": True,
    }
    if include_usage:
        body["stream_options"] = {"include_usage": True}
    events = _events(await _raw(upstream, body, **{"X-Upstream-Token-Delay-Ms": delay_ms}))
    assert events[-1] == b"[DONE]"
    first = json.loads(events[0])
    common = {
        "id": first["id"],
        "object": "chat.completion.chunk",
        "created": first["created"],
        "model": "gpt-test",
        "system_fingerprint": None,
    }
    deltas: list[tuple[dict[str, str], str | None]] = [
        ({"role": "assistant", "content": ""}, None),
        ({"content": "t0 "}, None),
        ({"content": "t1 "}, None),
        ({}, "length"),
    ]
    expected = []
    for delta, finish in deltas:
        choice = {"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}
        chunk: dict[str, Any] = {**common, "choices": [choice]}
        if include_usage:
            chunk["usage"] = None
        expected.append(orjson.dumps(chunk))
    if include_usage:
        usage = {"prompt_tokens": PROMPT_TOKENS, "completion_tokens": 2, "total_tokens": 7}
        expected.append(orjson.dumps({**common, "choices": [], "usage": usage}))
    assert events[:-1] == expected


async def _collect_lines(r: aiohttp.ClientResponse, into: list[bytes]) -> None:
    """Append non-empty SSE lines to ``into`` until the body ends (or breaks)."""
    async for line in r.content:
        if line.strip():
            into.append(line.strip())


@pytest.mark.parametrize("delay_ms", ["0", "1"])
async def test_fail_after(upstream: Any, delay_ms: str) -> None:
    """``after:N`` sends N tokens then cuts the connection: no finish chunk, no [DONE]."""
    body = {"model": "gpt-test", "messages": MESSAGES, "max_tokens": 10, "stream": True}
    headers = {
        "Authorization": f"Bearer {KEY}",
        "X-Upstream-Fail": "after:3",
        "X-Upstream-Token-Delay-Ms": delay_ms,
    }
    lines: list[bytes] = []
    async with aiohttp.ClientSession() as s:
        async with s.post(f"{upstream.base_url}/chat/completions", json=body, headers=headers) as r:
            assert r.status == 200
            with pytest.raises(aiohttp.ClientPayloadError):
                await _collect_lines(r, lines)
        # The server still works afterwards.
        async with s.get(f"{upstream.base_url}/models", headers=headers) as r:
            assert r.status == 200
    tokens = [json.loads(x[len(b"data: ") :])["choices"][0]["delta"] for x in lines]
    assert tokens == [{"role": "assistant", "content": ""}] + [
        {"content": f"t{i} "} for i in range(3)
    ]


def test_cli_subprocess() -> None:
    """The script prints ``LISTENING <port>``, serves, and exits 0 on SIGTERM."""
    proc = subprocess.Popen(
        [sys.executable, str(SCRIPT), "--host", "127.0.0.1", "--port", "0", "--api-key", KEY],
        stdout=subprocess.PIPE,
        text=True,
        env={**os.environ, "PYTHONWARNINGS": "error"},
    )
    try:
        assert proc.stdout is not None
        word, port = proc.stdout.readline().split()
        assert word == "LISTENING"
        req = urllib.request.Request(
            f"http://127.0.0.1:{port}/v1/chat/completions",
            data=orjson.dumps({"model": "gpt-test", "messages": MESSAGES, "max_tokens": 2}),
            headers={"Authorization": f"Bearer {KEY}", "Content-Type": "application/json"},
        )
        with urllib.request.urlopen(req, timeout=5) as r:
            assert json.loads(r.read())["choices"][0]["message"]["content"] == "t0 t1 "
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=5) == 0
        assert proc.stdout.read() == ""
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        if proc.stdout is not None:
            proc.stdout.close()


@pytest.mark.parametrize("n", [0, 1, 3, 9000])
def test_prebuilt_stream_matches_per_token_events(n: int) -> None:
    """The one-join fast path (cached numbers, beyond the cache too) equals per-token events."""
    sb = up_mod._StreamBuilder("chatcmpl-x", 1, "m", True)
    assert b"".join(sb.contents(n)) == b"".join(sb.content(i) for i in range(n))
    if n:
        last = json.loads(sb.content(n - 1)[len(b"data: ") :])
        assert last["choices"][0]["delta"]["content"] == up_mod.token(n - 1)


TOOLS: list[Any] = [{"type": "function", "name": "lookup", "parameters": {"type": "object"}}]


def _without_ids(output: list[Any]) -> list[dict[str, Any]]:
    """Output items as dicts, without their ids (new per response) or the None fields (the
    SDK's stream helper adds `parsed` ones)."""
    return [{k: v for k, v in item.model_dump(exclude_none=True).items() if k != "id"}
            for item in output]  # fmt: skip


@pytest.mark.parametrize(
    ("text", "tools"),
    [("say hi", []), ("call:lookup", TOOLS), ("refuse:no way", [])],
    ids=["text", "tool-call", "refusal"],
)
async def test_responses_streamed_add_up_to_the_whole_response(
    client: openai.AsyncOpenAI, text: str, tools: list[Any]
) -> None:
    """The SDK's stream helper checks each event against the response it builds."""
    ask: dict[str, Any] = {"model": "gpt-test", "input": text, "tools": tools}
    whole = await client.responses.create(**ask)
    async with client.responses.stream(**ask) as stream:
        events = [event async for event in stream]
        final = await stream.get_final_response()

    assert [e.sequence_number for e in events] == list(range(len(events)))
    assert (events[0].type, events[-1].type) == ("response.created", "response.completed")
    assert (whole.status, final.status) == ("completed", "completed")
    assert _without_ids(final.output) == _without_ids(whole.output)
    assert final.usage == whole.usage
    assert whole.output_text == (up_mod.expected_content(16) if text == "say hi" else "")


async def test_responses_failed_after_n_tokens(upstream: Any) -> None:
    """``failed:N`` sends N text deltas, then ``response.failed``, each frame `event:` then
    `data:` of that type."""
    body = {"model": "gpt-test", "input": "hi", "stream": True}
    headers = {"Authorization": f"Bearer {KEY}", "X-Upstream-Fail": "failed:2"}
    async with (
        aiohttp.ClientSession() as s,
        s.post(f"{upstream.base_url}/responses", json=body, headers=headers) as r,
    ):
        assert r.headers["Content-Type"] == "text/event-stream; charset=utf-8"
        raw = await r.read()
    frames = [frame.split(b"\n") for frame in raw.removesuffix(b"\n\n").split(b"\n\n")]
    events = [orjson.loads(data.removeprefix(b"data: ")) for _, data in frames]
    assert [name.removeprefix(b"event: ").decode() for name, _ in frames] == [
        e["type"] for e in events
    ]
    assert [e["delta"] for e in events if e["type"] == "response.output_text.delta"] == [
        "t0 ",
        "t1 ",
    ]
    assert events[-1]["type"] == "response.failed"
    assert events[-1]["response"]["error"]["code"] == "server_error"

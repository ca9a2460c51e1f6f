"""Token counts and cost when the provider sent no usage: counted by llmsvc, and said so.

Real daemons, a real OpenAI-compatible upstream, the official SDK; the numbers are
checked against the tokenizer (bpe-openai, the same ids as OpenAI's tiktoken).
"""

from __future__ import annotations

import json
import signal
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import openai
import pytest
from daemon_process import (
    DaemonProcess,
    UpstreamProcess,
    daemon_env,
    read_store,
    read_store_after,
    run_cli,
)
from test_e2e import KEY, MESSAGES, client_for, stream, upstream_text

from llmsvc.tokens import count_completion, count_prompt

pytestmark = pytest.mark.timeout(90)

PRICE = {"input_per_million": 1000.0, "output_per_million": 2000.0}  # big, so costs are visible


def cost(prompt: int, completion: int) -> float:
    return (prompt * PRICE["input_per_million"] + completion * PRICE["output_per_million"]) / 1e6


def providers(up: UpstreamProcess) -> str:
    """`gpt-4o-mini` (a tokenizer fits), `gpt-test` (none does), and `gpt-4o-mini` again
    behind an upstream that drops every stream after 4 tokens, as `gpt-4o-mini-broken` (the
    tokenizer takes a dated or suffixed name as its base model's)."""
    entries = [
        ("upstream", up.base_url, ["gpt-4o-mini", "gpt-test"]),
        ("broken", up.steered_url("X-Upstream-Fail", "after:4"), ["gpt-4o-mini-broken"]),
    ]
    return json.dumps(
        [
            {"name": name, "kind": "openai", "base_url": url, "api_key": KEY, "models": models}
            for name, url, models in entries
        ]
    )


@pytest.fixture
def upstream() -> Iterator[UpstreamProcess]:
    with UpstreamProcess(api_key=KEY, token_delay_ms=20) as up:
        yield up


@pytest.fixture
def env(database_url: str, tmp_path: Path, upstream: UpstreamProcess) -> dict[str, str]:
    prices = {"gpt-4o-mini": PRICE, "gpt-test": PRICE, "gpt-4o-mini-broken": PRICE}
    return daemon_env(
        database_url,
        tmp_path / "wal",
        providers=providers(upstream),
        prices=json.dumps(prices),
    )


def tokenized(text: str) -> int:
    return count_completion("gpt-4o-mini", [[text]], 0)[0]


PROMPT = count_prompt("gpt-4o-mini", MESSAGES)[0]


def test_a_failed_stream_stores_tokenizer_counts_and_their_cost(
    env: dict[str, str], database_url: str
) -> None:
    with DaemonProcess(env) as daemon, client_for(daemon) as client:
        got = stream(client, "gpt-4o-mini-broken", 30)
        assert daemon.stop() == 0, daemon.log
    assert got.error is not None
    assert got.text == upstream_text(4)

    row = read_store(database_url).request(got.request_id)
    assert row["status"] == "failed"
    assert (row["completion_tokens"], row["completion_tokens_source"]) == (
        tokenized(got.text),
        "tokenizer",
    )
    assert (row["prompt_tokens"], row["prompt_tokens_source"]) == (PROMPT, "tokenizer")
    assert row["cost"] == pytest.approx(cost(PROMPT, tokenized(got.text)))

    status = run_cli(env, "status")
    assert status.returncode == 0, status.stderr
    line = next(line for line in status.stdout.splitlines() if got.request_id in line)
    assert f"{PROMPT}*/{tokenized(got.text)}*" in line
    assert f"{row['cost']:.6f}" in line
    assert "* counted by llmsvc" in status.stdout
    show = run_cli(env, "show", got.request_id)
    assert "completion_tokens_source: tokenizer" in show.stdout


def test_include_usage_without_upstream_usage_tells_llmsvcs_count_never_zero(
    env: dict[str, str], database_url: str
) -> None:
    with DaemonProcess(env) as daemon, client_for(daemon) as client:
        counted = stream(client, "gpt-4o-mini", 5, extra_body={"upstream_usage": None})
        unknown = stream(client, "gpt-test", 5, extra_body={"upstream_usage": None})
        assert daemon.stop() == 0, daemon.log

    assert counted.usage.completion_tokens == tokenized(upstream_text(5))
    assert counted.usage.prompt_tokens == PROMPT
    assert counted.usage.model_extra["llmsvc_counted"] == {
        "prompt_tokens": "tokenizer",
        "completion_tokens": "tokenizer",
    }
    # No tokenizer fits `gpt-test`: one token per delta, and the prompt estimated with
    # OpenAI's newest vocabulary (o200k_base is what gpt-4o-mini uses, so the same count).
    assert unknown.usage.completion_tokens == 5
    assert unknown.usage.prompt_tokens == PROMPT
    assert unknown.usage.total_tokens == PROMPT + 5
    assert unknown.usage.model_extra["llmsvc_counted"] == {
        "prompt_tokens": "estimate",
        "completion_tokens": "deltas",
    }

    store = read_store(database_url)
    row = store.request(unknown.request_id)
    assert (row["completion_tokens"], row["completion_tokens_source"]) == (5, "deltas")
    assert (row["prompt_tokens"], row["prompt_tokens_source"]) == (PROMPT, "estimate")
    row = store.request(counted.request_id)
    assert row["completion_tokens_source"] == row["prompt_tokens_source"] == "tokenizer"


def test_provider_usage_is_stored_as_the_providers(env: dict[str, str], database_url: str) -> None:
    with DaemonProcess(env) as daemon, client_for(daemon) as client:
        got = stream(client, "gpt-4o-mini", 5)
        assert daemon.stop() == 0, daemon.log
    assert got.usage.model_extra.get("llmsvc_counted") is None
    row = read_store(database_url).request(got.request_id)
    assert (row["completion_tokens"], row["completion_tokens_source"]) == (5, "provider")
    assert row["prompt_tokens_source"] == "provider"


def test_a_stream_cut_by_sigkill_is_counted_and_costed_at_the_restart(
    env: dict[str, str], database_url: str
) -> None:
    received: list[str] = []
    with DaemonProcess(env) as daemon, client_for(daemon) as client:
        raw = client.chat.completions.with_raw_response.create(
            model="gpt-4o-mini", messages=MESSAGES, max_tokens=500, stream=True
        )
        request_id = raw.headers["x-request-id"]
        chunks: Any = raw.parse()
        for chunk in chunks:
            if chunk.choices and chunk.choices[0].delta.content:
                received.append(chunk.choices[0].delta.content)
            if len(received) == 12:
                break
        time.sleep(0.3)  # a few more tokens journaled, never read by this client
        daemon.kill()
        assert daemon.returncode == -signal.SIGKILL
    with DaemonProcess(env) as again:
        again.wait_caught_up()
        row = read_store_after(database_url, request_id).request(request_id)
        assert again.stop() == 0, again.log
    stored = "".join(read_store(database_url).texts(request_id))
    assert stored.startswith("".join(received))
    assert row["status"] == "interrupted"
    assert (row["completion_tokens"], row["completion_tokens_source"]) == (
        tokenized(stored),
        "tokenizer",
    )
    assert (row["prompt_tokens"], row["prompt_tokens_source"]) == (PROMPT, "tokenizer")
    assert row["cost"] == pytest.approx(cost(PROMPT, tokenized(stored)))
    assert row["provider"] == "upstream"


def test_a_non_streaming_reply_without_usage_is_counted(
    env: dict[str, str], database_url: str
) -> None:
    with DaemonProcess(env) as daemon, client_for(daemon) as client:
        raw = client.chat.completions.with_raw_response.create(
            model="gpt-4o-mini",
            messages=MESSAGES,
            max_tokens=7,
            extra_body={"upstream_usage": None},
        )
        completion = raw.parse()
        assert daemon.stop() == 0, daemon.log
    assert completion.usage is not None
    assert completion.usage.completion_tokens == tokenized(upstream_text(7))
    row = read_store(database_url).request(raw.headers["x-request-id"])
    assert row["completion_tokens_source"] == "tokenizer"


def test_the_sdk_accepts_the_counted_usage() -> None:
    """The extra `llmsvc_counted` field and a null count parse with the official SDK's types."""
    usage = openai.types.CompletionUsage.model_validate(
        {"prompt_tokens": 3, "completion_tokens": 4, "total_tokens": 7, "llmsvc_counted": {}}
    )
    assert usage.model_extra == {"llmsvc_counted": {}}

"""Embeddings end to end: the official `openai` SDK → `llmsvc run` (keys, prices) → the store.

A key limited to other models is refused; an embeddings request is stored with its API, input,
usage and cost, and its vectors only once `store_embeddings` is set.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import openai
import orjson
import pytest
from daemon_process import DaemonProcess, daemon_env, read_store, run_cli

from llmsvc.providers.mock import vector

pytestmark = pytest.mark.timeout(120)

PRICE = {"input_per_million": 1000.0, "output_per_million": 5000.0}


def create_key(env: dict[str, str], *args: str) -> str:
    done = run_cli(env, "keys", "create", *args, "--json")
    assert done.returncode == 0, done.stderr
    secret: str = json.loads(done.stdout)["secret"]
    return secret


def embed(
    daemon: DaemonProcess, secret: str, model: str = "mock", **kwargs: Any
) -> tuple[str, list[list[float]]]:
    """(request id, vectors) of one call through the SDK, which asks for base64."""
    with openai.OpenAI(base_url=f"{daemon.base_url}/v1", api_key=secret, max_retries=0) as sdk:
        raw = sdk.embeddings.with_raw_response.create(model=model, **kwargs)
        return raw.headers["x-request-id"], [d.embedding for d in raw.parse().data]


def test_embeddings_are_stored_with_usage_and_cost_and_vectors_only_when_asked(
    database_url: str, tmp_path: Path
) -> None:
    routes = json.dumps({"mock": ["mock:mock"], "other": ["mock:mock"]})
    env = daemon_env(
        database_url,
        tmp_path / "wal",
        auth="keys",
        routes=routes,
        prices=json.dumps({"mock": PRICE}),
    )
    assert run_cli(env, "migrate").returncode == 0
    secret = create_key(env, "only-mock", "--models", "mock")
    inputs = ["hello there", "hi"]
    with DaemonProcess(env) as daemon:
        daemon.wait_caught_up()
        unstored, got = embed(daemon, secret, input=inputs, dimensions=8)
        with pytest.raises(openai.PermissionDeniedError) as refused:
            embed(daemon, secret, "other", input="hi")  # served, not to this key
        assert daemon.stop() == 0, daemon.log
    assert got == [vector(text, 8) for text in inputs]
    assert refused.value.code == "model_not_allowed"

    with DaemonProcess({**env, "LLMSVC_STORE_EMBEDDINGS": "true"}) as daemon:
        daemon.wait_caught_up()
        stored, kept = embed(daemon, secret, input="hi")
        assert daemon.stop() == 0, daemon.log

    store = read_store(database_url)
    assert len(store.requests) == 2  # the refused request is not stored
    row = store.request(unstored)
    assert (row["api"], row["status"], row["stream"]) == ("embeddings", "completed", False)
    assert row["messages"] == []
    assert row["params"] == {"input": inputs, "dimensions": 8, "encoding_format": "base64"}
    assert (row["prompt_tokens"], row["completion_tokens"]) == (3, 0)
    assert row["cost"] == pytest.approx(3 * PRICE["input_per_million"] / 1e6)
    assert store.only_attempt(unstored)["status"] == "completed"
    assert store.texts(unstored) == []
    assert store.texts(stored) == [orjson.dumps(kept).decode()]
    assert store.request(stored)["prompt_tokens"] == 1

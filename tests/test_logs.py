"""Logs: one line per request, plain or JSON, and no secret in any of them."""

from __future__ import annotations

import json
import logging
import re
import uuid
from pathlib import Path
from typing import Any

import openai
import pytest
from daemon_process import DaemonProcess, UpstreamProcess, daemon_env

from llmsvc.logs import JsonFormatter, Redact

pytestmark = pytest.mark.timeout(120)

KEY = "sk-test-" + uuid.uuid4().hex
ADMIN = "admin-" + uuid.uuid4().hex
MESSAGES: list[Any] = [{"role": "user", "content": "hi"}]


def record(msg: str, *args: Any, exc: BaseException | None = None) -> logging.LogRecord:
    exc_info = (type(exc), exc, exc.__traceback__) if exc else None
    return logging.LogRecord("t", logging.ERROR, __file__, 1, msg, args, exc_info)


def test_secrets_bearer_tokens_and_url_passwords_are_masked_in_text_args_and_tracebacks() -> None:
    redact = Redact([KEY, "pw"])  # a secret shorter than 4 characters is not masked
    try:
        raise ValueError(f"upstream said: bad key {KEY}")
    except ValueError as exc:
        failed = record("call failed", exc=exc)
    lines = [
        record("key=%s", KEY),
        record("Authorization: Bearer abcdefgh12345678 sent"),
        record("connect to postgresql://llmsvc:hunter2@db:5432/x failed"),
        failed,
    ]
    for r in lines:
        assert redact.filter(r)
    text = [JsonFormatter().format(r) for r in lines]

    assert KEY not in "".join(text)
    assert "hunter2" not in "".join(text)
    assert "abcdefgh12345678" not in "".join(text)
    assert json.loads(text[0])["message"] == "key=***"
    assert "Bearer ***" in json.loads(text[1])["message"]
    assert "postgresql://llmsvc:***@db:5432/x" in json.loads(text[2])["message"]
    assert "bad key ***" in json.loads(text[3])["exception"]
    assert {"time", "level", "logger", "message"} <= set(json.loads(text[0]))


def test_json_logs_carry_one_line_per_request_and_never_a_secret(
    sqlite_url: str, tmp_path: Path
) -> None:
    with UpstreamProcess(api_key=KEY) as up:
        providers = json.dumps(
            [
                {"name": "up", "kind": "openai", "base_url": up.base_url, "api_key": KEY,
                 "models": ["gpt-test"]},
                {"name": "up-bad-key", "kind": "openai", "base_url": up.base_url,
                 "api_key": KEY + "-wrong", "models": ["gpt-denied"]},
            ]
        )  # fmt: skip
        env = daemon_env(
            sqlite_url, tmp_path / "wal", providers=providers, log_format="json", admin_token=ADMIN
        )
        with DaemonProcess(env) as daemon:
            client = openai.OpenAI(
                base_url=f"{daemon.base_url}/v1", api_key="unused", max_retries=0
            )
            correlation = str(uuid.uuid4())
            raw = client.chat.completions.with_raw_response.create(
                model="gpt-test",
                messages=MESSAGES,
                max_tokens=5,
                stream=True,
                extra_headers={"X-Correlation-ID": correlation},
            )
            request_id = raw.headers["x-request-id"]
            assert len([c for c in raw.parse() if c.choices and c.choices[0].delta.content]) == 5
            with pytest.raises(openai.APIStatusError):
                client.chat.completions.create(model="gpt-denied", messages=MESSAGES)
            assert daemon.stop() == 0

    lines = [line for line in daemon.log.splitlines() if line.strip()]
    events = [json.loads(line) for line in lines]  # every line is one JSON object
    assert all({"time", "level", "logger", "message"} <= set(e) for e in events)
    requests = [e["message"] for e in events if e["message"].startswith("request ")]
    assert len(requests) == 2
    ok = next(m for m in requests if request_id in m)
    fields = dict(re.findall(r"(\w+)=(\S+)", ok))
    assert fields["request_id"] == request_id
    assert fields["correlation_id"] == correlation
    assert (fields["model"], fields["provider"], fields["status"]) == (
        "gpt-test",
        "up",
        "completed",
    )
    assert fields["tokens"] == "5"
    assert float(fields["latency_ms"]) > 0
    assert KEY not in daemon.log
    assert ADMIN not in daemon.log


def test_a_callers_secret_is_masked_even_where_no_setting_names_it() -> None:
    secret = "sk-llmsvc-" + "Ab3_-" * 6
    assert Redact([]).mask(f"upstream said: bad key {secret}.") == "upstream said: bad key ***."

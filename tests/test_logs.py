"""Logs: one line per request, plain or JSON, and no secret in any of them."""

from __future__ import annotations

import io
import json
import logging
import uuid
from pathlib import Path
from typing import Any

import openai
import pytest
from daemon_process import DaemonProcess, UpstreamProcess, daemon_env

from llmsvc.logs import Event, JsonFormatter, Redact, logger

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
        record("authorization: BEARER abcdefgh87654321 sent"),  # any case
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
    assert json.loads(text[4])["message"] == "authorization: BEARER *** sent"
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
            correlation = str(uuid.uuid4())
            with openai.OpenAI(
                base_url=f"{daemon.base_url}/v1", api_key="unused", max_retries=0
            ) as client:
                raw = client.chat.completions.with_raw_response.create(
                    model="gpt-test",
                    messages=MESSAGES,
                    max_tokens=5,
                    stream=True,
                    extra_headers={"X-Correlation-ID": correlation},
                )
                request_id = raw.headers["x-request-id"]
                deltas = [c for c in raw.parse() if c.choices and c.choices[0].delta.content]
                assert len(deltas) == 5
                with pytest.raises(openai.APIStatusError):
                    client.chat.completions.create(model="gpt-denied", messages=MESSAGES)
            assert daemon.stop() == 0

    lines = [line for line in daemon.log.splitlines() if line.strip()]
    events = [json.loads(line) for line in lines]  # every line is one JSON object
    assert all({"time", "level", "logger", "message"} <= set(e) for e in events)
    requests = [e for e in events if e["message"] == "request"]
    assert len(requests) == 2
    # Each field is a key of its own, with its JSON type; the message is the event alone.
    ok = next(e for e in requests if e["request_id"] == request_id)
    assert ok["correlation_id"] == correlation
    assert (ok["model"], ok["provider"], ok["status"]) == ("gpt-test", "up", "completed")
    assert ok["stream"] is True
    assert (ok["completion_tokens"], ok["deltas"]) == (5, 5)
    assert isinstance(ok["prompt_tokens"], int)
    assert ok["latency_ms"] > 0
    assert "error" not in ok
    failed = next(e for e in requests if e["request_id"] != request_id)
    assert (failed["model"], failed["status"]) == ("gpt-denied", "failed")
    assert failed["error"] == "invalid_api_key"  # the upstream's code: why it failed
    ready = next(e for e in events if e["message"] == "ready")
    assert isinstance(ready["port"], int)
    assert KEY not in daemon.log
    assert ADMIN not in daemon.log


def test_an_event_reads_as_text_key_value_and_as_json_keys() -> None:
    out = io.StringIO()
    handler = logging.StreamHandler(out)
    handler.addFilter(Redact([KEY]))
    probe = logging.getLogger("test_logs.probe")
    probe.addHandler(handler)
    probe.propagate = False
    probe.setLevel(logging.DEBUG)
    log = logger("test_logs.probe")
    try:
        for formatter in (logging.Formatter("%(levelname)s %(message)s"), JsonFormatter("w-1")):
            handler.setFormatter(formatter)
            log.info("job %s", "prune", status="ok", rows=3, seconds=0.25, error=None)
            log.warning("upstream refused", provider="up", error=f"bad key {KEY}")
            log.debug("plain %d%%", 5)
    finally:
        probe.removeHandler(handler)
    text = out.getvalue().splitlines()

    # Plain text: the event, then each field as key=value in order; a None field is left out.
    assert text[:3] == [
        "INFO job prune status=ok rows=3 seconds=0.25",
        "WARNING upstream refused provider=up error=bad key ***",
        "DEBUG plain 5%",
    ]
    job, refused, plain = (json.loads(line) for line in text[3:])
    assert job["message"] == "job prune"
    assert (job["status"], job["rows"], job["seconds"]) == ("ok", 3, 0.25)
    assert "error" not in job
    assert job["process"] == "w-1"
    # A secret in a field is masked there, and the event keeps its fields.
    assert (refused["message"], refused["provider"]) == ("upstream refused", "up")
    assert refused["error"] == "bad key ***"
    assert KEY not in out.getvalue()
    assert plain["message"] == "plain 5%"
    assert set(plain) == {"time", "level", "logger", "message", "process"}


def test_a_field_never_overwrites_a_key_every_line_has() -> None:
    r = logging.LogRecord("t", logging.INFO, __file__, 1, Event("x", {"level": "forged"}), (), None)
    assert json.loads(JsonFormatter().format(r))["level"] == "INFO"


def test_a_callers_secret_is_masked_even_where_no_setting_names_it() -> None:
    secret = "sk-llmsvc-" + "Ab3_-" * 6
    assert Redact([]).mask(f"upstream said: bad key {secret}.") == "upstream said: bad key ***."

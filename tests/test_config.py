"""Settings: defaults, LLMSVC_* variables, the TOML file, and refusals that name the key."""

from __future__ import annotations

import dataclasses
import inspect
import json
import os
import re
from pathlib import Path
from typing import Any

import pytest

from llmsvc.config import (
    CONFIG_VARIABLE,
    TEST_VARIABLES,
    WORKER_INDEX_VARIABLE,
    CircuitPolicy,
    FlushPolicy,
    ProviderConfig,
    RetryPolicy,
    Settings,
    WalPolicy,
    load_settings,
)
from llmsvc.errors import ConfigError
from llmsvc.gateway.app import Gateway
from llmsvc.gateway.breaker import Breakers
from llmsvc.gateway.chat import Exchange
from llmsvc.gateway.journal import Journal
from llmsvc.gateway.router import Router
from llmsvc.keytable import KeyTable
from llmsvc.limits import Limiter
from llmsvc.store.flusher import Flusher
from llmsvc.wal.writer import WalWriter

SECRET = "sk-do-not-print-0123456789"


@pytest.fixture(autouse=True)
def clean_env(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Path:
    """No LLMSVC_* from the caller's shell; state lives in the test's directory."""
    for name in list(os.environ):
        if name.startswith("LLMSVC_"):
            monkeypatch.delenv(name)
    state = tmp_path / "state"
    monkeypatch.setenv("XDG_STATE_HOME", str(state))
    return state


def _toml(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, text: str) -> Path:
    path = tmp_path / "llmsvc.toml"
    path.write_text(text)
    monkeypatch.setenv("LLMSVC_CONFIG", str(path))
    return path


def _refused(match: str) -> pytest.RaisesExc[ConfigError]:
    return pytest.raises(ConfigError, match=match)


def test_defaults_live_under_xdg_state_home(clean_env: Path) -> None:
    s = load_settings()
    assert s.database_url == f"sqlite+aiosqlite:///{clean_env / 'llmsvc' / 'llmsvc.db'}"
    assert s.database_url.startswith("sqlite")
    assert s.wal_dir == clean_env / "llmsvc" / "wal"
    assert (s.host, s.port) == ("127.0.0.1", 8080)
    assert s.wal_sync == "write"
    assert s.providers == [ProviderConfig(name="mock", kind="mock", models=["mock"])]


def test_metrics_port_is_on_loopback_and_the_backlog_limit_is_a_gib_by_default() -> None:
    s = load_settings()
    assert (s.metrics_host, s.metrics_port) == ("127.0.0.1", 9464)
    assert s.wal_backlog_limit_bytes == 1024**3


def test_metrics_and_backlog_settings_come_from_the_environment(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("LLMSVC_METRICS_HOST", "0.0.0.0")
    monkeypatch.setenv("LLMSVC_METRICS_PORT", "0")
    monkeypatch.setenv("LLMSVC_WAL_BACKLOG_LIMIT_BYTES", "4096")
    s = load_settings()
    assert (s.metrics_host, s.metrics_port, s.wal_backlog_limit_bytes) == ("0.0.0.0", 0, 4096)


def test_policies_carry_the_settings_in_the_units_the_parts_take() -> None:
    s = Settings(
        retries_per_target=2,
        retry_backoff_ms=300,
        retry_backoff_max_ms=4000,
        retry_after_max_seconds=7,
        first_token_timeout_seconds=30,
        attempt_timeout_seconds=600,
        request_timeout_seconds=1200,
        circuit_failure_threshold=4,
        circuit_cooldown_seconds=15,
        circuit_window=12,
        wal_sync="fsync",
        wal_fsync_interval_ms=20,
        wal_commit_delay_us=250,
        wal_segment_max_bytes=1024 * 1024,
        flush_interval_ms=70,
        flush_batch_records=1000,
        database_timeout_seconds=3,
    )
    assert s.retry_policy() == RetryPolicy(
        retries=2,
        backoff=0.3,
        backoff_max=4.0,
        retry_after_max=7,
        first_token_timeout=30,
        attempt_timeout=600,
        request_timeout=1200,
    )
    assert s.circuit_policy() == CircuitPolicy(threshold=4, cooldown=15, window=12)
    assert s.wal_policy() == WalPolicy(
        sync="fsync", fsync_interval=0.02, commit_delay=0.00025, segment_max_bytes=1024 * 1024
    )
    assert s.flush_policy() == FlushPolicy(interval=0.07, batch_records=1000, timeout=3)


@pytest.mark.parametrize("policy", [RetryPolicy, CircuitPolicy, WalPolicy, FlushPolicy])
def test_policies_have_no_defaults_of_their_own(policy: type[Any]) -> None:
    defaulted = [
        f.name
        for f in dataclasses.fields(policy)
        if f.default is not dataclasses.MISSING or f.default_factory is not dataclasses.MISSING
    ]
    assert defaulted == []  # the settings are the only defaults


@pytest.mark.parametrize(
    "part",
    [Router, Breakers, Exchange, Gateway, Journal, Limiter, KeyTable, WalWriter, Flusher],
    ids=lambda part: part.__name__,
)
def test_parts_repeat_no_setting_as_a_default(part: type[Any]) -> None:
    literal = {
        name: parameter.default
        for name, parameter in inspect.signature(part).parameters.items()
        if isinstance(parameter.default, int | float | str)
        and not isinstance(parameter.default, bool)
    }
    assert literal == {}  # a bound or a default belongs in Settings, passed in as a policy


def test_without_xdg_state_home_state_is_under_home(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.delenv("XDG_STATE_HOME")
    monkeypatch.setenv("HOME", str(tmp_path))
    assert load_settings().wal_dir == tmp_path / ".local" / "state" / "llmsvc" / "wal"


def test_environment_overrides_defaults(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("LLMSVC_PORT", "9123")
    monkeypatch.setenv("LLMSVC_HOST", "0.0.0.0")
    monkeypatch.setenv("LLMSVC_WAL_SYNC", "fsync")
    monkeypatch.setenv("LLMSVC_WAL_DIR", str(tmp_path / "elsewhere"))
    monkeypatch.setenv("LLMSVC_DATABASE_URL", f"sqlite:///{tmp_path / 'x.db'}")
    monkeypatch.setenv("LLMSVC_MAX_BODY_BYTES", "2048")
    monkeypatch.setenv("LLMSVC_PROVIDERS", '[{"name": "m2", "kind": "mock", "models": ["a", "b"]}]')
    s = load_settings()
    assert (s.host, s.port, s.wal_sync, s.max_body_bytes) == ("0.0.0.0", 9123, "fsync", 2048)
    assert s.wal_dir == tmp_path / "elsewhere"
    assert s.database_url == f"sqlite+aiosqlite:///{tmp_path / 'x.db'}"
    assert [(p.name, p.models) for p in s.providers] == [("m2", ["a", "b"])]


def test_toml_file_sets_values_and_providers(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    _toml(
        tmp_path,
        monkeypatch,
        f"""
port = 9001
log_level = "DEBUG"
database_url = "postgresql://llm:pw@db.example:5432/llmsvc"

[[providers]]
name = "openai"
kind = "openai"
base_url = "https://api.openai.com/v1"
api_key = "{SECRET}"
models = ["gpt-4o-mini"]
timeout_seconds = 30

[[providers]]
name = "demo"
kind = "mock"
models = ["mock", "slow-mock"]
token_delay_ms = 25
""",
    )
    s = load_settings()
    assert (s.port, s.log_level) == (9001, "DEBUG")
    assert s.database_url == "postgresql+asyncpg://llm:pw@db.example:5432/llmsvc"
    assert not s.database_url.startswith("sqlite")
    openai, demo = s.providers
    assert (openai.kind, openai.base_url, openai.timeout_seconds) == (
        "openai",
        "https://api.openai.com/v1",
        30,
    )
    assert openai.api_key is not None
    assert openai.api_key.get_secret_value() == SECRET
    assert (demo.models, demo.token_delay_ms) == (["mock", "slow-mock"], 25)
    assert SECRET not in repr(s)
    assert SECRET not in str(s.model_dump())


def test_environment_wins_over_toml(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    _toml(tmp_path, monkeypatch, 'port = 9001\nhost = "10.0.0.1"\n')
    monkeypatch.setenv("LLMSVC_PORT", "9002")
    s = load_settings()
    assert (s.port, s.host) == (9002, "10.0.0.1")


@pytest.mark.parametrize(
    ("given", "expected"),
    [
        ("postgresql://u:p@h/db", "postgresql+asyncpg://u:p@h/db"),
        ("postgres://u@h:5433/db", "postgresql+asyncpg://u@h:5433/db"),
        ("postgresql+asyncpg://h/db", "postgresql+asyncpg://h/db"),
        ("sqlite:////tmp/a.db", "sqlite+aiosqlite:////tmp/a.db"),
        ("sqlite+aiosqlite:////tmp/a.db", "sqlite+aiosqlite:////tmp/a.db"),
        ("sqlite:///:memory:", "sqlite+aiosqlite:///:memory:"),
    ],
)
def test_database_url_gets_the_async_driver(
    monkeypatch: pytest.MonkeyPatch, given: str, expected: str
) -> None:
    monkeypatch.setenv("LLMSVC_DATABASE_URL", given)
    assert load_settings().database_url == expected


@pytest.mark.parametrize(
    ("env", "value", "field"),
    [
        ("LLMSVC_WAL_SYNC", "sometimes", "wal_sync"),
        ("LLMSVC_PORT", "70000", "port"),
        ("LLMSVC_PORT", "-1", "port"),
        ("LLMSVC_PORT", "http", "port"),
        ("LLMSVC_LOG_LEVEL", "LOUD", "log_level"),
        ("LLMSVC_MAX_BODY_BYTES", "10", "max_body_bytes"),
        ("LLMSVC_WAL_FSYNC_INTERVAL_MS", "0", "wal_fsync_interval_ms"),
        ("LLMSVC_DATABASE_URL", "mysql://h/db", "database_url"),
        ("LLMSVC_DATABASE_URL", "just-a-path.db", "database_url"),
        (
            "LLMSVC_PROVIDERS",
            '[{"name": "x", "kind": "mock", "models": []}]',
            r"providers\[0\]\.models",
        ),
        ("LLMSVC_WAL_BACKLOG_LIMIT_BYTES", "0", "wal_backlog_limit_bytes"),
        ("LLMSVC_WAL_BACKLOG_LIMIT_BYTES", "1GiB", "wal_backlog_limit_bytes"),
        ("LLMSVC_METRICS_PORT", "65536", "metrics_port"),
        ("LLMSVC_METRICS_PORT", "-1", "metrics_port"),
        ("LLMSVC_MAX_HEADER_BYTES", "100", "max_header_bytes"),
        ("LLMSVC_REQUEST_HEADER_TIMEOUT_SECONDS", "0", "request_header_timeout_seconds"),
        ("LLMSVC_REQUEST_BODY_TIMEOUT_SECONDS", "-1", "request_body_timeout_seconds"),
        ("LLMSVC_KEEPALIVE_TIMEOUT_SECONDS", "0.5", "keepalive_timeout_seconds"),
        ("LLMSVC_MAX_CONNECTIONS", "0", "max_connections"),
        ("LLMSVC_OTEL_ENDPOINT", "127.0.0.1:4318", "otel_endpoint"),
        ("LLMSVC_OTEL_QUEUE_SPANS", "0", "otel_queue_spans"),
    ],
)
def test_bad_environment_value_names_the_field(
    monkeypatch: pytest.MonkeyPatch, env: str, value: str, field: str
) -> None:
    monkeypatch.setenv(env, value)
    with _refused(rf"^invalid configuration: {field} \(from {env}\): "):
        load_settings()


@pytest.mark.parametrize(
    ("text", "field"),
    [
        ('wal_sync = "sometimes"\n', "wal_sync"),
        ("port = 65536\n", "port"),
        ("prot = 8081\n", "prot"),
        ('[[providers]]\nname = "p"\nkind = "bedrock"\nmodels = ["m"]\n', "providers[0].kind"),
        ('[[providers]]\nname = "p"\nkind = "mock"\nmodels = ["m"]\ncolour = 1\n', "colour"),
        ('[[providers]]\nname = "p"\nkind = "openai"\nmodels = ["m"]\n', "base_url"),
        ('[[providers]]\nname = "p"\nkind = "openai"\nbase_url = "ftp://x"\nmodels = ["m"]\n',
         "base_url"),
        ('[[providers]]\nname = "p"\nkind = "anthropic"\nbase_url = "http://x"\nmodels = ["m"]\n'
         'responses = true\n', "providers[0] (in {file}): provider 'p': responses is for kind "
         "openai only, not 'anthropic'"),
        ('[[providers]]\nname = "has space"\nkind = "mock"\nmodels = ["m"]\n', "providers[0].name"),
        ('[[providers]]\nname = "a"\nkind = "mock"\nmodels = ["m"]\n'
         '[[providers]]\nname = "a"\nkind = "mock"\nmodels = ["n"]\n',
         "providers (in {file}): names must be unique"),
    ],
    ids=[
        "wal_sync",
        "port",
        "unknown-key",
        "provider-kind",
        "provider-unknown-key",
        "openai-without-base_url",
        "openai-ftp-base_url",
        "responses-on-anthropic",
        "provider-name",
        "duplicate-provider-names",
    ],
)  # fmt: skip
def test_bad_toml_value_names_the_field(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path, text: str, field: str
) -> None:
    path = _toml(tmp_path, monkeypatch, text)
    with _refused(r"^invalid configuration: ") as refused:
        load_settings()
    assert field.format(file=path) in str(refused.value)
    assert f"(in {path})" in str(refused.value)


def test_malformed_toml_names_the_file_and_line(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    path = _toml(tmp_path, monkeypatch, 'port = 8081\nhost = "unterminated\n')
    with _refused(r"^invalid configuration: ") as refused:
        load_settings()
    assert "line 2" in str(refused.value)
    assert str(path) in str(refused.value)


def test_config_file_that_does_not_exist_is_refused(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    missing = tmp_path / "nope.toml"
    monkeypatch.setenv("LLMSVC_CONFIG", str(missing))
    with _refused("LLMSVC_CONFIG") as refused:
        load_settings()
    assert str(missing) in str(refused.value)


def test_config_that_is_a_directory_is_refused(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.setenv("LLMSVC_CONFIG", str(tmp_path))
    with _refused("LLMSVC_CONFIG"):
        load_settings()


@pytest.mark.parametrize(
    "provider",
    [
        f'name = "p"\nkind = "bedrock"\nmodels = ["m"]\napi_key = "{SECRET}"\n',
        f'name = "p"\nkind = "openai"\nmodels = ["m"]\napi_key = "{SECRET}"\n',
        f'name = "p"\nkind = "openai"\nbase_url = "{SECRET}"\nmodels = ["m"]\n',
        f'name = "p"\nkind = "mock"\nmodels = []\napi_key = "{SECRET}"\n',
        f'name = "p"\nkind = "mock"\nmodels = ["m"]\napi_key = "{SECRET}"\napi_kye = "{SECRET}"\n',
        f'name = "p"\nkind = "mock"\nmodels = ["m"]\napi_key = ["{SECRET}"]\n',
        f'name = "p"\nkind = "mock"\nmodels = ["m"]\napi_key = "{SECRET}\\r\\nx-injected: 1"\n',
    ],
    ids=[
        "bad-kind",
        "no-base_url",
        "key-as-base_url",
        "no-models",
        "typo-key",
        "key-list",
        "key-with-a-line-break",
    ],
)
def test_api_key_never_appears_in_the_error(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path, provider: str
) -> None:
    _toml(tmp_path, monkeypatch, "[[providers]]\n" + provider)
    with _refused(r"^invalid configuration: providers\[0\]") as refused:
        load_settings()
    assert SECRET not in str(refused.value)
    assert SECRET not in repr(refused.value)


def test_otel_headers_are_secrets_masked_in_logs(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("LLMSVC_OTEL_HEADERS", json.dumps({"Authorization": f"Basic {SECRET}"}))
    settings = load_settings()
    assert f"Basic {SECRET}" in settings.secrets()
    assert SECRET not in repr(settings)


def test_api_key_in_bad_environment_json_never_appears_in_the_error(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("LLMSVC_PROVIDERS", f'[{{"name": "p", "api_key": "{SECRET}", ')
    with _refused("providers") as refused:
        load_settings()
    assert SECRET not in str(refused.value)


@pytest.mark.parametrize(
    ("url", "shown"),
    [
        ("postgresql://llm:hunter2@db:5432/x", "postgresql+asyncpg://llm:***@db:5432/x"),
        ("postgresql://llm:p@ss:w0rd@db/x", "postgresql+asyncpg://llm:***@db/x"),
        ("postgresql://llm@db/x", "postgresql+asyncpg://llm@db/x"),
        ("postgresql://db/x", "postgresql+asyncpg://db/x"),
    ],
)
def test_redacted_database_url_masks_the_password(url: str, shown: str) -> None:
    s = Settings(database_url=url)
    assert s.redacted_database_url() == shown
    assert s.database_url == url.replace("postgresql://", "postgresql+asyncpg://")


@pytest.mark.parametrize(
    ("host", "auth", "allowed", "refused"),
    [
        ("127.0.0.1", "none", False, False),
        ("127.0.0.2", "none", False, False),
        ("::1", "none", False, False),
        ("localhost", "none", False, False),
        ("0.0.0.0", "none", False, True),
        ("", "none", False, True),
        ("10.1.2.3", "none", False, True),
        ("gateway.internal", "none", False, True),
        ("0.0.0.0", "keys", False, False),
        ("0.0.0.0", "none", True, False),
    ],
)
def test_a_non_loopback_host_without_keys_is_an_open_relay_unless_allowed(
    host: str, auth: str, allowed: bool, refused: bool
) -> None:
    settings = Settings(host=host, auth=auth, allow_unauthenticated=allowed)
    assert (settings.open_relay() is not None) == refused


@pytest.mark.parametrize(
    ("env", "value", "says"),
    [
        ("LLMSVC_ADMIN_TOKEN", "short", "admin_token (from LLMSVC_ADMIN_TOKEN): too short: "
         "it needs at least 16 characters."),
        ("LLMSVC_PORT", "http", "port (from LLMSVC_PORT): not a whole number: "
         "it takes a whole number, 0 to 65535."),
        ("LLMSVC_PORT", "70000", "port (from LLMSVC_PORT): out of range: it takes 0 to 65535."),
        ("LLMSVC_REQUEST_BODY_TIMEOUT_SECONDS", "0", "request_body_timeout_seconds (from "
         "LLMSVC_REQUEST_BODY_TIMEOUT_SECONDS): out of range: it takes more than 0 and at most "
         "3600."),
        ("LLMSVC_WAL_SYNC", "sometimes", "wal_sync (from LLMSVC_WAL_SYNC): not one of its "
         "choices: it takes 'write' or 'fsync'."),
        ("LLMSVC_ALLOW_UNAUTHENTICATED", "maybe", "allow_unauthenticated (from "
         "LLMSVC_ALLOW_UNAUTHENTICATED): not true or false: it takes true or false."),
        ("LLMSVC_PROVIDERS", '[{"name": "p", "kind": "mock", "models": [}]', "providers (from "
         "LLMSVC_PROVIDERS): not valid JSON (Expecting value at line 1 column 43): it takes a "
         "JSON list."),
        ("LLMSVC_PROVIDERS", '{"name": "p"}', "providers (from LLMSVC_PROVIDERS): of the wrong "
         "type: it takes a list (in a variable, as JSON)."),
        ("LLMSVC_PROVIDERS", '[{"name": "p", "kind": "mock"}]', "providers[0].models (from "
         "LLMSVC_PROVIDERS): missing: it is required."),
        ("LLMSVC_PROVIDERS", '[{"name": "p", "kind": "mock", "models": []}]', "providers[0]."
         "models (from LLMSVC_PROVIDERS): too short: it needs at least 1 entry."),
        ("LLMSVC_PROVIDERS", '[{"name": "p", "kind": "mock", "models": ["m"], "modles": []}]',
         "providers[0].modles (from LLMSVC_PROVIDERS): not a setting (did you mean models?)."),
        ("LLMSVC_PRICES", '{"m": {"input_per_million": -1, "output_per_million": 1}}', "prices.m."
         "input_per_million (from LLMSVC_PRICES): out of range: it takes 0 or more."),
        ("llmsvc_port", "-1", "port (from llmsvc_port): out of range: it takes 0 to 65535."),
    ],
    ids=["too-short", "not-int", "range", "open-range", "literal", "bool", "json", "type",
         "missing", "empty-list", "unknown-nested-key", "nested-range", "lower-case"],
)  # fmt: skip
def test_a_bad_value_is_described_in_plain_words_with_its_variable(
    monkeypatch: pytest.MonkeyPatch, env: str, value: str, says: str
) -> None:
    monkeypatch.setenv(env, value)
    with _refused("^invalid configuration: ") as refused:
        load_settings()
    assert str(refused.value) == f"invalid configuration: {says}"


def test_a_bad_value_in_the_file_names_the_file(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    path = _toml(tmp_path, monkeypatch, 'prot = 8081\nfrobnicate = 1\nadmin_token = "short"\n')
    with _refused("^invalid configuration: ") as refused:
        load_settings()
    assert str(refused.value) == (
        f"invalid configuration: admin_token (in {path}): too short: it needs at least 16 "
        f"characters; prot (in {path}): not a setting (did you mean port?); frobnicate (in "
        f"{path}): not a setting."
    )


@pytest.mark.parametrize(
    ("env", "says"),
    [
        ("LLMSVC_DATABASE", "LLMSVC_DATABASE is not a setting (did you mean LLMSVC_DATABASE_URL?)"),
        ("llmsvc_wal_dri", "llmsvc_wal_dri is not a setting (did you mean LLMSVC_WAL_DIR?)"),
        (
            "LLMSVC_FROBNICATE",
            "LLMSVC_FROBNICATE is not a setting (README.md's Configuration lists them)",
        ),
    ],
)
def test_an_unknown_llmsvc_variable_is_refused_naming_the_closest_setting(
    monkeypatch: pytest.MonkeyPatch, env: str, says: str
) -> None:
    """A misspelt variable would otherwise be ignored: `_URL` dropped boots on SQLite."""
    monkeypatch.setenv(env, "postgresql://db.example/llmsvc")
    with _refused("^invalid configuration: ") as refused:
        load_settings()
    assert str(refused.value).startswith(f"invalid configuration: {says}. ")
    assert "postgresql://db.example" not in str(refused.value)


def test_llmsvcs_own_variables_that_are_not_settings_are_allowed(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    _toml(tmp_path, monkeypatch, "port = 9001\n")  # LLMSVC_CONFIG
    monkeypatch.setenv("LLMSVC_WORKER_INDEX", "1")  # set by the supervisor
    monkeypatch.setenv("LLMSVC_TEST_DATABASE_URL", "postgresql://h/db")  # the test suite's
    assert load_settings().port == 9001


def test_every_llmsvc_variable_the_repository_names_is_one_llmsvc_knows() -> None:
    """A script or unit naming a variable llmsvc refuses would stop the daemon it starts."""
    repo = Path(__file__).resolve().parents[1]
    texts = [
        *(repo / "scripts").iterdir(),
        *(repo / "benchmarks").glob("*.py"),
        *(repo / "systemd").iterdir(),
    ]
    named = set()
    for path in texts:
        named |= set(re.findall(r"\bLLMSVC_[A-Z0-9_]*[A-Z0-9]", path.read_text()))
    settings = {f"LLMSVC_{name.upper()}" for name in Settings.model_fields}
    unknown = {
        name
        for name in named - settings - {CONFIG_VARIABLE, WORKER_INDEX_VARIABLE}
        if not name.startswith(TEST_VARIABLES)
    }
    opt_outs = {"LLMSVC_TEST_POSTGRES", "LLMSVC_TEST_SYSTEMD", "LLMSVC_TEST_PROMTOOL"}
    assert {"LLMSVC_TEST_DATABASE_URL", *opt_outs} <= named
    assert unknown == set()


@pytest.mark.parametrize(
    ("text", "says"),
    [
        ('database_url = "sqlite:///tmp/llmsvc.db"', "database_url (in {file}): 'tmp/llmsvc.db' "
         "is a relative path, which would depend on the folder llmsvc is started in (/ under "
         "systemd): give an absolute one; for /tmp/llmsvc.db write sqlite:////tmp/llmsvc.db."),
        ('wal_dir = "wal"', "wal_dir (in {file}): 'wal' is a relative path"),
        ('backup_dir = "~/backups"', "backup_dir (in {file}): '~/backups' is a relative path"),
    ],
    ids=["database_url", "wal_dir", "backup_dir"],
)  # fmt: skip
def test_a_relative_path_is_refused(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path, text: str, says: str
) -> None:
    """Under systemd the working folder is /: a relative path would land there, unannounced."""
    path = _toml(tmp_path, monkeypatch, text + "\n")
    with _refused("^invalid configuration: ") as refused:
        load_settings()
    assert str(refused.value).startswith(f"invalid configuration: {says.format(file=path)}")

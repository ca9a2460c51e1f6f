"""Settings: the only place that reads the environment or a config file.

Sources, strongest first: `LLMSVC_*` environment variables, then the TOML
file named by `LLMSVC_CONFIG`, then the embedded defaults (SQLite and the WAL
under `$XDG_STATE_HOME/llmsvc`, HTTP on 127.0.0.1:8080, the mock provider).
The settings are the only defaults: the parts take typed policies built from
them here (`Settings.retry_policy()`, ...) and have no defaults of their own.
"""

from __future__ import annotations

import ipaddress
import os
import random
import re
import tomllib
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from apscheduler.triggers.cron import CronTrigger
from pydantic import BaseModel, Field, SecretStr, ValidationError, field_validator, model_validator
from pydantic_settings import (
    BaseSettings,
    PydanticBaseSettingsSource,
    SettingsConfigDict,
    TomlConfigSettingsSource,
)

from llmsvc import __version__
from llmsvc.config_errors import Sources, describe, unknown_variables, unparsable_variables
from llmsvc.errors import ConfigError

MiB = 1024 * 1024
DAY = 24 * 3600  # seconds
CONFIG_VARIABLE = "LLMSVC_CONFIG"
WORKER_INDEX_VARIABLE = "LLMSVC_WORKER_INDEX"
WORKER_GROUP_VARIABLE = "LLMSVC_WORKER_GROUP"
# The waits bounded by shutdown_close_seconds in one shutdown: the catch-up's end, the
# flusher's end and its cancel, each of three followers' end and cancel, two pools, the
# export of the spans left (with otel_endpoint).
SHUTDOWN_CLOSES = 12
TEST_VARIABLES = "LLMSVC_TEST_"  # the test suite's own (tests/postgres.py, scripts/test)


def state_dir() -> Path:
    """The XDG state folder for llmsvc's embedded database and WAL."""
    base = os.environ.get("XDG_STATE_HOME") or str(Path.home() / ".local" / "state")
    return Path(base) / "llmsvc"


def cron_trigger(expression: str) -> CronTrigger:
    """A crontab line (5 fields, or 6 with seconds first), in the host's time zone.

    Raises ValueError naming what is wrong.
    """
    fields = expression.split()
    if len(fields) == 5:
        return CronTrigger.from_crontab(expression)
    if len(fields) == 6:
        second, minute, hour, day, month, day_of_week = fields
        return CronTrigger(
            second=second, minute=minute, hour=hour, day=day, month=month, day_of_week=day_of_week
        )
    raise ValueError(f"{expression!r} is not a cron expression of 5 (or 6, seconds first) fields")


class ProviderConfig(BaseModel):
    """One upstream: its kind, where it is, its key and the models it serves."""

    model_config = {"extra": "forbid"}

    name: str = Field(min_length=1, pattern=r"^[A-Za-z0-9_.-]+$")
    kind: Literal["mock", "openai", "anthropic"]
    base_url: str = ""
    api_key: SecretStr | None = None
    models: list[str] = Field(min_length=1)
    token_delay_ms: float = Field(default=0.0, ge=0, description="mock only: pause per token")
    timeout_seconds: float = Field(default=600.0, gt=0, description="idle between tokens")
    connect_timeout_seconds: float = Field(default=10.0, gt=0)
    anthropic_version: str = "2023-06-01"  # anthropic only: the API version header
    responses: bool = Field(
        default=False,
        description="openai only: the upstream serves /v1/responses, so Responses requests "
        "are forwarded natively rather than translated to chat completions",
    )

    @model_validator(mode="after")
    def _needs_base_url(self) -> ProviderConfig:
        if self.kind != "mock" and not self.base_url.startswith(("http://", "https://")):
            raise ValueError(f"provider {self.name!r}: base_url must be an http(s) URL")
        return self

    @model_validator(mode="after")
    def _fits_a_request_head(self) -> ProviderConfig:
        """What goes into an upstream request's head holds no control character (nor the URL
        a space): a line break there would end a header and start one the upstream obeys."""
        if re.search(r"[\x00-\x20\x7f]", self.base_url):
            raise ValueError(
                f"provider {self.name!r}: base_url holds a control character or a space"
            )
        key = self.api_key.get_secret_value() if self.api_key is not None else ""
        for field, value in (("api_key", key), ("anthropic_version", self.anthropic_version)):
            if re.search(r"[\x00-\x1f\x7f]", value):
                raise ValueError(f"provider {self.name!r}: {field} holds a control character")
        return self

    @model_validator(mode="after")
    def _responses_is_openai_only(self) -> ProviderConfig:
        if self.responses and self.kind != "openai":
            raise ValueError(
                f"provider {self.name!r}: responses is for kind openai only, not {self.kind!r}"
            )
        return self


class Price(BaseModel):
    """What a model costs, in your currency, per million tokens each way."""

    model_config = {"extra": "forbid"}

    input_per_million: float = Field(ge=0)
    output_per_million: float = Field(ge=0)


@dataclass(frozen=True, slots=True)
class RetryPolicy:
    """How hard one request tries: retries per target, their backoff, and time bounds."""

    retries: int
    backoff: float  # seconds before the first retry; doubled each time
    backoff_max: float
    retry_after_max: float  # a longer Retry-After moves on to the next target
    first_token_timeout: float
    attempt_timeout: float
    request_timeout: float  # all attempts of one request together

    def delay(self, retry: int, retry_after: float | None) -> float | None:
        """Seconds to wait before retry `retry + 1`, or None to move on to the next target."""
        if retry_after is not None and retry_after > self.retry_after_max:
            return None
        jittered = min(self.backoff_max, self.backoff * 2**retry) * (0.5 + random.random() / 2)
        return float(max(jittered, retry_after or 0.0))


@dataclass(frozen=True, slots=True)
class CircuitPolicy:
    """When a provider's circuit opens, and for how long (`gateway.breaker`)."""

    threshold: int  # consecutive failures
    cooldown: float  # seconds open before a probe
    window: int  # recent calls whose failure rate opens it


@dataclass(frozen=True, slots=True)
class WalPolicy:
    """How the WAL writer commits and when it starts a new segment (`wal.writer`)."""

    sync: Literal["write", "fsync"]
    fsync_interval: float  # seconds between fdatasyncs with sync "write"
    commit_delay: float  # seconds the writer gathers appends under load
    segment_max_bytes: int


@dataclass(frozen=True, slots=True)
class FlushPolicy:
    """How often and how much the flusher moves into the store (`store.flusher`)."""

    interval: float  # seconds between flushes that found less than a batch
    batch_records: int
    timeout: float | None  # the longest one flush may wait for the database; None: no bound


@dataclass(frozen=True, slots=True)
class SessionTtl:
    """A session's lifetime in seconds when a client gives none, and the longest it may ask."""

    default: int
    max: int


class Settings(BaseSettings):
    """Every setting llmsvc has, validated at load."""

    model_config = SettingsConfigDict(env_prefix="LLMSVC_", extra="forbid")

    database_url: str = ""
    wal_dir: Path = Path()
    wal_sync: Literal["write", "fsync"] = "write"
    wal_fsync_interval_ms: int = Field(default=100, ge=1, le=60_000)
    wal_commit_delay_us: int = Field(default=500, ge=0, le=100_000)
    wal_segment_max_bytes: int = Field(default=100 * MiB, ge=64 * 1024)
    host: str = "127.0.0.1"
    # `keys`: every /v1/* request needs a caller's key (`llmsvc keys create`).
    auth: Literal["none", "keys"] = "none"
    # Serve without keys on a non-loopback host on purpose (otherwise the daemon refuses).
    allow_unauthenticated: bool = False
    port: int = Field(default=8080, ge=0, le=65535)
    # Daemon processes behind the one port, each with its own WAL under wal_dir/worker-<k>.
    workers: int = Field(default=1, ge=1, le=64)
    shutdown_grace_seconds: float = Field(default=20.0, ge=0)
    # After the grace: how long shutdown keeps flushing the WAL into the database.
    shutdown_drain_seconds: float = Field(default=30.0, ge=0, le=3600)
    # Shutdown bounds its other steps too, so it ends whatever the database does
    # (`shutdown_seconds` sums them all). How long requests interrupted after the grace
    # get to journal their ends:
    shutdown_interrupt_seconds: float = Field(default=10.0, gt=0, le=600)
    # How long the HTTP server gets to stop (connections open halfway through are cut).
    shutdown_http_seconds: float = Field(default=10.0, gt=0, le=600)
    # How long a running maintenance job gets to end before it is cancelled.
    shutdown_job_seconds: float = Field(default=5.0, ge=0, le=600)
    # How long each background task gets to end, and each database pool to close.
    shutdown_close_seconds: float = Field(default=2.0, gt=0, le=60)
    # The longest the daemon waits for one database call of its own (connect, flush, read).
    database_timeout_seconds: float = Field(default=10.0, ge=1, le=3600)
    # The flusher's rest between flushes that found less than a batch: how stale the store
    # may be for a reader; four times that after a busy flush (store/flusher.py's BUSY_REST;
    # docs/DECISIONS.md, "The store's writes per token").
    flush_interval_ms: int = Field(default=50, ge=1, le=60_000)
    flush_batch_records: int = Field(default=50_000, ge=1)
    # Write the flush's batches from a process of its own, off the serving process's CPU
    # (`false`: on the daemon's event loop, one process fewer, a longer p99 tail).
    flush_process: bool = True
    max_body_bytes: int = Field(default=4 * MiB, ge=1024)
    # Journal and store embeddings' vectors (one token row of JSON text per request); off,
    # an embeddings request is stored with its input, usage and cost, not its vectors.
    store_embeddings: bool = False
    # HTTP limits, per daemon process (each worker has its own).
    max_header_bytes: int = Field(default=64 * 1024, ge=1024, le=16 * MiB)
    request_header_timeout_seconds: float = Field(default=10, gt=0, le=3600)
    request_body_timeout_seconds: float = Field(default=60, gt=0, le=3600)
    keepalive_timeout_seconds: int = Field(default=5, ge=1, le=3600)
    max_connections: int = Field(default=10_000, ge=1, le=1_000_000)
    wal_backlog_limit_bytes: int = Field(default=1024 * MiB, gt=0)
    metrics_host: str = "127.0.0.1"
    metrics_port: int = Field(default=9464, ge=0, le=65535)
    log_level: Literal["DEBUG", "INFO", "WARNING", "ERROR"] = "INFO"
    log_format: Literal["plain", "json"] = "plain"
    admin_token: SecretStr | None = Field(default=None, min_length=16)  # unset: admin API off
    # Maintenance: a schedule is a cron line; an empty one leaves the job to the CLI
    # (systemd timers or cron, see systemd/ and scripts/).
    prune_schedule: str = "0 3 * * sun"
    backup_schedule: str = "0 2 * * *"
    backup_cleanup_schedule: str = "30 2 * * *"
    wal_housekeeping_schedule: str = "* * * * *"
    gap_scan_schedule: str = "0 * * * *"
    prune_sessions_schedule: str = "15 * * * *"  # expired sessions (POST /v1/sessions) deleted
    job_misfire_grace_seconds: int = Field(default=3600, ge=1)
    retention_days: int = Field(default=180, ge=1)
    prune_batch_requests: int = Field(default=500, ge=1)
    token_partition_ahead_days: int = Field(default=14, ge=1, le=366)
    backup_dir: Path = Path()
    backup_retention_days: int = Field(default=30, ge=1)
    wal_segment_max_age_seconds: int = Field(default=3600, ge=1)
    # A session's lifetime (POST /v1/sessions) when its `ttl_seconds` is left out, and the
    # longest one a client may ask for.
    session_ttl_seconds: int = Field(default=7 * DAY, ge=1)
    session_ttl_max_seconds: int = Field(default=365 * DAY, ge=1)
    providers: list[ProviderConfig] = Field(default_factory=list)
    # Public model name -> ordered targets "provider:upstream-model", tried in turn.
    routes: dict[str, list[str]] = Field(default_factory=dict)
    retries_per_target: int = Field(default=1, ge=0, le=10)
    retry_backoff_ms: float = Field(default=200, ge=0, le=60_000)
    retry_backoff_max_ms: float = Field(default=5_000, ge=0, le=600_000)
    retry_after_max_seconds: float = Field(default=10, ge=0, le=3600)
    first_token_timeout_seconds: float = Field(default=60, gt=0)
    attempt_timeout_seconds: float = Field(default=900, gt=0)
    request_timeout_seconds: float = Field(default=1800, gt=0)
    circuit_failure_threshold: int = Field(default=5, ge=1)
    circuit_cooldown_seconds: float = Field(default=30, ge=0)
    circuit_window: int = Field(default=20, ge=2)
    # "provider:model" or "model" -> price; the first that matches an attempt wins.
    prices: dict[str, Price] = Field(default_factory=dict)
    # Recorded on every request row (environment, version): which deployment served it.
    # Empty: not recorded. The version defaults to llmsvc's own.
    deployment_environment: str = Field(default="", max_length=100)
    deployment_version: str = Field(default=__version__, max_length=100)
    # OpenTelemetry spans, per request and per attempt: unset, none are made. An OTLP/HTTP
    # collector's base URL (spans are sent to <otel_endpoint>/v1/traces).
    otel_endpoint: str | None = None
    otel_service_name: str = Field(default="llmsvc", min_length=1, max_length=100)
    # Headers sent with every export (a collector's credentials): secrets, never logged.
    otel_headers: dict[str, SecretStr] = Field(default_factory=dict)
    # The longest one export waits for the collector (in the exporter's own thread).
    otel_export_timeout_seconds: float = Field(default=10, gt=0, le=600)
    # Spans waiting for export; past this many, new spans are dropped.
    otel_queue_spans: int = Field(default=2048, ge=1, le=1_000_000)

    @field_validator("database_url")
    @classmethod
    def _async_driver(cls, url: str) -> str:
        """Accept the plain URLs operators type and pick the async driver for them."""
        if not url:
            return f"sqlite+aiosqlite:///{state_dir() / 'llmsvc.db'}"
        scheme, sep, rest = url.partition("://")
        if not sep:
            raise ValueError("must be a URL such as sqlite:////path.db or postgresql://host/db")
        drivers = {
            "sqlite": "sqlite+aiosqlite",
            "sqlite+aiosqlite": "sqlite+aiosqlite",
            "postgres": "postgresql+asyncpg",
            "postgresql": "postgresql+asyncpg",
            "postgresql+asyncpg": "postgresql+asyncpg",
        }
        if scheme not in drivers:
            raise ValueError(f"unsupported scheme {scheme!r}: use sqlite:// or postgresql://")
        path = rest.removeprefix("/").partition("?")[0]
        if drivers[scheme] == "sqlite+aiosqlite" and path not in ("", ":memory:"):
            _absolute(Path(path), f"; for /{path} write {scheme}:////{path}")
        return f"{drivers[scheme]}://{rest}"

    @field_validator("otel_endpoint")
    @classmethod
    def _otel_url(cls, url: str | None) -> str | None:
        if url is not None and not url.startswith(("http://", "https://")):
            raise ValueError("must be an http(s) URL, such as http://127.0.0.1:4318")
        return url

    @field_validator("wal_dir")
    @classmethod
    def _default_wal_dir(cls, path: Path) -> Path:
        return state_dir() / "wal" if path == Path() else _absolute(path)

    @field_validator("backup_dir")
    @classmethod
    def _default_backup_dir(cls, path: Path) -> Path:
        return state_dir() / "backups" if path == Path() else _absolute(path)

    @field_validator(
        "prune_schedule",
        "backup_schedule",
        "backup_cleanup_schedule",
        "wal_housekeeping_schedule",
        "gap_scan_schedule",
        "prune_sessions_schedule",
    )
    @classmethod
    def _cron(cls, expression: str) -> str:
        expression = " ".join(expression.split())
        if expression:
            cron_trigger(expression)
        return expression

    @model_validator(mode="after")
    def _default_provider(self) -> Settings:
        """With no provider configured, serve the model `mock` so a new user can try it."""
        if not self.providers:
            self.providers = [ProviderConfig(name="mock", kind="mock", models=["mock"])]
        names = [p.name for p in self.providers]
        if len(set(names)) != len(names):
            raise ValueError("providers: names must be unique")
        for public, targets in self.routes.items():
            if not targets:
                raise ValueError(f"routes.{public}: needs at least one provider:model target")
            for target in targets:
                provider, sep, model = target.partition(":")
                if not sep or not model or provider not in names:
                    raise ValueError(
                        f"routes.{public}: {target!r} must be provider:model with a provider "
                        f"from providers ({', '.join(names)})"
                    )
        return self

    @model_validator(mode="after")
    def _worker_metrics_ports(self) -> Settings:
        """Worker k serves metrics on metrics_port + k, so those ports must exist."""
        last = self.metrics_port + self.workers - 1
        if self.metrics_port and last > 65535:
            raise ValueError(
                f"workers: metrics ports {self.metrics_port}..{last} (one per worker) go past "
                "65535; lower metrics_port"
            )
        return self

    @model_validator(mode="after")
    def _session_ttl_within_max(self) -> Settings:
        if self.session_ttl_seconds > self.session_ttl_max_seconds:
            raise ValueError(
                f"session_ttl_seconds: {self.session_ttl_seconds} is over "
                f"session_ttl_max_seconds={self.session_ttl_max_seconds}"
            )
        return self

    def session_ttl(self) -> SessionTtl:
        return SessionTtl(self.session_ttl_seconds, self.session_ttl_max_seconds)

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        sources: tuple[PydanticBaseSettingsSource, ...] = (init_settings, env_settings)
        config_file = os.environ.get(CONFIG_VARIABLE)
        if config_file:
            sources += (TomlConfigSettingsSource(settings_cls, toml_file=Path(config_file)),)
        return sources

    def shutdown_seconds(self) -> float:
        """The longest a daemon's shutdown takes, whatever the database does (llmsvc.daemon)."""
        return (
            self.shutdown_grace_seconds
            + self.shutdown_interrupt_seconds
            + self.shutdown_http_seconds
            + self.shutdown_drain_seconds
            + self.shutdown_job_seconds
            + SHUTDOWN_CLOSES * self.shutdown_close_seconds
        )

    def retry_policy(self) -> RetryPolicy:
        return RetryPolicy(
            retries=self.retries_per_target,
            backoff=self.retry_backoff_ms / 1000,
            backoff_max=self.retry_backoff_max_ms / 1000,
            retry_after_max=self.retry_after_max_seconds,
            first_token_timeout=self.first_token_timeout_seconds,
            attempt_timeout=self.attempt_timeout_seconds,
            request_timeout=self.request_timeout_seconds,
        )

    def circuit_policy(self) -> CircuitPolicy:
        return CircuitPolicy(
            threshold=self.circuit_failure_threshold,
            cooldown=self.circuit_cooldown_seconds,
            window=self.circuit_window,
        )

    def wal_policy(self) -> WalPolicy:
        return WalPolicy(
            sync=self.wal_sync,
            fsync_interval=self.wal_fsync_interval_ms / 1000,
            commit_delay=self.wal_commit_delay_us / 1e6,
            segment_max_bytes=self.wal_segment_max_bytes,
        )

    def flush_policy(self) -> FlushPolicy:
        return FlushPolicy(
            interval=self.flush_interval_ms / 1000,
            batch_records=self.flush_batch_records,
            timeout=self.database_timeout_seconds,
        )

    def secrets(self) -> list[str]:
        """Every secret in the settings: masked wherever a log line would show one."""
        found = [p.api_key.get_secret_value() for p in self.providers if p.api_key]
        if self.admin_token is not None:
            found.append(self.admin_token.get_secret_value())
        found += [value.get_secret_value() for value in self.otel_headers.values()]
        creds = self.database_url.partition("://")[2].rpartition("@")[0]
        if ":" in creds:
            found.append(creds.split(":", 1)[1])
        return found

    def open_relay(self) -> str | None:
        """Why the daemon must not start as configured: anyone reaching `host` would spend
        the providers' keys. None when it may."""
        if self.auth != "none" or self.allow_unauthenticated or is_loopback(self.host):
            return None
        return (
            f'refusing to start: host={self.host!r} is not a loopback address and auth="none", '
            'so anyone who reaches the port spends the providers\' keys. Set auth="keys" '
            "(LLMSVC_AUTH=keys) and create keys with `llmsvc keys create`, or listen on "
            "127.0.0.1, or set allow_unauthenticated=true if another layer authenticates callers."
        )

    def redacted_database_url(self) -> str:
        """The database URL with any password masked, for logs and messages."""
        scheme, _, rest = self.database_url.partition("://")
        creds, at, host = rest.rpartition("@")
        if not at or ":" not in creds:
            return self.database_url
        return f"{scheme}://{creds.split(':', 1)[0]}:***@{host}"


def _absolute(path: Path, hint: str = "") -> Path:
    """Paths must be absolute: a relative one would depend on the folder llmsvc starts in."""
    if not path.is_absolute():
        raise ValueError(
            f"{str(path)!r} is a relative path, which would depend on the folder llmsvc is "
            f"started in (/ under systemd): give an absolute one{hint}"
        )
    return path


def is_loopback(host: str) -> bool:
    """Whether `host` is reachable only from this machine: `localhost` or a loopback address."""
    if host.lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False  # a name other than localhost, or "" (every address)


def systemd_environment() -> tuple[str | None, int | None]:
    """systemd's notify socket, and its watchdog period in µs if the watchdog is for us.

    Not settings: systemd sets these for the process it started.
    """
    notify_socket = os.environ.get("NOTIFY_SOCKET") or None
    usec, pid = os.environ.get("WATCHDOG_USEC", ""), os.environ.get("WATCHDOG_PID", "")
    ours = not pid or pid == str(os.getpid())
    return notify_socket, int(usec) if usec.isdigit() and int(usec) > 0 and ours else None


def worker_index() -> int | None:
    """Which worker of a `workers > 1` supervisor this process is; None when it is not one.

    Not a setting: the supervisor sets it in each worker's environment.
    """
    index = os.environ.get(WORKER_INDEX_VARIABLE, "")
    return int(index) if index.isdigit() else None


def worker_group() -> str:
    """What a supervisor's workers share in the names of their sockets to each other: set in
    each worker's environment, as its index is."""
    return os.environ.get(WORKER_GROUP_VARIABLE, "")


def worker_environment(
    settings: Settings,
    index: int,
    group: str,
    port: int,
    notify_socket: str,
    watchdog_usec: int | None,
) -> dict[str, str]:
    """Worker `index`'s environment: this one, with its own WAL dir and the port held for all.

    Secrets travel as they came (environment or config file), never as arguments.
    systemd's notify variables are replaced by the supervisor's: a worker reports
    to the supervisor, which alone speaks to systemd.
    """
    env = {
        k: v
        for k, v in os.environ.items()
        if k not in ("NOTIFY_SOCKET", "WATCHDOG_USEC", "WATCHDOG_PID")
    }
    env[WORKER_INDEX_VARIABLE] = str(index)
    env[WORKER_GROUP_VARIABLE] = group
    env["LLMSVC_WAL_DIR"] = str(worker_wal_dir(settings.wal_dir, index))
    env["LLMSVC_PORT"] = str(port)
    env["NOTIFY_SOCKET"] = notify_socket
    if watchdog_usec:
        env["WATCHDOG_USEC"] = str(watchdog_usec)
    return env


def worker_wal_dir(wal_dir: Path, index: int) -> Path:
    """Stable per index, so a worker's replacement locks and replays the same WAL."""
    return wal_dir / f"worker-{index}"


def load_settings(**overrides: Any) -> Settings:
    """Load and validate settings, turning every failure into one ConfigError paragraph."""
    config_file = os.environ.get(CONFIG_VARIABLE)
    if config_file and not Path(config_file).is_file():
        raise ConfigError(
            f"invalid configuration: {CONFIG_VARIABLE} names {config_file!r}, which is not a file."
        )
    sources = Sources(os.environ, config_file)
    unknown = unknown_variables(
        sources,
        Settings.model_fields,
        (CONFIG_VARIABLE, WORKER_INDEX_VARIABLE, WORKER_GROUP_VARIABLE),
        TEST_VARIABLES,
    )
    if unknown:
        raise ConfigError(
            f"invalid configuration: {'; '.join(unknown)}. llmsvc reads every LLMSVC_* "
            "variable as a setting: correct the name or unset it."
        )
    problems = unparsable_variables(sources, Settings)
    if not problems:
        try:
            return Settings(**overrides)
        except ValidationError as exc:
            problems = [describe(err, Settings, sources) for err in exc.errors()]
        except tomllib.TOMLDecodeError as exc:
            problems = [f"{config_file} is not valid TOML: {exc}"]
        except (OSError, ValueError) as exc:  # an unreadable file; pydantic-settings' own
            problems = [str(exc)]
    raise ConfigError(f"invalid configuration: {'; '.join(problems)}.")

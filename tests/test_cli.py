"""The `llmsvc` command as a user runs it: a real process, a real SQLite file, exit codes."""

from __future__ import annotations

import asyncio
import os
import shutil
import sqlite3
import subprocess
import sys
import uuid
from pathlib import Path
from typing import Any

import orjson
import pytest
from policies import flush_policy, wal_policy
from private_state import assert_private

import llmsvc
from llmsvc.gateway.journal import Journal
from llmsvc.store.engine import create_engine
from llmsvc.store.flusher import Flusher
from llmsvc.wal.segment import instance_id
from llmsvc.wal.writer import WalWriter

UNKNOWN_ID = "5f0c9f8e-0000-4000-8000-000000000000"  # fixed: xdist workers must collect alike


class Cli:
    """Runs `python -m llmsvc.cli` with its state (database, WAL) under one directory."""

    def __init__(self, state: Path) -> None:
        self.state = state
        self.db = state / "llmsvc" / "llmsvc.db"
        self.env = {k: v for k, v in os.environ.items() if not k.startswith("LLMSVC_")}
        self.env["XDG_STATE_HOME"] = str(state)

    def __call__(self, *args: str, **env: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [sys.executable, "-m", "llmsvc.cli", *args],
            env={**self.env, **env},
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
        )


@pytest.fixture
def cli(tmp_path: Path) -> Cli:
    return Cli(tmp_path / "state")


@pytest.fixture(scope="module")
def migrated_db(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One `llmsvc migrate` per module; each test gets its own copy of the result."""
    template = Cli(tmp_path_factory.mktemp("template"))
    done = template("migrate")
    assert done.returncode == 0, done.stderr
    return template.db


@pytest.fixture
def migrated(cli: Cli, migrated_db: Path) -> Cli:
    cli.db.parent.mkdir(parents=True)
    shutil.copyfile(migrated_db, cli.db)
    return cli


def test_migrate_creates_the_schema_and_says_where(cli: Cli) -> None:
    done = cli("migrate")
    assert done.returncode == 0, done.stderr
    assert done.stdout.startswith("schema at revision ")
    assert str(cli.db) in done.stdout
    with sqlite3.connect(cli.db) as conn:
        tables = {row[0] for row in conn.execute("SELECT name FROM sqlite_master")}
        [(revision,)] = conn.execute("SELECT version_num FROM alembic_version").fetchall()
    assert {"alembic_version", "llm_requests", "llm_attempts"} <= tables
    assert revision in done.stdout
    again = cli("migrate")  # idempotent
    assert again.returncode == 0, again.stderr
    assert again.stdout == done.stdout


def test_status_on_an_empty_store_says_so(migrated: Cli) -> None:
    done = migrated("status")
    assert done.returncode == 0, done.stderr
    lines = done.stdout.splitlines()
    assert lines[0].split()[:3] == ["CREATED", "(UTC)", "REQUEST"]
    assert lines[-1] == "(no requests yet)"


def test_a_reader_gone_away_ends_the_output_without_a_traceback(migrated: Cli) -> None:
    proc = subprocess.Popen(
        [sys.executable, "-m", "llmsvc.cli", "status"],
        env=migrated.env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    assert proc.stdout is not None
    proc.stdout.close()  # as `llmsvc status | head -0` would
    _, stderr = proc.communicate(timeout=60)
    assert proc.returncode == 1
    assert stderr == b""


def test_status_json_is_a_json_list(migrated: Cli) -> None:
    done = migrated("status", "--json", "--limit", "5")
    assert done.returncode == 0, done.stderr
    assert orjson.loads(done.stdout) == []


@pytest.mark.parametrize(
    "command",
    [
        ("status",),
        ("show", UNKNOWN_ID),
        ("check",),
        ("keys", "list"),
        ("keys", "create", "alpha"),
    ],
    ids=" ".join,
)
def test_a_command_on_a_missing_store_says_which_and_creates_nothing(
    cli: Cli, command: tuple[str, ...]
) -> None:
    """Only `migrate`, `restore` and the daemon make a store: the CLI run without the daemon's
    settings must not leave an empty database where it looked, and must say where that was."""
    done = cli(*command)
    assert done.returncode == 2, done.stderr
    assert done.stdout == ""
    assert done.stderr == (
        f"llmsvc: the store sqlite+aiosqlite:///{cli.db} holds no llmsvc data (no such file). "
        "The llmsvc command reads the same settings as the daemon: LLMSVC_* variables such as "
        "LLMSVC_DATABASE_URL, and the file LLMSVC_CONFIG names (here not set); run it with the "
        "daemon's. If this is the store you mean, `llmsvc migrate` or starting the daemon "
        "creates it.\n"
    )
    assert not cli.state.exists()


@pytest.mark.parametrize("command", [("status",), ("check",)], ids=" ".join)
def test_a_command_on_a_database_without_the_schema_says_so_and_changes_nothing(
    cli: Cli, command: tuple[str, ...], tmp_path: Path
) -> None:
    config = tmp_path / "llmsvc.toml"
    config.write_text('log_level = "WARNING"\n')
    cli.db.parent.mkdir(parents=True)
    with sqlite3.connect(cli.db) as conn:
        conn.execute("CREATE TABLE other_apps_data (x)")
    conn.close()
    done = cli(*command, LLMSVC_CONFIG=str(config))
    assert done.returncode == 2, done.stderr
    assert done.stderr.startswith(
        f"llmsvc: the store sqlite+aiosqlite:///{cli.db} holds no llmsvc data "
        "(no llmsvc schema in it). "
    )
    assert f"the file LLMSVC_CONFIG names (here {config})" in done.stderr
    assert len(done.stderr.splitlines()) == 1
    with sqlite3.connect(cli.db) as conn:
        tables = [row[0] for row in conn.execute("SELECT name FROM sqlite_master")]
    conn.close()
    assert tables == ["other_apps_data"]


def test_a_command_on_a_postgresql_database_without_the_schema_says_so(
    cli: Cli, postgres_url: str
) -> None:
    done = cli("status", LLMSVC_DATABASE_URL=postgres_url)
    assert done.returncode == 2, done.stderr
    assert done.stderr.startswith(
        f"llmsvc: the store {postgres_url} holds no llmsvc data (no llmsvc schema in it). "
    )


def test_status_limit_below_one_is_a_usage_error(migrated: Cli) -> None:
    done = migrated("status", "--limit", "0")
    assert done.returncode == 2
    assert "--limit" in done.stderr


@pytest.mark.parametrize("given", [UNKNOWN_ID, "not-a-uuid"])
def test_show_with_an_unknown_id_exits_1(migrated: Cli, given: str) -> None:
    done = migrated("show", given)
    assert done.returncode == 1
    assert done.stderr == (
        f"llmsvc: no request with the id or correlation id {given!r} in the store\n"
    )


class Journaled:
    """Requests journaled into the CLI's store as the gateway does, in several states."""

    def __init__(self, cli: Cli) -> None:
        self.cli = cli
        self.ids = {name: uuid.uuid4() for name in ("provider", "tokenizer", "estimate")}
        self.ids |= {name: uuid.uuid4() for name in ("streaming", "cut", "twin")}
        self.shared = uuid.uuid4()  # the correlation id `provider` and `twin` were sent with
        self.own = uuid.uuid4()  # `streaming`'s

    async def write(self) -> None:
        wal_dir = self.cli.state / "journal-wal"
        wal_dir.mkdir()
        wal_id = instance_id(wal_dir)
        writer = WalWriter(wal_dir, wal_id, wal_policy())
        writer.open(asyncio.get_running_loop(), lambda exc: None)
        journal = Journal(writer)
        ended = {
            "provider": {"prompt_tokens": 12, "completion_tokens": 4, "status": "completed"},
            "tokenizer": {
                **{"prompt_tokens": 12, "completion_tokens": 3, "cost": 0.5},
                **{"prompt_tokens_source": "tokenizer", "completion_tokens_source": "tokenizer"},
                "status": "interrupted",
            },
            "estimate": {
                **{"prompt_tokens": 9, "completion_tokens": 5, "status": "completed"},
                **{"prompt_tokens_source": "estimate", "completion_tokens_source": "deltas"},
            },
            "twin": {"prompt_tokens": 1, "completion_tokens": 1, "status": "completed"},
        }
        for name, request_id in self.ids.items():
            correlation = {"streaming": self.own, "provider": self.shared, "twin": self.shared}
            messages = [{"role": "user", "content": name}]
            journal.request_start(
                request_id, correlation.get(name, uuid.uuid4()), "gpt-x", True, messages, {}
            )
            attempt = uuid.uuid4()
            journal.attempt_start(attempt, request_id, 1, f"up-{name}", "gpt-x")
            if name == "streaming":
                last = journal.tokens(attempt.bytes, 0, ["a", "b", "c"])
            elif name == "cut":  # as a restart ends a request that received nothing
                last = journal.request_end(request_id, status="interrupted", error="stopped")
            else:
                last = journal.request_end(request_id, provider=f"up-{name}", **ended[name])
            await asyncio.sleep(0.002)  # distinct created_at
        await last
        engine = create_engine(f"sqlite+aiosqlite:///{self.cli.db}")
        flusher = Flusher(engine, wal_dir, wal_id, lambda: writer.end, flush_policy(interval=0.01))
        try:
            await flusher.start()
            assert await flusher.drain(10)
        finally:
            await flusher.close()
            await writer.close()
            await engine.dispose()

    def run(self, *args: str) -> subprocess.CompletedProcess[str]:
        done = self.cli(*args)
        assert done.returncode == 0, done.stderr
        return done

    def status_rows(self, *args: str) -> dict[str, list[str]]:
        """`status`'s table rows by request name, split into columns."""
        _header, *lines = self.run("status", *args).stdout.splitlines()
        names = {str(v): k for k, v in self.ids.items()}
        return {names[line.split()[2]]: line.split() for line in lines if line[:1].isdigit()}


@pytest.fixture
async def journaled(migrated: Cli) -> Journaled:
    journaled = Journaled(migrated)
    await journaled.write()
    return journaled


def test_status_shows_stored_tokens_by_source_the_last_provider_and_times_as_show_does(
    journaled: Journaled,
) -> None:
    """Never 0 or `-` for what the store holds: an unended request shows the deltas stored
    and its attempt's provider; counts llmsvc made are marked and the marks explained."""
    done = journaled.run("status")
    header = done.stdout.splitlines()[0].split()
    assert header[5:] == ["PROVIDER", "KEY", "TEAM", "STATUS", "TOKENS", "COST", "SECONDS"]
    rows = journaled.status_rows()
    columns = {name: (row[4], row[7], row[8], row[9]) for name, row in rows.items()}
    assert columns == {
        "provider": ("up-provider", "completed", "12/4", "-"),
        "tokenizer": ("up-tokenizer", "interrupted", "12*/3*", "0.500000"),
        "estimate": ("up-estimate", "completed", "9~/5~", "-"),
        "streaming": ("up-streaming", "streaming", "?/3~", "-"),
        "cut": ("up-cut", "interrupted", "?/?", "-"),
        "twin": ("up-twin", "completed", "1/1", "-"),
    }
    legend = [line[:2] for line in done.stdout.splitlines() if line[:2] in ("* ", "~ ", "? ")]
    assert legend == ["* ", "~ ", "? "]
    assert "~ estimated by llmsvc" in done.stdout

    # `show` gives the same time as the status row (which says UTC), naming the zone.
    request_id, listed = str(journaled.ids["tokenizer"]), rows["tokenizer"]
    shown = dict(
        line.split(":", 1) for line in journaled.run("show", request_id).stdout.splitlines()[:12]
    )
    created = shown["created_at"].strip()
    assert created.endswith(" UTC")
    assert created.startswith(f"{listed[0]} {listed[1]}.")  # the status row's, with ms
    doc: dict[str, Any] = orjson.loads(journaled.run("show", request_id, "--json").stdout)
    assert doc["request"]["created_at"].endswith("+00:00")


def test_requests_are_found_by_the_correlation_id_they_were_sent_with(
    journaled: Journaled,
) -> None:
    shared = str(journaled.shared)
    assert set(journaled.status_rows("--correlation-id", shared)) == {"provider", "twin"}
    assert journaled.status_rows("--correlation-id", "trace-7") == {}

    shown = journaled.run("show", str(journaled.own), "--json").stdout
    assert orjson.loads(shown)["request"]["id"] == str(journaled.ids["streaming"])
    several = journaled.cli("show", shared)
    assert several.returncode == 2
    assert several.stderr == (
        f"llmsvc: several requests were sent with the correlation id {shared!r}: list them "
        f"with `llmsvc status --correlation-id {shared}` and show one by its request id\n"
    )


@pytest.mark.parametrize(
    ("env", "message"),
    [
        ({"LLMSVC_PORT": "99999"}, "llmsvc: invalid configuration: port (from LLMSVC_PORT): "),
        (
            {"LLMSVC_WAL_SYNC": "never"},
            "llmsvc: invalid configuration: wal_sync (from LLMSVC_WAL_SYNC): ",
        ),
        (
            {"LLMSVC_DATABASE": "postgresql://db.example/llmsvc"},
            "llmsvc: invalid configuration: LLMSVC_DATABASE is not a setting "
            "(did you mean LLMSVC_DATABASE_URL?). ",
        ),
        (
            {"LLMSVC_DATABASE_URL": "sqlite:///llmsvc.db"},
            "llmsvc: invalid configuration: database_url (from LLMSVC_DATABASE_URL): "
            "'llmsvc.db' is a relative path",
        ),
        (
            {"LLMSVC_CONFIG": "/nonexistent/llmsvc.toml"},
            "llmsvc: invalid configuration: LLMSVC_CONFIG names ",
        ),
    ],
    ids=["port", "wal_sync", "unknown-variable", "relative-sqlite-path", "missing-config-file"],
)
def test_bad_configuration_exits_2_naming_it_without_a_traceback(
    cli: Cli, env: dict[str, str], message: str
) -> None:
    done = cli("status", **env)
    assert done.returncode == 2
    assert done.stderr.startswith(message)
    assert len(done.stderr.splitlines()) == 1
    assert not cli.db.exists()  # refused before touching the store


def test_sqlite_directory_that_cannot_be_made_exits_1_with_one_line(
    cli: Cli, tmp_path: Path
) -> None:
    """A database failure is one `llmsvc:` line, even when it fails before connecting."""
    blocker = tmp_path / "file"
    blocker.write_text("")
    done = cli("migrate", LLMSVC_DATABASE_URL=f"sqlite:///{blocker}/sub/llmsvc.db")
    assert done.returncode == 1
    assert done.stderr.startswith("llmsvc: ")
    assert "Traceback" not in done.stderr
    assert len(done.stderr.splitlines()) == 1


@pytest.mark.usefixtures("umask_022")
def test_the_state_migrate_creates_is_private(tmp_path: Path) -> None:
    """The state folder, each folder above it llmsvc made, and every file in them (the other
    commands create none: see test_a_command_on_a_missing_store_says_which_and_creates_nothing)."""
    cli = Cli(tmp_path / "new" / "state")
    done = cli("migrate")
    assert done.returncode == 0, done.stderr
    assert "state/llmsvc/llmsvc.db" in assert_private(tmp_path / "new")


def test_version(cli: Cli) -> None:
    done = cli("--version")
    assert done.returncode == 0
    assert done.stdout.strip() == f"llmsvc {llmsvc.__version__}"


def test_no_command_is_a_usage_error(cli: Cli) -> None:
    done = cli()
    assert done.returncode == 2
    assert "usage: llmsvc" in done.stderr

"""The `llmsvc` command as a user runs it: a real process, a real SQLite file, exit codes."""

from __future__ import annotations

import os
import shutil
import sqlite3
import subprocess
import sys
import uuid
from pathlib import Path

import orjson
import pytest
from private_state import assert_private

import llmsvc


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


def test_status_json_is_a_json_list(migrated: Cli) -> None:
    done = migrated("status", "--json", "--limit", "5")
    assert done.returncode == 0, done.stderr
    assert orjson.loads(done.stdout) == []


@pytest.mark.parametrize(
    "command",
    [
        ("status",),
        ("show", str(uuid.uuid4())),
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
    assert not cli.db.parent.exists()


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


def test_show_with_a_malformed_id_exits_2(migrated: Cli) -> None:
    done = migrated("show", "not-a-uuid")
    assert done.returncode == 2
    assert "'not-a-uuid' is not a request id" in done.stderr
    assert "Traceback" not in done.stderr


def test_show_with_an_unknown_id_exits_1(migrated: Cli) -> None:
    request_id = uuid.uuid4()
    done = migrated("show", str(request_id))
    assert done.returncode == 1
    assert done.stderr.strip() == f"llmsvc: no request {request_id} in the store"


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
@pytest.mark.parametrize("command", [["status"], ["migrate"], ["check"], ["backup"]])
def test_whichever_command_creates_the_state_it_is_private(
    tmp_path: Path, command: list[str]
) -> None:
    """The state folder, each folder above it llmsvc made, and every file in them."""
    cli = Cli(tmp_path / "new" / "state")
    done = cli(*command)
    assert "Traceback" not in done.stderr
    assert "state/llmsvc/llmsvc.db" in assert_private(tmp_path / "new")


def test_version(cli: Cli) -> None:
    done = cli("--version")
    assert done.returncode == 0
    assert done.stdout.strip() == f"llmsvc {llmsvc.__version__}"


def test_no_command_is_a_usage_error(cli: Cli) -> None:
    done = cli()
    assert done.returncode == 2
    assert "usage: llmsvc" in done.stderr

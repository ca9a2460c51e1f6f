"""The maintenance commands as an operator runs them: real `llmsvc` processes on SQLite."""

from __future__ import annotations

import json
import os
import sqlite3
import subprocess
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from daemon_process import LLMSVC, REPO, DaemonProcess, daemon_env, run_cli

pytestmark = pytest.mark.timeout(120)


@pytest.fixture
def env(sqlite_url: str, tmp_path: Path) -> dict[str, str]:
    env = daemon_env(sqlite_url, tmp_path / "wal", backup_dir=tmp_path / "backups")
    assert run_cli(env, "migrate").returncode == 0
    return env


def ok(env: dict[str, str], *args: str) -> str:
    done = run_cli(env, *args)
    assert done.returncode == 0, done.stdout + done.stderr
    return done.stdout


def test_jobs_lists_every_job_with_its_schedule_and_next_and_last_runs(
    env: dict[str, str],
) -> None:
    before = json.loads(ok(env, "jobs", "--json"))
    ran = ok(env, "jobs", "run", "gap-scan")
    after = {job["job"]: job for job in json.loads(ok(env, "jobs", "--json"))}
    table = ok(env, "jobs")

    assert [job["job"] for job in before] == [
        "prune",
        "backup",
        "backup-cleanup",
        "wal-housekeeping",
        "gap-scan",
        "prune-sessions",
    ]
    assert all(job["next_run"] and job["last_run"] is None for job in before)
    assert ran.startswith("gap-scan: ok")
    assert after["gap-scan"]["last_status"] == "ok"
    assert after["gap-scan"]["last_ok"] == after["gap-scan"]["last_run"]
    assert after["prune"]["schedule"] == "0 3 * * sun"
    assert "gap-scan" in table
    assert "0 2 * * *" in table


def test_a_job_left_to_the_cli_has_no_next_run(env: dict[str, str]) -> None:
    jobs = json.loads(ok({**env, "LLMSVC_PRUNE_SCHEDULE": ""}, "jobs", "--json"))
    prune = next(job for job in jobs if job["job"] == "prune")
    assert (prune["schedule"], prune["next_run"]) == ("", None)
    assert "(by hand only)" in ok({**env, "LLMSVC_PRUNE_SCHEDULE": ""}, "jobs")


def test_backup_backups_and_restore_from_the_command_line(env: dict[str, str]) -> None:
    made = json.loads(ok(env, "backup", "--json"))
    listed = json.loads(ok(env, "backups", "--json"))
    restored = ok(env, "restore", made["found"]["file"])

    assert made["status"] == "ok"
    assert [b["name"] for b in listed] == [made["found"]["file"]]
    assert listed[0]["verified"] is True
    assert "yes" in ok(env, "backups")
    assert restored.startswith("restore: ok")
    # The store is the backup's again: its runs end before that backup's own record.
    database = env["LLMSVC_DATABASE_URL"].partition(":///")[2]
    with sqlite3.connect(database) as conn:
        runs = [job for (job,) in conn.execute("SELECT job FROM maintenance_runs ORDER BY id")]
    assert runs == ["restore"]


def test_restore_refuses_bad_names_and_a_running_daemon_with_exit_2_said_once(
    env: dict[str, str],
) -> None:
    made = json.loads(ok(env, "backup", "--json"))["found"]["file"]
    for name in ("../llmsvc.db", "/etc/passwd", "llmsvc-nothere.dump"):
        bad = run_cli(env, "restore", name)
        assert bad.returncode == 2, bad.stderr
        assert "Traceback" not in bad.stderr
        assert bad.stderr.startswith("llmsvc: ")

    with DaemonProcess(env) as daemon:
        refused = run_cli(env, "restore", made)
        assert daemon.stop() == 0
    assert refused.returncode == 2
    assert refused.stdout == ""
    assert refused.stderr.startswith("llmsvc: refusing to restore: an llmsvc daemon is running")
    assert refused.stderr.count("refusing to restore") == 1
    assert "--force" in refused.stderr
    assert "Error" not in refused.stderr  # plain words, no exception's name
    runs = json.loads(ok(env, "jobs", "--json"))
    assert "restore" not in {job["job"] for job in runs}  # refused: nothing was run


def test_prune_dry_run_counts_and_bad_arguments_exit_2(env: dict[str, str]) -> None:
    dry = json.loads(ok(env, "prune", "--dry-run", "--older-than", "1", "--json"))
    assert dry["status"] == "ok"
    assert dry["repaired"] == {"dry_run": True}
    assert dry["found"]["requests"] == 0
    everything = json.loads(ok(env, "prune", "--older-than", "0", "--json"))
    assert everything["status"] == "ok"
    assert everything["repaired"]["requests"] == 0
    before = json.loads(ok(env, "prune", "--dry-run", "--before", "2026-01-31", "--json"))
    assert before["found"]["cutoff"] == "2026-01-31T00:00:00+00:00"  # naive: UTC
    for args, message in (
        (["--older-than", "-1"], "--older-than must be 0.."),
        (["--before", "last tuesday"], "--before: 'last tuesday' is neither a duration"),
        (["--before", "2999-01-01"], "is in the future"),
        (["--older-than", "1", "--before", "2026-01-31"], "not allowed with argument"),
    ):
        bad = run_cli(env, "prune", *args)
        assert bad.returncode == 2, args
        assert message in bad.stderr
        assert "Traceback" not in bad.stderr


@pytest.mark.parametrize("database_url", ["postgresql"], indirect=True)
def test_a_prune_from_the_command_line_creates_the_token_partitions_ahead(
    database_url: str, tmp_path: Path
) -> None:
    """As the scheduled job does: cron and timer deployments never run out of partitions."""
    env = daemon_env(database_url, tmp_path / "wal", token_partition_ahead_days=20)
    assert run_cli(env, "migrate").returncode == 0  # the migration creates 14 days ahead
    dry = json.loads(ok(env, "prune", "--dry-run", "--json"))
    done = json.loads(ok(env, "prune", "--json"))
    again = json.loads(ok(env, "prune", "--json"))

    today = datetime.now(UTC).date()
    ahead = [f"llm_token_log_p{today + timedelta(days=n):%Y%m%d}" for n in range(15, 21)]
    assert "partitions_created" not in dry["repaired"]  # a dry run changes nothing
    assert done["repaired"]["partitions_created"] == ahead
    assert again["repaired"]["partitions_created"] == []


def test_a_bad_schedule_is_a_configuration_error_naming_the_setting(
    env: dict[str, str],
) -> None:
    bad = run_cli({**env, "LLMSVC_BACKUP_SCHEDULE": "61 * * * *"}, "jobs")
    assert bad.returncode == 2
    assert "backup_schedule" in bad.stderr
    assert "Traceback" not in bad.stderr


@pytest.mark.parametrize(
    ("script", "args"), [("daily_backup.sh", []), ("prune_tokens.sh", ["--dry-run"])]
)
def test_the_cron_scripts_exit_0_when_done_and_non_zero_on_failure(
    env: dict[str, str], tmp_path: Path, script: str, args: list[str]
) -> None:
    path = REPO / "scripts" / script
    with_cli = {**env, "LLMSVC": str(LLMSVC)}
    done = subprocess.run([path, *args], env=with_cli, capture_output=True, text=True, check=False)
    assert done.returncode == 0, done.stdout + done.stderr
    broken = {**with_cli, "LLMSVC_DATABASE_URL": f"sqlite:///{tmp_path}/no/such/dir/x.db"}
    os.chmod(tmp_path, 0o500)  # the database cannot be created: every step fails
    try:
        failed = subprocess.run(
            [path, *args], env=broken, capture_output=True, text=True, check=False
        )
    finally:
        os.chmod(tmp_path, 0o700)
    assert failed.returncode != 0
    assert "llmsvc:" in failed.stderr

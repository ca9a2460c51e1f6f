"""The units in systemd/, checked by systemd-analyze as an operator installs them.

`systemd-analyze verify` and `security --offline` run with `--root=` on a temporary
tree that holds the units in /etc/systemd/system and a stand-in executable at each
ExecStart path: the units are checked as shipped, with the install paths they name,
on a machine without /opt/llmsvc (rewriting the paths in a copy would check another
file). The tree also gets the host's own unit directory, for the targets every unit
depends on (sysinit.target, timers.target, ...).

systemd-analyze is required: missing, these tests fail and say how to get it, unless
LLMSVC_TEST_SYSTEMD=skip opts out explicitly (they are then reported as skipped).
"""

from __future__ import annotations

import os
import re
import shlex
import shutil
import subprocess
from pathlib import Path

import pytest
from daemon_process import REPO

from llmsvc.cli import _parser
from llmsvc.config import Settings, load_settings
from llmsvc.supervisor import KILL_MARGIN_SECONDS

UNITS = REPO / "systemd"
MAIN = "llmsvc.service"
JOBS = ("llmsvc-backup.service", "llmsvc-prune.service")
TIMERS = ("llmsvc-backup.timer", "llmsvc-prune.timer")
EXPOSURE_CEILING = 3.5  # systemd-analyze security's scale: 0 (locked down) to 10 (exposed)
OPT_OUT = "LLMSVC_TEST_SYSTEMD"
HOST_UNIT_DIRS = (Path("/usr/lib/systemd/system"), Path("/lib/systemd/system"))


def directives(unit: str, section: str | None = None) -> list[tuple[str, str]]:
    """A unit's `Key=value` lines in order, of one section or all; comments left out."""
    found, current = [], None
    for line in (UNITS / unit).read_text().splitlines():
        if line.startswith("["):
            current = line.strip("[]")
        key, equals, value = line.partition("=")
        if equals and not key.startswith(("#", ";")) and section in (None, current):
            found.append((key, value))
    return found


def values(unit: str, key: str) -> list[str]:
    return [value for name, value in directives(unit) if name == key]


def exec_starts() -> list[list[str]]:
    return [shlex.split(command) for unit in (MAIN, *JOBS) for command in values(unit, "ExecStart")]


@pytest.fixture(scope="module")
def analyze() -> str:
    """systemd-analyze, 250 or newer (for `security --offline`)."""
    if os.environ.get(OPT_OUT, "").lower() == "skip":
        pytest.skip(f"unit checks skipped on request ({OPT_OUT}=skip)")
    path = shutil.which("systemd-analyze")
    if path is None:
        pytest.fail(
            "systemd-analyze is not installed, so the units in systemd/ cannot be checked: "
            "install systemd (Debian/Ubuntu: apt-get install systemd; it need not run), or set "
            f"{OPT_OUT}=skip to skip these tests explicitly.",
            pytrace=False,
        )
    version = subprocess.run([path, "--version"], capture_output=True, text=True, check=True)
    found = re.match(r"systemd (\d+)", version.stdout)
    if found is None or int(found[1]) < 250:
        pytest.fail(
            f"{path} is too old to check the units ({version.stdout.splitlines()[0]}): "
            f"`security --offline` needs systemd 250 or newer; or set {OPT_OUT}=skip.",
            pytrace=False,
        )
    return path


@pytest.fixture(scope="module")
def install_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A root with the units installed and a stand-in executable at each ExecStart path."""
    root = tmp_path_factory.mktemp("root")
    host_units = next((d for d in HOST_UNIT_DIRS if (d / "sysinit.target").exists()), None)
    if host_units is None:
        pytest.fail(f"no systemd unit directory with sysinit.target in {HOST_UNIT_DIRS}")
    shutil.copytree(host_units, root / host_units.relative_to("/"), symlinks=True)
    installed = root / "etc/systemd/system"
    installed.mkdir(parents=True)
    for unit in (MAIN, *JOBS, *TIMERS):
        shutil.copy(UNITS / unit, installed / unit)
    for argv in exec_starts():
        program = root / argv[0].lstrip("/")
        program.parent.mkdir(parents=True, exist_ok=True)
        program.write_text("#!/bin/sh\n")
        program.chmod(0o755)
    return root


def run(analyze: str, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([analyze, *args], capture_output=True, text=True, timeout=60, check=False)


def test_the_units_verify_as_installed(analyze: str, install_root: Path) -> None:
    done = run(analyze, "verify", f"--root={install_root}", MAIN, *JOBS, *TIMERS)
    assert (done.returncode, done.stdout + done.stderr) == (0, "")


def test_without_the_executable_verify_fails(analyze: str, install_root: Path) -> None:
    """What the check above is worth: a unit whose program is missing does not verify."""
    program = install_root / exec_starts()[0][0].lstrip("/")
    program.chmod(0o644)
    try:
        done = run(analyze, "verify", f"--root={install_root}", MAIN)
    finally:
        program.chmod(0o755)
    assert done.returncode != 0
    assert "is not executable" in done.stderr


def test_every_service_is_as_hardened_as_the_daemon(analyze: str, install_root: Path) -> None:
    exposure = {}
    for unit in (MAIN, *JOBS):
        threshold = f"--threshold={round(EXPOSURE_CEILING * 10)}"  # in tenths
        done = run(analyze, "security", "--offline=true", f"--root={install_root}", threshold, unit)
        found = re.search(rf"Overall exposure level for {re.escape(unit)}: (\d+\.\d)", done.stdout)
        assert found is not None, done.stdout + done.stderr
        exposure[unit] = float(found[1])
        assert done.returncode == 0, f"{unit}: exposure {found[1]} over {EXPOSURE_CEILING}"
    assert all(exposure[job] <= exposure[MAIN] for job in JOBS), exposure


def test_each_exec_start_is_an_llmsvc_command() -> None:
    starts = exec_starts()
    assert len(starts) >= 4  # run, backup, backup-cleanup, prune
    for argv in starts:
        assert argv[0] == "/opt/llmsvc/venv/bin/llmsvc"
        _parser().parse_args(argv[1:])  # exits 2 on a command llmsvc does not have


def test_the_units_run_as_the_user_with_the_settings_the_readme_installs() -> None:
    readme = (REPO / "README.md").read_text()
    install = readme[readme.index("### Install as a service") :]
    install = install[: install.index("\n##")].replace("\\\n", " ")  # continued lines joined
    service = directives(MAIN, "Service")
    hardening = service[service.index(("ProtectSystem", "strict")) :]  # the rest of [Service]
    for unit in (MAIN, *JOBS):
        assert values(unit, "User") == values(unit, "Group") == ["llmsvc"], unit
        assert not values(unit, "DynamicUser"), f"{unit}: the llmsvc command could not share it"
        env = dict(
            item.split("=", 1) for line in values(unit, "Environment") for item in line.split()
        )
        assert env == {"XDG_STATE_HOME": "/var/lib", "LLMSVC_CONFIG": "/etc/llmsvc/llmsvc.toml"}
        assert values(unit, "EnvironmentFile") == ["-/etc/llmsvc/llmsvc.env"]
        assert values(unit, "StateDirectory") == ["llmsvc"]
        missing = [line for line in hardening if line not in directives(unit, "Service")]
        assert not missing, f"{unit} lacks the daemon's hardening: {missing}"
    assert re.search(r"^useradd --system --user-group .* llmsvc$", install, re.M)
    assert "-m venv /opt/llmsvc/venv\n" in install
    assert "install -m 0640 -g llmsvc /dev/null /etc/llmsvc/llmsvc.toml" in install
    assert "systemd/llmsvc.env.example /etc/llmsvc/llmsvc.env" in install
    assert "XDG_STATE_HOME=/var/lib LLMSVC_CONFIG=/etc/llmsvc/llmsvc.toml" in install  # the CLI


def test_the_daemon_unit_stops_in_time_and_does_not_restart_on_bad_configuration() -> None:
    assert values(MAIN, "Type") == ["notify"]
    assert values(MAIN, "KillMode") == ["mixed"]
    assert values(MAIN, "Restart") == ["on-failure"]
    assert values(MAIN, "RestartPreventExitStatus") == ["2"]  # llmsvc's exit for bad settings
    stop = int(values(MAIN, "TimeoutStopSec")[0])
    bound = Settings.model_construct().shutdown_seconds()  # the defaults
    assert stop > bound + KILL_MARGIN_SECONDS  # a daemon's, and a supervisor's margin
    for unused in ("LogsDirectory", "Documentation"):  # logs go to the journal; no docs installed
        assert not values(MAIN, unused)


def test_the_example_env_file_sets_real_settings(monkeypatch: pytest.MonkeyPatch) -> None:
    lines = (UNITS / "llmsvc.env.example").read_text().splitlines()
    assignments = [line.lstrip("#") for line in lines if re.match(r"#?LLMSVC_\w+=", line)]
    assert assignments, "the example shows no variable"
    for assignment in assignments:
        name, value = assignment.split("=", 1)
        assert name.removeprefix("LLMSVC_").lower() in Settings.model_fields, name
        monkeypatch.setenv(name, value)
    monkeypatch.delenv("LLMSVC_CONFIG", raising=False)
    load_settings()  # every value valid, as uncommented

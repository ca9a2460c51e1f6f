"""The Grafana dashboard and Prometheus alert rules in monitoring/, against llmsvc's metrics.

Every metric an expression names must be one llmsvc exports, with the labels it
selects on, or the panel stays empty and the alert never fires. promtool checks
the rules, runs their unit tests, and checks the dashboard's PromQL.

promtool is required: missing, these tests fail and say how to get it, unless
LLMSVC_TEST_PROMTOOL=skip opts out explicitly (they are then reported as skipped).
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml
from daemon_process import REPO
from prometheus_client import generate_latest
from prometheus_client.parser import text_string_to_metric_families

from llmsvc.metrics import DaemonState, Metrics, WalStatus

RULES = REPO / "monitoring/prometheus/alerts.yml"
RULE_TESTS = REPO / "monitoring/prometheus/alerts_test.yml"
DASHBOARD = REPO / "monitoring/grafana/llmsvc.json"
OPT_OUT = "LLMSVC_TEST_PROMTOOL"
TARGET_LABELS = {"job", "instance"}  # Prometheus adds them to every series it scrapes
PROMETHEUS_OWN = {"up"}  # series Prometheus makes itself for each target
GRAFANA_VARIABLES = {"$__rate_interval": "5m", "$instance": ".*"}
NAME = re.compile(r"\b((?:llmsvc|process|python)_[a-z_]+|up)\b(?!\s*\()")
SELECTOR = re.compile(r"\b([a-z_]+)\{([^}]*)\}")
MATCHER = re.compile(r"([a-z_]+)\s*(?:=~|!~|!=|=)")
GROUPING = re.compile(r"\b(?:by|without)\s*\(([^)]*)\)")


@pytest.fixture(scope="module")
def promtool() -> str:
    if os.environ.get(OPT_OUT, "").lower() == "skip":
        pytest.skip(f"alert rule checks skipped on request ({OPT_OUT}=skip)")
    path = shutil.which("promtool")
    if path is None:
        pytest.fail(
            "promtool is not installed, so the alert rules in monitoring/prometheus/ cannot be "
            "checked: install it (Debian/Ubuntu: apt-get install prometheus; it need not run), "
            f"or set {OPT_OUT}=skip to skip these tests explicitly.",
            pytrace=False,
        )
    return path


def run(promtool: str, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [promtool, *args], capture_output=True, text=True, timeout=60, check=False
    )


def rule_expressions() -> dict[str, str]:
    groups = yaml.safe_load(RULES.read_text())["groups"]
    return {rule["alert"]: rule["expr"] for group in groups for rule in group["rules"]}


def dashboard() -> dict[str, Any]:
    return dict(json.loads(DASHBOARD.read_text()))


def panels() -> list[dict[str, Any]]:
    return [p for p in dashboard()["panels"] if p["type"] != "row"]


def dashboard_expressions() -> dict[str, str]:
    """Each target's PromQL with Grafana's variables replaced as Grafana would."""
    found = {}
    for panel in panels():
        for target in panel["targets"]:
            expr = target["expr"]
            for variable, value in GRAFANA_VARIABLES.items():
                expr = expr.replace(variable, value)
            found[f"{panel['title']} {target['refId']}"] = expr
    return found


def exported() -> dict[str, set[str]]:
    """Every sample name a daemon's registry exposes once each part has reported, with labels."""
    metrics = Metrics()
    metrics.describe_build("sqlite")
    metrics.watch(lambda: WalStatus(True, 1, 100, 1000, 4, 5))
    providers = {"mock": (True, "closed")}
    metrics.watch_daemon(lambda: DaemonState(1, 5, 500, 0, {"sanitised": 0}, 0, providers))
    # One request that completed on its second attempt.
    attempts = [("mock", "mock", "failed", "upstream_error"), ("mock", "mock", "completed", None)]
    metrics.request_done("mock", "mock", "completed", None, 3, 7, 0.5, 0.01, attempts=attempts)
    metrics.job_finished("backup", "ok", 1.0)
    metrics.batch_flushed(5, 0.01)
    metrics.wal_fsync.observe(0.001)
    metrics.loop_lag.observe(0.001)
    text = generate_latest(metrics.registry).decode()
    labels: dict[str, set[str]] = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            labels.setdefault(sample.name, set()).update(sample.labels)
    return labels


def names_and_labels(expressions: dict[str, str]) -> tuple[set[str], dict[str, set[str]]]:
    """The metric names the expressions use, and the labels each selector matches on."""
    names: set[str] = set()
    selected: dict[str, set[str]] = {}
    for expr in expressions.values():
        names |= set(NAME.findall(expr))
        for name, matchers in SELECTOR.findall(expr):
            selected.setdefault(name, set()).update(MATCHER.findall(matchers))
    return names, selected


def test_the_alert_rules_pass_promtool_and_their_unit_tests(promtool: str) -> None:
    checked = run(promtool, "check", "rules", str(RULES))
    assert checked.returncode == 0, checked.stdout + checked.stderr
    assert f"SUCCESS: {len(rule_expressions())} rules found" in checked.stdout
    tested = run(promtool, "test", "rules", str(RULE_TESTS))
    assert tested.returncode == 0, tested.stdout + tested.stderr


def test_the_dashboards_queries_are_valid_promql(promtool: str, tmp_path: Path) -> None:
    """promtool parses each query as a recording rule: a typo fails here, not in Grafana."""
    records = [
        {"record": f"llmsvc_dashboard:query_{i}", "expr": expr}
        for i, expr in enumerate(dashboard_expressions().values())
    ]
    queries = tmp_path / "queries.yml"
    queries.write_text(yaml.safe_dump({"groups": [{"name": "dashboard", "rules": records}]}))
    checked = run(promtool, "check", "rules", str(queries))
    assert checked.returncode == 0, checked.stdout + checked.stderr


def test_every_metric_and_label_the_dashboard_and_rules_use_is_exported() -> None:
    labels = exported()
    expressions = {**dashboard_expressions(), **rule_expressions()}
    names, selected = names_and_labels(expressions)
    assert {"llmsvc_requests_total", "llmsvc_job_runs_total", "process_cpu_seconds_total"} <= names
    assert names - set(labels) - PROMETHEUS_OWN == set()
    for name, matched in selected.items():
        assert matched - labels.get(name, set()) - TARGET_LABELS == set(), name
    grouped = {
        g.strip()
        for expr in expressions.values()
        for m in GROUPING.findall(expr)
        for g in m.split(",")
    }
    every_label = set().union(*labels.values()) | TARGET_LABELS
    assert grouped - {""} <= every_label
    # llmsvc's own labels never collide with the target's: Prometheus would rename them.
    assert all(not (found & TARGET_LABELS) for found in labels.values())


def test_the_dashboard_imports_anywhere_and_has_the_panels_operators_need() -> None:
    board = dashboard()
    assert board["schemaVersion"] >= 39
    assert [i["name"] for i in board["__inputs"]] == ["DS_PROMETHEUS"]
    titles = {p["title"] for p in board["panels"]}
    assert {
        "Requests/s by status",
        "Requests/s by model",
        "Requests/s by provider",
        "Time to first token",
        "Request duration",
        "Provider errors/s by provider and code",
        "Attempts/s by provider and status",
        "Attempts per request",
        "Circuit state",
        "Tokens/s",
        "WAL backlog bytes",
        "WAL backlog records",
        "Database up",
        "Flush latency",
        "Time since each job's last success",
        "Event-loop lag",
    } <= titles
    rows = [p["title"] for p in board["panels"] if p["type"] == "row"]
    assert rows == [
        "Traffic",
        "Latency",
        "Errors and providers",
        "WAL and database",
        "Jobs",
        "Processes",
    ]
    for panel in panels():
        assert panel["datasource"]["uid"] == "${DS_PROMETHEUS}", panel["title"]
        assert panel["fieldConfig"]["defaults"]["unit"], panel["title"]
        assert panel["targets"], panel["title"]
    quantiles = [e for e in dashboard_expressions().values() if "histogram_quantile" in e]
    assert any("llmsvc_time_to_first_token_seconds_bucket" in e for e in quantiles)
    assert any("llmsvc_request_duration_seconds_bucket" in e for e in quantiles)

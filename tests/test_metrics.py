"""Metric definitions: names per Prometheus conventions, values as the events happened."""

from __future__ import annotations

import asyncio
import platform
import sys
import time
import urllib.error
import urllib.request
import uuid
from pathlib import Path
from typing import Any

import openai
import pytest
from daemon_process import DaemonProcess, admin_call, daemon_env
from prometheus_client.parser import text_string_to_metric_families

from llmsvc import __version__
from llmsvc.metrics import Metrics, MetricsServer

MESSAGES: list[Any] = [{"role": "user", "content": "count"}]
ADMIN = "admin-" + uuid.uuid4().hex


def test_job_runs_are_counted_by_status_timed_and_the_last_success_kept() -> None:
    metrics = Metrics()
    value = metrics.registry.get_sample_value
    before = time.time()

    metrics.job_finished("backup", "ok", 0.5)
    metrics.job_finished("backup", "failed", 2.0)
    metrics.job_finished("prune", "skipped", 0.01)

    assert value("llmsvc_job_runs_total", {"job_name": "backup", "status": "ok"}) == 1
    assert value("llmsvc_job_runs_total", {"job_name": "backup", "status": "failed"}) == 1
    assert value("llmsvc_job_duration_seconds_count", {"job_name": "backup"}) == 2
    assert value("llmsvc_job_duration_seconds_sum", {"job_name": "backup"}) == 2.5
    last_ok = value("llmsvc_job_last_success_timestamp_seconds", {"job_name": "backup"})
    assert last_ok is not None
    assert before <= last_ok <= time.time()
    # A run that did not end ok leaves no success time behind.
    assert value("llmsvc_job_last_success_timestamp_seconds", {"job_name": "prune"}) is None


def test_wal_damage_counters_are_exported_at_zero_before_any_damage() -> None:
    metrics = Metrics()
    value = metrics.registry.get_sample_value
    for kind in ("torn_tail", "corrupt", "bad_header", "unreadable", "overlap"):
        assert value("llmsvc_wal_damage_total", {"kind": kind}) == 0
    assert value("llmsvc_wal_lost_records_total") == 0


@pytest.mark.parametrize("host", ["127.0.0.1", "localhost"])
def test_the_metrics_server_serves_the_registry_and_stop_closes_its_port(host: str) -> None:
    metrics = Metrics()
    metrics.job_finished("backup", "ok", 0.5)
    server = MetricsServer.start(metrics.registry, host, 0)
    url = f"http://{host}:{server.port}/metrics"
    with urllib.request.urlopen(url, timeout=10) as response:
        text = response.read().decode()
    assert _value(_families(text), "llmsvc_job_runs_total", job_name="backup", status="ok") == 1
    server.stop()
    with pytest.raises(urllib.error.URLError):
        urllib.request.urlopen(url, timeout=10)


def _families(text: str) -> dict[str, Any]:
    return {family.name: family for family in text_string_to_metric_families(text)}


def _value(families: dict[str, Any], sample: str, **labels: str) -> float:
    for family in families.values():
        for s in family.samples:
            if s.name == sample and all(s.labels.get(k) == v for k, v in labels.items()):
                return float(s.value)
    raise AssertionError(f"no sample {sample} {labels}")


def test_build_process_and_python_figures_are_on_the_registry() -> None:
    metrics = Metrics()
    metrics.describe_build("postgresql")
    value = metrics.registry.get_sample_value
    labels = {"version": __version__, "python": platform.python_version(), "database": "postgresql"}
    assert value("llmsvc_build_info", labels) == 1
    assert (value("process_resident_memory_bytes") or 0) > 0
    assert (value("process_open_fds") or 0) > 0
    python = {
        "implementation": platform.python_implementation(),
        "major": str(sys.version_info.major),
        "minor": str(sys.version_info.minor),
        "patchlevel": str(sys.version_info.micro),
        "version": platform.python_version(),
    }
    assert value("python_info", python) == 1


def test_a_provider_skipped_without_a_call_counts_as_that_providers_error() -> None:
    metrics = Metrics()
    value = metrics.registry.get_sample_value
    metrics.request_done(
        "a", "m", "failed", "service_unavailable", None, 0, 0.01, None,
        attempts=[("b", "m", "failed", "upstream_error")],
        skipped=[("a", "provider_disabled")],
    )  # fmt: skip
    assert (
        value("llmsvc_provider_errors_total", {"provider": "a", "code": "provider_disabled"}) == 1
    )
    assert value("llmsvc_provider_errors_total", {"provider": "b", "code": "upstream_error"}) == 1
    assert (
        value("llmsvc_attempts_total", {"provider": "a", "model": "m", "status": "failed"}) is None
    )


def test_the_daemon_exports_requests_tokens_latency_wal_and_flush_figures(
    sqlite_url: str, tmp_path: Path
) -> None:
    env = daemon_env(sqlite_url, tmp_path / "wal", metrics_port=0, admin_token=ADMIN)
    with DaemonProcess(env) as daemon:
        port = int(daemon.wait_for_log(r"boot: metrics port=(\d+)").group(1))
        with openai.OpenAI(
            base_url=f"{daemon.base_url}/v1", api_key="unused", max_retries=0
        ) as client:
            streamed = client.chat.completions.create(
                model="mock", messages=MESSAGES, max_tokens=7, stream=True
            )
            assert len([c for c in streamed if c.choices and c.choices[0].delta.content]) == 7
            whole = client.chat.completions.create(model="mock", messages=MESSAGES, max_tokens=5)
            assert whole.choices[0].message.content
            # A request refused because an operator switched its provider off is that provider's
            # error too, though no attempt was made.
            daemon.wait_caught_up()
            switched = admin_call(daemon, "POST", "/api/admin/providers/mock/disable", None, ADMIN)
            assert switched[0] == 200, switched
            with pytest.raises(openai.APIStatusError) as refused:
                client.chat.completions.create(model="mock", messages=MESSAGES, max_tokens=5)
        assert refused.value.status_code == 503
        time.sleep(0.5)  # a flush and an fsync interval
        with urllib.request.urlopen(f"{daemon.base_url}/api/metrics", timeout=5) as response:
            api = response.read().decode()
            content_type = response.headers["content-type"]
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as response:
            port_text = response.read().decode()
        assert daemon.stop() == 0, daemon.log

    assert content_type.startswith("text/plain")
    families = _families(api)
    assert set(families) == set(_families(port_text))  # the same registry on both
    mock = {"provider": "mock", "model": "mock"}
    assert _value(families, "llmsvc_requests_total", **mock, status="completed") == 2
    assert _value(families, "llmsvc_attempts_total", **mock, status="completed") == 2
    assert _value(families, "llmsvc_completion_tokens_total", **mock) == 8  # 7 + one whole
    assert _value(families, "llmsvc_request_duration_seconds_count", **mock) == 3  # + refused
    assert _value(families, "llmsvc_time_to_first_token_seconds_count", **mock) == 2
    assert _value(families, "llmsvc_wal_appended_records_total") >= 2 * 4 + 8
    assert _value(families, "llmsvc_wal_appended_bytes_total") > 0
    assert _value(families, "llmsvc_wal_fsync_duration_seconds_count") >= 1
    assert _value(families, "llmsvc_flush_records_total") >= 2 * 4 + 8
    assert _value(families, "llmsvc_flush_batch_records_count") >= 1
    assert _value(families, "llmsvc_wal_segments") >= 1
    assert _value(families, "llmsvc_inflight_requests") == 0
    assert _value(families, "llmsvc_database_errors_total", operation="flush") == 0
    assert _value(families, "llmsvc_provider_enabled", provider="mock") == 0
    assert _value(families, "llmsvc_provider_circuit_state", provider="mock") == 0
    disabled = {"provider": "mock", "code": "provider_disabled"}
    assert _value(families, "llmsvc_provider_errors_total", **disabled) == 1
    assert _value(families, "llmsvc_requests_total", **mock, status="failed") == 1
    assert _value(families, "llmsvc_event_loop_lag_seconds_count") >= 1  # probed every 0.1 s
    assert _value(families, "llmsvc_build_info", version=__version__, database="sqlite") == 1
    assert _value(families, "llmsvc_flush_duration_seconds_count") >= 1
    assert _value(families, "process_resident_memory_bytes") > 0  # the daemon's own process
    assert _value(families, "process_start_time_seconds") > 0

    for name, family in families.items():
        assert name.startswith(("llmsvc_", "process_", "python_info")), name
        if family.type == "counter":
            assert all(s.name.endswith("_total") for s in family.samples), name
        if "seconds" in name or "bytes" in name:
            assert name.endswith(("_seconds", "_bytes", "_bytes_total")), name


async def test_the_loop_probe_sees_a_blocked_loop() -> None:
    metrics = Metrics()
    probe = asyncio.create_task(metrics.watch_loop(interval=0.01))
    await asyncio.sleep(0.05)
    time.sleep(0.2)  # noqa: ASYNC251 - a callback that blocks the loop is what is measured
    await asyncio.sleep(0.05)
    probe.cancel()
    value = metrics.registry.get_sample_value
    slow = value("llmsvc_event_loop_lag_seconds_bucket", {"le": "0.1"})
    total = value("llmsvc_event_loop_lag_seconds_count")
    assert total is not None
    assert slow is not None
    assert total - slow >= 1  # one tick was at least 0.1 s late
    assert value("llmsvc_event_loop_lag_seconds_sum") >= 0.15

"""Metric definitions: names per Prometheus conventions, values as the events happened."""

from __future__ import annotations

import time

from llmsvc.metrics import WAL_DAMAGE_KINDS, Metrics


def test_job_runs_are_counted_by_status_timed_and_the_last_success_kept() -> None:
    metrics = Metrics()
    value = metrics.registry.get_sample_value
    before = time.time()

    metrics.job_finished("backup", "ok", 0.5)
    metrics.job_finished("backup", "failed", 2.0)
    metrics.job_finished("prune", "skipped", 0.01)

    assert value("llmsvc_job_runs_total", {"job": "backup", "status": "ok"}) == 1
    assert value("llmsvc_job_runs_total", {"job": "backup", "status": "failed"}) == 1
    assert value("llmsvc_job_duration_seconds_count", {"job": "backup"}) == 2
    assert value("llmsvc_job_duration_seconds_sum", {"job": "backup"}) == 2.5
    last_ok = value("llmsvc_job_last_success_timestamp_seconds", {"job": "backup"})
    assert last_ok is not None
    assert before <= last_ok <= time.time()
    # A run that did not end ok leaves no success time behind.
    assert value("llmsvc_job_last_success_timestamp_seconds", {"job": "prune"}) is None


def test_wal_damage_counters_are_exported_at_zero_before_any_damage() -> None:
    metrics = Metrics()
    value = metrics.registry.get_sample_value
    for kind in WAL_DAMAGE_KINDS:
        assert value("llmsvc_wal_damage_total", {"kind": kind}) == 0
    assert value("llmsvc_wal_lost_records_total") == 0

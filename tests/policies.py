"""The policies of parts a test builds itself: the settings' defaults, with the test's changes.

The parts have no defaults of their own (`llmsvc.config` is the only source), so
a test changes only what it is about.
"""

from __future__ import annotations

from dataclasses import replace
from typing import Any

from llmsvc.config import CircuitPolicy, FlushPolicy, RetryPolicy, Settings, WalPolicy


def retry_policy(**changes: Any) -> RetryPolicy:
    return replace(Settings().retry_policy(), **changes)


def circuit_policy(**changes: Any) -> CircuitPolicy:
    return replace(Settings().circuit_policy(), **changes)


def wal_policy(**changes: Any) -> WalPolicy:
    return replace(Settings().wal_policy(), **changes)


def flush_policy(**changes: Any) -> FlushPolicy:
    return replace(Settings().flush_policy(), **changes)

"""The policies of parts a test builds itself: the settings' defaults, with the test's changes.

The parts have no defaults of their own (`llmsvc.config` is the only source), so
a test changes only what it is about.
"""

from __future__ import annotations

from dataclasses import replace
from typing import Any

from llmsvc.config import CircuitPolicy, RetryPolicy, Settings


def retry_policy(**changes: Any) -> RetryPolicy:
    return replace(Settings().retry_policy(), **changes)


def circuit_policy(**changes: Any) -> CircuitPolicy:
    return replace(Settings().circuit_policy(), **changes)

"""One circuit breaker per provider: stop calling an upstream that keeps failing.

closed → open after `threshold` consecutive failures, or when at least half
of the last `window` calls (and `window // 2` of them at least) failed;
open → half-open once `cooldown` seconds have passed, letting one probe
through; the probe's success closes the circuit, its failure opens it again.
Every change of state is handed to `on_change`, which the daemon stores in
`provider_status`, so a restart resumes where the breaker was.
"""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field

from llmsvc.config import CircuitPolicy

CLOSED, OPEN, HALF_OPEN = "closed", "open", "half_open"

Changed = Callable[[str, "Circuit"], None]


@dataclass
class Circuit:
    state: str = CLOSED
    failures: int = 0  # consecutive
    opened_at: float = 0.0  # wall clock, so a stored circuit can resume after a restart
    last_error: str | None = None
    probing: bool = False  # a half-open probe is under way
    outcomes: deque[bool] = field(default_factory=deque)  # recent calls: True = failed


class Breakers:
    def __init__(
        self,
        policy: CircuitPolicy,
        on_change: Changed | None = None,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.threshold, self.cooldown = policy.threshold, policy.cooldown
        self.window = policy.window
        self.on_change = on_change
        self.clock = clock
        self.circuits: dict[str, Circuit] = {}

    def circuit(self, provider: str) -> Circuit:
        return self.circuits.setdefault(provider, Circuit(outcomes=deque(maxlen=self.window)))

    def restore(self, provider: str, state: str, failures: int, since: float) -> None:
        """Resume a stored circuit (at boot)."""
        circuit = self.circuit(provider)
        circuit.state, circuit.failures, circuit.opened_at = state, failures, since

    def allows(self, provider: str) -> bool:
        """Whether a call may go to `provider` now; claims the probe when half-open."""
        circuit = self.circuit(provider)
        if circuit.state == OPEN and self.clock() - circuit.opened_at >= self.cooldown:
            self._set(provider, circuit, HALF_OPEN)
        if circuit.state == HALF_OPEN:
            if circuit.probing:
                return False
            circuit.probing = True
            return True
        return circuit.state == CLOSED

    def retry_in(self, provider: str) -> float:
        """Seconds until an open circuit lets a probe through."""
        circuit = self.circuit(provider)
        return max(0.0, circuit.opened_at + self.cooldown - self.clock())

    def success(self, provider: str) -> None:
        circuit = self.circuit(provider)
        circuit.outcomes.append(False)
        circuit.failures, circuit.probing = 0, False
        if circuit.state != CLOSED:
            circuit.last_error = None
            self._set(provider, circuit, CLOSED)

    def failure(self, provider: str, error: str) -> None:
        circuit = self.circuit(provider)
        circuit.outcomes.append(True)
        circuit.failures += 1
        circuit.last_error = error
        probe_failed = circuit.state == HALF_OPEN
        circuit.probing = False
        failed = sum(circuit.outcomes)
        by_rate = len(circuit.outcomes) >= self.window // 2 and failed * 2 >= len(circuit.outcomes)
        if probe_failed or (
            circuit.state == CLOSED and (circuit.failures >= self.threshold or by_rate)
        ):
            circuit.opened_at = self.clock()
            circuit.outcomes.clear()
            self._set(provider, circuit, OPEN)

    def release(self, provider: str) -> None:
        """A call that ended neither way (the client left): free the probe."""
        self.circuit(provider).probing = False

    def _set(self, provider: str, circuit: Circuit, state: str) -> None:
        circuit.state = state
        if self.on_change is not None:
            self.on_change(provider, circuit)

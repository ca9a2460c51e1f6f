"""The circuit breaker's states and the retry policy's delays, on a clock the test moves."""

from __future__ import annotations

from policies import circuit_policy, retry_policy

from llmsvc.gateway.breaker import CLOSED, HALF_OPEN, OPEN, Breakers, Circuit


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def breakers(clock: Clock, changes: list[str]) -> Breakers:
    def changed(name: str, circuit: Circuit) -> None:
        changes.append(f"{name}:{circuit.state}")

    policy = circuit_policy(threshold=3, cooldown=10, window=10)
    return Breakers(policy, on_change=changed, clock=clock)


def test_consecutive_failures_open_then_one_probe_then_closed() -> None:
    clock, changes = Clock(), []
    b = breakers(clock, changes)
    for _ in range(2):
        assert b.allows("p")
        b.failure("p", "boom")
    assert b.circuit("p").state == CLOSED
    b.success("p")  # a success resets the count
    for _ in range(3):
        b.failure("p", "boom")
    assert b.circuit("p").state == OPEN
    assert not b.allows("p")
    assert b.retry_in("p") == 10

    clock.now += 10
    assert b.allows("p")  # the probe
    assert b.circuit("p").state == HALF_OPEN
    assert not b.allows("p")  # only one at a time
    b.success("p")
    assert b.circuit("p").state == CLOSED
    assert b.circuit("p").last_error is None
    assert changes == ["p:open", "p:half_open", "p:closed"]


def test_a_failed_probe_opens_the_circuit_again_and_a_released_probe_frees_the_slot() -> None:
    clock, changes = Clock(), []
    b = breakers(clock, changes)
    for _ in range(3):
        b.failure("p", "boom")
    clock.now += 10
    assert b.allows("p")
    b.release("p")  # the client left mid-probe: neither outcome
    assert b.allows("p")
    b.failure("p", "still down")
    assert b.circuit("p").state == OPEN
    assert b.retry_in("p") == 10
    assert b.circuit("p").last_error == "still down"


def test_a_failure_rate_over_the_window_opens_without_a_long_run_of_failures() -> None:
    changes: list[str] = []
    b = breakers(Clock(), changes)
    for n in range(6):  # alternating: never 3 in a row, but half of them failed
        assert b.allows("p")
        if n % 2:
            b.failure("p", "flaky")
        else:
            b.success("p")
    assert b.circuit("p").failures == 1
    assert changes == ["p:open"]  # 3 of the last 6 (at least half the window of 10) failed
    assert not b.allows("p")


def test_circuits_are_per_provider_and_a_restored_one_resumes() -> None:
    clock = Clock()
    b = breakers(clock, [])
    b.restore("q", OPEN, 7, since=clock.now - 4)
    assert not b.allows("q")
    assert b.retry_in("q") == 6
    assert b.allows("p")


def test_retry_delays_grow_with_jitter_honour_retry_after_and_give_up_past_the_cap() -> None:
    policy = retry_policy(retries=3, backoff=0.1, backoff_max=0.3, retry_after_max=5)
    for retry, ceiling in ((0, 0.1), (1, 0.2), (2, 0.3), (3, 0.3)):
        delay = policy.delay(retry, None)
        assert delay is not None
        assert ceiling / 2 <= delay <= ceiling
    assert policy.delay(0, 2.0) == 2.0
    assert policy.delay(0, 6.0) is None  # longer than we wait: try the next target

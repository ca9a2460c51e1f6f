"""The flush process takes only the CPU the serving process leaves, and is raised when late.

A flush's CPU in the child still made the c=1 p99 tail (BENCHMARKS.md, "Why
the flush process still made the tail"): a request's next step, woken on the
core where the child computed, waited for the scheduler's next tick (up to
4 ms at HZ=250) instead of preempting it. A SCHED_IDLE task is preempted at
once by any other, so the child yields. It cannot be starved for long,
though: the daemon's flusher raises it back to SCHED_OTHER when its answer
is late (`CLAIM_SECONDS`), and the child lowers itself again at its next
batch. Raising needs the right to lower a nice value to 0 (RLIMIT_NICE of
20, `LimitNICE=+0` in the systemd unit, or CAP_SYS_NICE): where that is
missing the child never yields, as it never could be raised.

Policies are per thread on Linux; each change here covers every thread of
the process (the driver's and the executor's threads do the flush's work
too).
"""

from __future__ import annotations

import os
import threading
from pathlib import Path

CLAIM_SECONDS = 0.25  # an answer later than this: the child is starved or the store is slow


def can_yield() -> bool:
    """Whether this process may go SCHED_IDLE and be raised back: tried on a thread of
    its own, which is the unit a policy applies to, so the rest is left as it was."""
    result: list[bool] = []

    def probe() -> None:
        try:
            os.sched_setscheduler(0, os.SCHED_IDLE, os.sched_param(0))
            os.sched_setscheduler(0, os.SCHED_OTHER, os.sched_param(0))
        except OSError:  # EPERM: no RLIMIT_NICE or CAP_SYS_NICE, or a seccomp filter
            result.append(False)
        else:
            result.append(True)

    thread = threading.Thread(target=probe, name="flush-priority-probe")
    thread.start()
    thread.join()
    return result[0]


def set_policy(pid: int, policy: int) -> None:
    """Give every thread of `pid` `policy` (SCHED_IDLE or SCHED_OTHER); a thread that
    ended meanwhile is skipped. OSError if the process is gone or it is not allowed."""
    for task in Path(f"/proc/{pid}/task").iterdir():
        try:
            os.sched_setscheduler(int(task.name), policy, os.sched_param(0))
        except ProcessLookupError:
            continue

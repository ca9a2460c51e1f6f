"""A child process that ends with the process that started it.

A daemon killed outright (SIGKILL, the OOM killer) runs no cleanup, so each of
its children asks the kernel for a signal when its parent goes (prctl's
PR_SET_PDEATHSIG, Linux): none outlives the daemon holding its output or its files.
"""

from __future__ import annotations

import ctypes
import os
import signal

PR_SET_PDEATHSIG = 1  # prctl(2)


def die_with_parent(sig: signal.Signals) -> None:
    """Have the kernel send `sig` to this process when the thread that started it exits."""
    ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, sig)


def die_with(parent: int) -> None:
    """`die_with_parent(SIGKILL)`, in a pool's child: exit now if `parent` is already gone."""
    die_with_parent(signal.SIGKILL)
    if os.getppid() != parent:
        os._exit(0)

"""One log line per rejected request, so a 400 or a 404 leaves a trace an operator can find.

The line names the request (method, path, request id, the caller's key when known), the
status and why, never the body or a header's value. Rejections cost a client almost
nothing to cause, so the lines are bounded: at most LINES_PER_SECOND a second per
process, and the next line after a flood says how many were left out (`not_logged`). A flood thus
cannot fill the disk or push the daemon's other lines out of a rate-limited journal;
`llmsvc_http_refused_total` still counts every request the HTTP layer refuses.
"""

from __future__ import annotations

import logging
import time
import uuid
from dataclasses import dataclass

from llmsvc.callers import Caller
from llmsvc.logs import logger

log = logger(__name__)

LINES_PER_SECOND = 50
MAX_FIELD = 200  # characters of a path or a reason in the line; the rest is cut


@dataclass(slots=True)
class _Budget:
    """This second's lines: the process's one budget, shared by the app and the protocol."""

    second: float = float("-inf")  # monotonic time this second began
    logged: int = 0
    left_out: int = 0  # rejections not logged since the last line that was


_budget = _Budget()


def log_rejection(
    method: str,
    path: str,
    status: int,
    code: str,
    reason: str,
    request_id: uuid.UUID,
    caller: Caller | None = None,
) -> None:
    """Log one rejected request (a 4xx or 5xx answered before any reply), within the budget."""
    now = time.monotonic()
    if now - _budget.second >= 1:
        _budget.second, _budget.logged = now, 0
    if _budget.logged >= LINES_PER_SECOND:
        _budget.left_out += 1
        return
    _budget.logged += 1
    left_out, _budget.left_out = _budget.left_out, 0
    log.log(
        logging.WARNING if status >= 500 else logging.INFO,
        "rejected",
        method=_field(method) or "-",
        path=_field(path) or "-",
        status=status,
        code=code,
        request_id=request_id,
        key=_field(caller.key_name) if caller is not None else None,
        key_id=caller.key_id if caller is not None else None,
        reason=_field(reason),
        not_logged=left_out or None,  # rejections over LINES_PER_SECOND since the last line
    )


def _field(text: str) -> str:
    """`text` cut to MAX_FIELD characters on one line: control characters are escaped, so a
    client's path cannot forge log lines."""
    cut = text[:MAX_FIELD]
    if not cut.isprintable():
        cut = repr(cut)[1:-1]
    return cut + "…" if len(text) > MAX_FIELD else cut

"""Logging: one event per line, plain text or JSON, with every configured secret masked.

The masking is a last line of defence: code already logs redacted URLs and no
keys, but an upstream's error text or a driver's message could echo one back.
"""

from __future__ import annotations

import logging
import re
import sys
from collections.abc import Iterable
from datetime import UTC, datetime

import orjson

MASK = "***"
# Credentials a message might carry even when they are not ours to know.
PATTERNS = re.compile(r"(?i)(bearer\s+)[A-Za-z0-9._~+/=-]{8,}|(://[^:/@\s]+:)[^@\s]+(@)")
CALLER_KEYS = re.compile(r"sk-llmsvc-[A-Za-z0-9_-]{8,}")  # a caller's secret (store/keys.py)


class Redact(logging.Filter):
    """Masks the given secrets, bearer tokens and URL passwords in every record's text."""

    def __init__(self, secrets: Iterable[str]) -> None:
        super().__init__()
        self.secrets = sorted({s for s in secrets if len(s) >= 4}, key=len, reverse=True)

    def filter(self, record: logging.LogRecord) -> bool:
        text = record.getMessage()
        masked = self.mask(text)
        if record.exc_info and record.exc_info[1] is not None:
            record.exc_text = self.mask(logging.Formatter().formatException(record.exc_info))
            record.exc_info = None
        if masked != text:
            record.msg, record.args = masked, None
        return True

    def mask(self, text: str) -> str:
        for secret in self.secrets:
            text = text.replace(secret, MASK)
        text = CALLER_KEYS.sub(MASK, text)
        return PATTERNS.sub(lambda m: f"{m[1]}{MASK}" if m[1] else f"{m[2]}{MASK}{m[3]}", text)


class JsonFormatter(logging.Formatter):
    """One JSON object per line: time, level, logger, message (and the traceback, if any)."""

    def __init__(self, process: str | None = None) -> None:
        super().__init__()
        self.process = process

    def format(self, record: logging.LogRecord) -> str:
        event = {
            "time": datetime.fromtimestamp(record.created, UTC).isoformat(),
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
        }
        if self.process:
            event["process"] = self.process
        if record.exc_info:
            event["exception"] = self.formatException(record.exc_info)
        elif record.exc_text:
            event["exception"] = record.exc_text
        return orjson.dumps(event).decode()


def configure(
    level: str | int, json: bool, secrets: Iterable[str], process: str | None = None
) -> None:
    """Route every logger to stderr, in the chosen format, through the redaction filter.

    `process` (`supervisor`, `worker-1`) names which of several processes sharing
    one stderr wrote a line.
    """
    handler = logging.StreamHandler(sys.stderr)
    handler.addFilter(Redact(secrets))
    if json:
        handler.setFormatter(JsonFormatter(process))
    else:
        tag = f"{process} " if process else ""
        handler.setFormatter(
            logging.Formatter(f"%(asctime)s %(levelname)s {tag}%(name)s %(message)s")
        )
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level)

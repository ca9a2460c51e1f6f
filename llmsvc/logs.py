"""Logging: one event per line, plain text or JSON, with every configured secret masked.

An event is a short text and its fields: `log.info("request", request_id=rid,
status="completed")`, on a logger from `logger(__name__)`. Plain text shows
it as `request request_id=… status=completed`; JSON gives each field a key of
its own beside `message` (the text alone), so a log pipeline filters on them
without parsing. A field must not be named like a key every line has (time,
level, logger, message, process, exception).

The masking is a last line of defence: code already logs redacted URLs and no
keys, but an upstream's error text or a driver's message could echo one back.
"""

from __future__ import annotations

import logging
import re
import sys
from collections.abc import Callable, Iterable, Mapping
from datetime import UTC, datetime
from typing import Any

import orjson

MASK = "***"
# Credentials a message might carry even when they are not ours to know: a bearer token, a
# URL's password, a caller's secret (store/keys.py); one pass over each line that could hold
# one (`_suspect`: the pass costs ~9 µs on a request's access line, the test ~0.5).
PATTERNS = re.compile(
    r"(?i)(bearer\s+)[A-Za-z0-9._~+/=-]{8,}|(://[^:/@\s]+:)[^@\s]+(@)"
    r"|(?-i:sk-llmsvc-)[A-Za-z0-9_-]{8,}"
)


class Event:
    """A log message with its fields: `text key=value …` to any handler, keys apart in JSON."""

    __slots__ = ("_line", "fields", "text")

    def __init__(self, text: str, fields: Mapping[str, object]) -> None:
        self.text = text
        self.fields = fields
        self._line: str | None = None

    def __str__(self) -> str:
        """Made once: the redaction filter and the formatter both ask for it."""
        if self._line is None:
            fields = self.fields.items()
            self._line = self.text + "".join([f" {key}={value}" for key, value in fields])
        return self._line

    def masked(self, mask: Callable[[str], str]) -> Event:
        """The text and every field that is not a number masked (numbers hold no secret)."""
        fields = {
            key: value if isinstance(value, int | float) else mask(str(value))
            for key, value in self.fields.items()
        }
        return Event(mask(self.text), fields)


class FieldLogger(logging.LoggerAdapter[logging.Logger]):
    """A logger whose keyword arguments, beyond logging's own, are the event's fields.

    A field whose value is None is left out, so an optional one needs no branch.
    """

    def log(
        self,
        level: int,
        msg: object,
        *args: object,
        exc_info: Any = None,
        stack_info: bool = False,
        stacklevel: int = 1,
        extra: Mapping[str, object] | None = None,
        **fields: object,
    ) -> None:
        if not self.logger.isEnabledFor(level):
            return
        fields = {key: value for key, value in fields.items() if value is not None}
        if fields:
            msg, args = Event(str(msg) % args if args else str(msg), fields), ()
        self.logger.log(
            level,
            msg,
            *args,
            exc_info=exc_info,
            stack_info=stack_info,
            stacklevel=stacklevel + 1,  # the caller, past this frame (logging skips its own)
            extra=extra,
        )


def logger(name: str) -> FieldLogger:
    """The module's logger: `log = logger(__name__)`."""
    return FieldLogger(logging.getLogger(name))


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
        if masked != text and isinstance(record.msg, Event):
            record.msg = record.msg.masked(self.mask)
        elif masked != text:
            record.msg, record.args = masked, None
        return True

    def mask(self, text: str) -> str:
        for secret in self.secrets:
            text = text.replace(secret, MASK)
        return PATTERNS.sub(_masked, text) if _suspect(text) else text


def _suspect(text: str) -> bool:
    """Whether `text` holds what each of PATTERNS' matches must begin with."""
    return "://" in text or "sk-llmsvc-" in text or "bearer" in text.lower()


def _masked(match: re.Match[str]) -> str:
    """A bearer token's or a URL password's match keeps what names it; a caller's secret goes."""
    if match[1]:
        return f"{match[1]}{MASK}"
    return f"{match[2]}{MASK}{match[3]}" if match[2] else MASK


class JsonFormatter(logging.Formatter):
    """One JSON object per line: time, level, logger, message, the event's fields (and the
    traceback, if any)."""

    def __init__(self, process: str | None = None) -> None:
        super().__init__()
        self.process = process

    def format(self, record: logging.LogRecord) -> str:
        msg = record.msg
        event: dict[str, object] = {
            "time": datetime.fromtimestamp(record.created, UTC).isoformat(),
            "level": record.levelname,
            "logger": record.name,
            "message": msg.text if isinstance(msg, Event) else record.getMessage(),
        }
        if self.process:
            event["process"] = self.process
        if isinstance(msg, Event):
            for key, value in msg.fields.items():
                event.setdefault(key, value)  # a field never overwrites a line's own key
        if record.exc_info:
            event["exception"] = self.formatException(record.exc_info)
        elif record.exc_text:
            event["exception"] = record.exc_text
        return orjson.dumps(event, default=str).decode()  # UUIDs, paths: as text


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
    # No line shows the caller's source line, thread or process: logging's documented
    # switches skip finding them for every record (a request's access line is one).
    logging._srcfile = None
    logging.logThreads = logging.logProcesses = logging.logMultiprocessing = False

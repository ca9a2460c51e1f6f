"""An upstream's values checked before they reach a `Reply` or a record.

Whatever an upstream sends is parsed JSON of any type; what the gateway
keeps must be what the store's columns take (token counts are int4) and what
the WAL's encoder takes, or one odd reply would stop the flusher.
"""

from __future__ import annotations

from typing import Any, TypeGuard

import orjson

from llmsvc.errors import ProviderError
from llmsvc.logs import logger
from llmsvc.wal import MAX_PAYLOAD

log = logger(__name__)

INT4_MAX = 2**31 - 1  # the store's integer columns
FINISH_REASON_MAX = 64  # characters; OpenAI's longest is 14
# OpenAI's finish reasons. A reply's `finish_reason` is always one of them, whatever the
# upstream said: an OpenAI SDK refuses any other. The upstream's own word is its `stop_reason`.
FINISH_REASONS = ("stop", "length", "tool_calls", "content_filter", "function_call")
# A whole reply's body, or one stream event: the text it carries is journaled as one
# record, and a record past the WAL's MAX_PAYLOAD would read back as damage.
UPSTREAM_MAX_BYTES = MAX_PAYLOAD // 2


class TooLarge(Exception):
    """An upstream reply or event is over UPSTREAM_MAX_BYTES; the adapter names the upstream."""


def obj(value: Any) -> dict[str, Any]:
    """A JSON object where one is expected; anything else reads as empty."""
    return value if isinstance(value, dict) else {}


def items(value: Any) -> list[Any]:
    """A JSON array where one is expected; anything else reads as empty."""
    return value if isinstance(value, list) else []


def in_int4(value: Any) -> TypeGuard[int]:
    """A non-negative int the store's integer columns hold (a bool is not an int here)."""
    return type(value) is int and 0 <= value <= INT4_MAX


def count(provider: str, field: str, value: Any) -> int | None:
    """A token count as the store holds it; anything else is None, with a warning."""
    if in_int4(value):
        return value
    if value is not None:
        _dropped(provider, field, value)
    return None


def short_text(provider: str, field: str, value: Any) -> str | None:
    """A short label such as a finish reason; anything else is None, with a warning."""
    if isinstance(value, str) and len(value) <= FINISH_REASON_MAX:
        return value
    if value is not None:
        _dropped(provider, field, value)
    return None


def arguments(provider: str, value: Any) -> str:
    """A tool call's arguments as text: a string as sent, None as "", anything else as JSON."""
    if value is None:
        return ""
    if isinstance(value, str):
        return value
    try:
        encoded = orjson.dumps(value)
    except orjson.JSONEncodeError:  # nested deeper than the encoder goes
        raise ProviderError(
            f"{provider}: the upstream sent tool-call arguments that cannot be encoded",
            code="upstream_malformed",
        ) from None
    if len(encoded) > UPSTREAM_MAX_BYTES:  # numbers can grow when written back ("1e9")
        raise ProviderError(
            f"{provider}: the upstream sent tool-call arguments over {UPSTREAM_MAX_BYTES} bytes",
            code="upstream_too_large",
        )
    return encoded.decode()


def tool_delta(
    provider: str, position: int, index: Any, call_id: Any, name: Any, args: Any
) -> dict[str, Any]:
    """A flat tool-call delta (`index`, `id`, `name`, `arguments`), each of its type.

    An index that is not a usable int becomes the call's position in its list; an id
    or name that is not a string, None.
    """
    return {
        "index": index if in_int4(index) else position,
        "id": call_id if isinstance(call_id, str) else None,
        "name": name if isinstance(name, str) else None,
        "arguments": arguments(provider, args),
    }


def error_text(value: Any, limit: int) -> str | None:
    """An upstream's error message or code as text (a string or a number), cut to `limit`."""
    if isinstance(value, str | int | float) and not isinstance(value, bool):
        return str(value)[:limit]
    return None


def _dropped(provider: str, field: str, value: Any) -> None:
    """One warning naming what was dropped; a long value is described, never logged."""
    if isinstance(value, str | list | dict):
        seen = f"{type(value).__name__} of length {len(value)}"
    else:
        seen = repr(value)  # a number, a bool: short
    log.warning("upstream value dropped", provider=provider, field=field, value=seen)

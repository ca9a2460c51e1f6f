"""Reading and validating a client's chat-completion request."""

from __future__ import annotations

import re
import uuid
from collections.abc import MutableMapping
from typing import Annotated, Any, Literal, TypeVar

import orjson
from pydantic import (
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    StringConstraints,
    ValidationError,
    field_validator,
)

from llmsvc.errors import BodyTooLarge, ClientError
from llmsvc.gateway.ids import new_id
from llmsvc.gateway.sse import ASGIReceive

Body = TypeVar("Body", bound=BaseModel)

# Levels of JSON nesting a request body may have: deep JSON schemas in `tools` need ~30;
# the WAL's JSON encoder takes 254, and the body sits one level down in its start record.
MAX_DEPTH = 64
_NOT_BRACKETS = bytes(range(256)).translate(None, b"[]{}")
_PAIRS = bytes.maketrans(b"[]{}", b"()()")

REQUEST_ID = "llmsvc.request_id"  # the scope key of the request's id (`request_id`)
CALLER = "llmsvc.caller"  # the scope key of an authenticated request's `Caller`
# The scope key of a `router.Target` the request must go to instead of its model's route. Only
# the console's replay sets it, in the scope it builds in process: no HTTP client can.
PINNED = "llmsvc.target"
# An X-Correlation-ID is stored and searched as sent: visible ASCII, at most this long. Every
# trace id format in use fits (a UUID is 36, a W3C traceparent 55, AWS's X-Amzn-Trace-Id ~80);
# no spaces, so it stays one field in a log line and a table.
CORRELATION_MAX = 128  # llm_requests.correlation_id is as wide
VISIBLE_ASCII = bytes(range(0x21, 0x7F))
# W3C Trace Context: version (not ff), trace id and parent id (neither all zeros), flags.
TRACEPARENT = re.compile(
    rb"(?!ff)[0-9a-f]{2}-(?!0{32})([0-9a-f]{32})-(?!0{16})[0-9a-f]{16}-[0-9a-f]{2}"
)


# A client's metadata, bounded as OpenAI bounds its own `metadata` field: 16 pairs, keys
# of at most 64 characters, string values of at most 512.
METADATA_KEYS = 16
Metadata = Annotated[
    dict[
        Annotated[str, StringConstraints(max_length=64)],
        Annotated[str, StringConstraints(max_length=512)],
    ],
    Field(max_length=METADATA_KEYS),
]


def _integral(value: Any) -> Any:
    """An integral float (3.0) as the int it is, as OpenAI takes it; 3.5 stays a float and
    is refused by the strict int check that follows, naming the field."""
    if type(value) is float and value.is_integer():
        return int(value)
    return value


Integer = Annotated[int, BeforeValidator(_integral)]
# The integer fields whose integral floats are forwarded as ints (an upstream may not take 3.0).
INTEGER_FIELDS = ("max_tokens", "max_completion_tokens", "n", "seed", "top_logprobs")


class ClientGone(Exception):
    """The client closed the connection; nothing more can be sent to it."""


class Message(BaseModel):
    model_config = ConfigDict(extra="allow", strict=True)

    role: Literal["system", "developer", "user", "assistant", "tool", "function"]
    content: Any = None

    @field_validator("content")
    @classmethod
    def _content(cls, value: Any) -> Any:
        """One check, so an error names `content`, not a member of a union."""
        if value is None or isinstance(value, str):
            return value
        if isinstance(value, list) and all(isinstance(part, dict) for part in value):
            return value
        raise ValueError("must be a string, a list of content parts, or null")


class StreamOptions(BaseModel):
    model_config = ConfigDict(extra="allow", strict=True)

    include_usage: bool = False


class ChatRequest(BaseModel):
    """The fields llmsvc relies on; anything else is passed to the provider as sent."""

    model_config = ConfigDict(extra="allow", strict=True)

    model: str = Field(min_length=1, max_length=200)
    messages: list[Message] = Field(min_length=1)
    stream: bool = False
    stream_options: StreamOptions | None = None
    max_tokens: Integer | None = Field(default=None, ge=1, le=1_000_000)
    max_completion_tokens: Integer | None = Field(default=None, ge=1, le=1_000_000)
    temperature: float | None = Field(default=None, ge=0, le=2)
    n: Integer | None = None  # one choice per request: see _one_choice
    seed: Integer | None = Field(default=None, ge=-(2**63), le=2**63 - 1)  # int64, as OpenAI's
    top_logprobs: Integer | None = Field(default=None, ge=0, le=20)
    mock_delay_ms: float | None = Field(default=None, ge=0, le=60_000)
    # Attribution (gateway/attribution.py): `user` and `metadata` are OpenAI's own fields and
    # go to the provider as sent; `session_id` is llmsvc's and does not.
    user: str | None = Field(default=None, max_length=256)
    metadata: Metadata | None = None
    session_id: str | None = Field(default=None, max_length=200)

    @field_validator("n")
    @classmethod
    def _one_choice(cls, value: int | None) -> int | None:
        """A reply is journaled and stored as one choice (token rows have no choice index), and
        an upstream's n > 1 stream would interleave its choices into that one: refused."""
        if value is None or value == 1:
            return value
        raise ValueError(
            "llmsvc returns one choice per request (it stores exactly what a client received, "
            "one reply per request); leave n out or 1, and send n requests for n choices"
        )


async def read_body(receive: ASGIReceive, headers: dict[bytes, bytes], limit: int) -> bytes:
    """The whole request body, refusing more than `limit` bytes before reading them all."""
    declared = headers.get(b"content-length")
    if declared is not None and declared.isdigit() and int(declared) > limit:
        raise BodyTooLarge(f"the request body is {int(declared)} bytes; the limit is {limit}")
    body = bytearray()
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            raise ClientGone
        body += message.get("body", b"")
        if len(body) > limit:
            raise BodyTooLarge(f"the request body is over the limit of {limit} bytes")
        if not message.get("more_body"):
            return bytes(body)


def parse_chat(body: bytes) -> tuple[dict[str, Any], ChatRequest]:
    """The body as a dict (to forward) and validated (to rely on); ClientError names the field.

    Integral floats of integer fields are forwarded as the ints they were validated as."""
    data, request = parse_body(body, ChatRequest)
    for name in INTEGER_FIELDS:
        if data.get(name) is not None:
            data[name] = getattr(request, name)
    return data, request


def parse_body(body: bytes, model: type[Body]) -> tuple[dict[str, Any], Body]:
    """A JSON object validated by `model`; ClientError names the first field that is wrong."""
    try:
        data = orjson.loads(body)
    except orjson.JSONDecodeError as exc:
        raise ClientError(f"the request body is not valid JSON: {not_json(body, exc)}") from None
    if too_deep(body, MAX_DEPTH):
        raise ClientError(f"the request body nests JSON deeper than {MAX_DEPTH} levels")
    if not isinstance(data, dict):
        raise ClientError("the request body must be a JSON object")
    try:
        return data, model.model_validate(data)
    except ValidationError as exc:
        err = exc.errors()[0]
        where = ".".join(str(part) for part in err["loc"])
        more = f" (and {exc.error_count() - 1} more problems)" if exc.error_count() > 1 else ""
        raise ClientError(f"{where}: {err['msg']}{more}", param=where) from None


def not_json(body: bytes, exc: orjson.JSONDecodeError) -> str:
    """Why orjson refused a body. For bytes that are not UTF-8 it says "surrogates not
    allowed" at char 0 whatever they are; the first such byte and its offset say which."""
    try:
        body.decode()
    except UnicodeDecodeError as bad:
        return f"it is not UTF-8 (byte 0x{body[bad.start]:02x} at offset {bad.start})"
    return str(exc)


def too_deep(body: bytes, limit: int) -> bool:
    """Whether valid JSON nests arrays and objects more than `limit` deep, read from its bytes.

    A request too deep to journal must be refused before its first record. Reading the
    bytes costs a few ms on a 4 MiB body where walking the parsed value can cost more
    than parsing it: escapes and strings are cut out, the brackets kept, innermost
    pairs peeled off while that halves them, and what is left counted.
    """
    if body.count(b"[") + body.count(b"{") <= limit:
        return False
    if b"\\" in body:
        body = body.replace(b"\\\\", b"").replace(b'\\"', b"")
    brackets = b"".join(body.split(b'"')[::2]).translate(_PAIRS, _NOT_BRACKETS)
    while brackets and limit:
        peeled = brackets.replace(b"()", b"")  # every innermost pair: one level less
        limit -= 1
        halved = len(peeled) * 2 <= len(brackets)
        brackets = peeled
        if not halved:
            break
    depth = 0
    for byte in brackets:
        depth += 1 if byte == 40 else -1  # "(" or ")"
        if depth > limit:
            return True
    return False


def request_id(scope: MutableMapping[str, Any]) -> uuid.UUID:
    """The request's id, made at its first use and kept in its scope: every response carries
    it as X-Request-ID, errors included, and its log lines name it."""
    made: uuid.UUID | None = scope.get(REQUEST_ID)
    if made is None:
        made = scope[REQUEST_ID] = new_id()
    return made


def request_id_header(scope: MutableMapping[str, Any]) -> tuple[bytes, bytes]:
    """The X-Request-ID header of the request's answer, whatever its status."""
    return (b"x-request-id", str(request_id(scope)).encode())


def correlation_id(headers: dict[bytes, bytes]) -> str:
    """The client's X-Correlation-ID as sent; else its W3C `traceparent`'s trace id, which ties
    the request to the caller's trace as one would; else a new UUID.

    Any id an application already uses (`req_…`, decimal trace ids, a whole `traceparent`) is
    taken: visible ASCII, 1 to CORRELATION_MAX characters. A space, a control or non-ASCII
    byte, or a longer value is refused rather than cut or altered: it is stored and searched
    as sent.
    """
    raw = headers.get(b"x-correlation-id")
    if raw is None:
        return trace_id(headers.get(b"traceparent")) or str(new_id())
    if not 0 < len(raw) <= CORRELATION_MAX:
        problem = f"is {len(raw)} bytes long"
    elif raw.translate(None, VISIBLE_ASCII):
        problem = "holds a space, a control or a non-ASCII character"
    else:
        return raw.decode("ascii")
    raise ClientError(
        f"the X-Correlation-ID header {problem}: it must be 1 to {CORRELATION_MAX} visible "
        "ASCII characters (letters, digits, punctuation; no spaces)"
    )


def trace_id(traceparent: bytes | None) -> str | None:
    """The trace id of a valid W3C `traceparent` (version-traceid-parentid-flags), else None:
    an invalid one is ignored, as the W3C Trace Context asks."""
    if traceparent is None:
        return None
    match = TRACEPARENT.match(traceparent)
    if match is None:
        return None
    version, rest = traceparent[:2], traceparent[match.end() :]
    if rest and (version == b"00" or not rest.startswith(b"-")):
        return None  # version 00 has exactly four fields; a later one may add more after a dash
    return match[1].decode()

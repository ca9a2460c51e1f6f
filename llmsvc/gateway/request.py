"""Reading and validating a client's chat-completion request."""

from __future__ import annotations

import uuid
from typing import Annotated, Any, Literal, TypeVar

import orjson
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    StringConstraints,
    ValidationError,
    field_validator,
)

from llmsvc.errors import BodyTooLarge, ClientError
from llmsvc.gateway.sse import ASGIReceive

Body = TypeVar("Body", bound=BaseModel)

# Levels of JSON nesting a request body may have: deep JSON schemas in `tools` need ~30;
# the WAL's JSON encoder takes 254, and the body sits one level down in its start record.
MAX_DEPTH = 64
_NOT_BRACKETS = bytes(range(256)).translate(None, b"[]{}")
_PAIRS = bytes.maketrans(b"[]{}", b"()()")


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
    max_tokens: int | None = Field(default=None, ge=1, le=1_000_000)
    max_completion_tokens: int | None = Field(default=None, ge=1, le=1_000_000)
    temperature: float | None = Field(default=None, ge=0, le=2)
    n: int | None = None  # one choice per request: see _one_choice
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
    """The body as a dict (to forward) and validated (to rely on); ClientError names the field."""
    return parse_body(body, ChatRequest)


def parse_body(body: bytes, model: type[Body]) -> tuple[dict[str, Any], Body]:
    """A JSON object validated by `model`; ClientError names the first field that is wrong."""
    try:
        data = orjson.loads(body)
    except orjson.JSONDecodeError as exc:
        raise ClientError(f"the request body is not valid JSON: {exc}") from None
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


def correlation_id(headers: dict[bytes, bytes]) -> uuid.UUID:
    raw = headers.get(b"x-correlation-id")
    if raw is None:
        return uuid.uuid4()
    try:
        return uuid.UUID(raw.decode("ascii"))
    except ValueError:
        raise ClientError("the X-Correlation-ID header must be a UUID") from None

"""`POST /v1/embeddings`: the request as OpenAI takes it, and its wire.

An embeddings request is served by the same exchange as a chat completion
(routing, retries, the breaker, keys, limits, the journal), with the body sent
natively to a provider that embeds and never streamed. Its reply is the
vectors as one JSON text (providers/embeddings.py), which this wire renders as
OpenAI's `CreateEmbeddingResponse`: floats, or base64 of little-endian float32
bytes (what OpenAI's SDK asks for by default and decodes).
"""

from __future__ import annotations

import base64
import sys
from array import array
from typing import Any, Literal, NoReturn

import orjson
from pydantic import BaseModel, ConfigDict, Field, field_validator

from llmsvc.gateway.request import Integer, Metadata, parse_body
from llmsvc.gateway.wire import Usage

MAX_INPUTS = 2048  # inputs per request, as OpenAI allows
MAX_DIMENSIONS = 65_536


class EmbeddingsRequest(BaseModel):
    """The fields llmsvc relies on; anything else goes to the provider as sent."""

    model_config = ConfigDict(extra="allow", strict=True)

    model: str = Field(min_length=1, max_length=200)
    input: Any
    dimensions: Integer | None = Field(default=None, ge=1, le=MAX_DIMENSIONS)
    encoding_format: Literal["float", "base64"] = "float"
    stream: bool = False
    # Attribution (gateway/attribution.py), as on a chat completion.
    user: str | None = Field(default=None, max_length=256)
    metadata: Metadata | None = None
    session_id: str | None = Field(default=None, max_length=200)

    @field_validator("input")
    @classmethod
    def _input(cls, value: Any) -> Any:
        """One check, so an error names `input`, not a member of a union."""
        if isinstance(value, str):
            if not value:
                raise ValueError("must not be an empty string")
            return value
        if not isinstance(value, list) or not value:
            raise ValueError(
                "must be a string, or a non-empty array of strings, of token ids, "
                "or of arrays of token ids"
            )
        if len(value) > MAX_INPUTS:
            raise ValueError(f"holds {len(value)} inputs; at most {MAX_INPUTS} are allowed")
        if all(isinstance(v, str) and v for v in value):
            return value
        if all(_token(v) for v in value) or all(
            isinstance(v, list) and v and all(_token(t) for t in v) for v in value
        ):
            return value
        raise ValueError(
            "an array must hold only non-empty strings, only token ids (integers >= 0), "
            "or only non-empty arrays of token ids"
        )

    @field_validator("stream")
    @classmethod
    def _not_streamed(cls, value: bool) -> bool:
        if value:
            raise ValueError("embeddings are not streamed; leave stream out or false")
        return value


def _token(value: Any) -> bool:
    return type(value) is int and value >= 0


def parse_embeddings(body: bytes) -> tuple[dict[str, Any], EmbeddingsRequest]:
    """The body as a dict (sent to the provider) and validated; ClientError names the field.

    An integral float `dimensions` is sent as the int it was validated as. `stream` (false)
    and `metadata` (llmsvc's attribution here) are taken out: OpenAI's embeddings take
    neither."""
    data, request = parse_body(body, EmbeddingsRequest)
    data.pop("stream", None)
    data.pop("metadata", None)
    if request.dimensions is not None:
        data["dimensions"] = request.dimensions
    return data, request


class EmbeddingsWire:
    """The whole `CreateEmbeddingResponse` of one request; there are no stream frames."""

    def __init__(self, model: str, encoding_format: str) -> None:
        self.model = model
        self.base64 = encoding_format == "base64"

    def whole(
        self,
        content: str,
        finish_reason: str,
        usage: Usage,
        tool_calls: list[dict[str, Any]],
        refusal: str | None,
    ) -> bytes:
        vectors: list[list[float]] = orjson.loads(content)
        encode = base64_floats if self.base64 else None
        data = [
            {"object": "embedding", "index": i, "embedding": encode(v) if encode else v}
            for i, v in enumerate(vectors)
        ]
        prompt = usage.prompt_tokens or 0
        used = {"prompt_tokens": prompt, "total_tokens": prompt}
        return orjson.dumps({"object": "list", "data": data, "model": self.model, "usage": used})

    def failure(self, error: dict[str, Any]) -> bytes:
        """Nothing: a whole reply begun is a whole reply sent."""
        return b""

    def opening(self, prompt_tokens: int | None) -> NoReturn:
        _never_streamed()

    def tokens(self, texts: list[str]) -> NoReturn:
        _never_streamed()

    def tool_calls(self, deltas: list[dict[str, Any]]) -> NoReturn:
        _never_streamed()

    def refusal(self, texts: list[str]) -> NoReturn:
        _never_streamed()

    def closing(self, finish_reason: str, usage: Usage) -> NoReturn:
        _never_streamed()


def _never_streamed() -> NoReturn:
    raise AssertionError("an embeddings request is never streamed (EmbeddingsRequest refuses it)")


def base64_floats(vector: list[float]) -> str:
    """A vector as OpenAI's base64: its values as little-endian float32 bytes."""
    values = array("f", vector)
    if sys.byteorder == "big":
        values.byteswap()
    return base64.b64encode(values.tobytes()).decode()

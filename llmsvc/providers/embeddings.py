"""Embeddings replies: vectors as the reply's one text, a JSON array of arrays of floats.

Vectors take the one path every reply takes (gateway/chat.py's `Exchange`), so
the `Reply` protocol needs nothing new: a provider yields them as one text
batch, as a whole chat reply yields its content. The exchange journals that
text as the reply's token record only when the `store_embeddings` setting
asks (vectors are data, often large, not a reply anyone reads back), and the
embeddings wire renders it as floats or base64. A stored embeddings reply
thus reads back as the JSON text its client's vectors were made from.
"""

from __future__ import annotations

from typing import Any, cast

import orjson

from llmsvc.errors import ProviderError
from llmsvc.providers.fields import count, items, obj
from llmsvc.providers.http import HttpReply
from llmsvc.providers.upstream_http import Response

EMBEDDINGS = "embeddings"  # the `Native.api` of an embeddings request
FLOAT32_MAX = 3.4028234663852886e38  # a value past it has no base64 (float32) form
# Characters of one value in a reply's text at most (`-1.2345678901234567e-38,`): what bounds
# the values a reply may have, its text being journaled as one record.
VALUE_CHARS = 25


def inputs(value: Any) -> list[Any]:
    """The client's `input` as a list of inputs: one string or token list, or a list of them."""
    if isinstance(value, str) or (value and isinstance(value[0], int)):
        return [value]
    return list(value)


def vectors_text(vectors: list[list[float]]) -> str:
    """Vectors as the reply's text (see the module docstring)."""
    return orjson.dumps(vectors).decode()


class OpenAIEmbeddingsReply(HttpReply):
    """An OpenAI-compatible upstream's whole `/embeddings` body (never a stream)."""

    def __init__(self, name: str, response: Response, expected: int) -> None:
        super().__init__(name, response, False)
        self.expected = expected  # inputs sent: one vector each comes back
        self.completion_tokens = 0  # embeddings complete nothing: the request costs its input

    def _whole(self, body: dict[str, Any]) -> str:
        self.prompt_tokens = count(
            self.name, "prompt_tokens", obj(body.get("usage")).get("prompt_tokens")
        )
        vectors: list[list[float] | None] = [None] * self.expected
        for item in items(body.get("data")):
            item = obj(item)
            index, vector = item.get("index"), item.get("embedding")
            if type(index) is not int or not 0 <= index < self.expected or vectors[index]:
                raise self._malformed(f"an embedding's index {index!r} is out of range or repeated")
            if not isinstance(vector, list) or not vector or not all(number(x) for x in vector):
                raise self._malformed("an embedding is not a non-empty array of float32 numbers")
            vectors[index] = vector
        if not all(vectors):
            raise self._malformed(f"{self.expected} inputs were sent but not as many embeddings")
        return vectors_text(cast(list[list[float]], vectors))

    def _malformed(self, what: str) -> ProviderError:
        return ProviderError(
            f"{self.name}: the upstream's embeddings: {what}", code="upstream_malformed"
        )


def number(value: Any) -> bool:
    """A JSON number a float32 holds (base64 is float32), not a bool (Python's int)."""
    return (type(value) is float or type(value) is int) and -FLOAT32_MAX <= value <= FLOAT32_MAX

"""Token counts llmsvc makes itself when the provider reported none.

An interrupted, cancelled or failed stream, or an upstream that sends no
usage, still cost tokens; spend and budgets need a number. Completion tokens
are counted from the reply's text with the model's tokenizer (`bpe-openai`,
which ships OpenAI's vocabularies, so nothing is downloaded) where one fits
the model, else one per delta; prompt tokens from the messages, the way
OpenAI's own counting recipe does, with the model's tokenizer or else, as an
estimate, OpenAI's newest vocabulary (a budget must not read an unknown
prompt as free). Each number carries how it was obtained: `provider`,
`tokenizer`, `estimate` or `deltas`.
"""

from __future__ import annotations

import functools
import importlib
import warnings
from collections.abc import Iterable
from types import ModuleType
from typing import Any

PROVIDER, TOKENIZER, ESTIMATE, DELTAS = "provider", "tokenizer", "estimate", "deltas"
ESTIMATE_ENCODING = "o200k_base"  # for a prompt to a model no vocabulary here is known for

# OpenAI's recipe for chat prompts: each message costs 3 tokens of framing, a `name` one
# more, and the reply is primed with 3.
PER_MESSAGE, PER_NAME, REPLY_PRIMING = 3, 1, 3


@functools.cache
def _bpe() -> ModuleType:
    """The tokenizer library, imported at first need: its import loads a vocabulary (~65 ms),
    which a daemon whose providers always report usage never pays. Its use of a deprecated
    importlib call is its own."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        return importlib.import_module("bpe_openai")


@functools.cache
def encoding_for(model: str) -> Any:
    """The model's encoding: its own name, else the longest known name it extends with `-`
    (`gpt-4o-mini-2024-07-18` is `gpt-4o-mini`'s), else None. Loaded once per encoding."""
    bpe = _bpe()
    known = sorted(bpe.list_supported_models(), key=len, reverse=True)
    for name in (model, *(k for k in known if model.startswith(k + "-"))):
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", DeprecationWarning)
                return bpe.get_encoding(bpe.encoding_name_for_model(name))
        except (KeyError, bpe.UnsupportedModelError):
            continue
    return None


def count_completion(model: str, pieces: Iterable[list[str]], deltas: int) -> tuple[int, str]:
    """Tokens of a reply's text pieces (as journaled, in order), and how they were counted."""
    encoding = encoding_for(model)
    if encoding is None:
        return deltas, DELTAS
    return len(encoding.encode_ordinary("".join(t for texts in pieces for t in texts))), TOKENIZER


def count_prompt(model: str, messages: list[Any]) -> tuple[int, str]:
    """Tokens of the messages as OpenAI frames them, and how they were counted."""
    encoding, source = encoding_for(model), TOKENIZER
    if encoding is None:
        encoding, source = _estimate_encoding(), ESTIMATE
    count = REPLY_PRIMING
    for message in messages:
        count += PER_MESSAGE
        if not isinstance(message, dict):
            continue
        for key, value in message.items():
            text = _text(value)
            count += len(encoding.encode_ordinary(text))
            if key == "name":
                count += PER_NAME
    return count, source


def count_input(model: str, inputs: list[str | list[int]]) -> tuple[int, str]:
    """Tokens of an embeddings request's inputs (texts encoded, token lists as long as they
    are), and how they were counted."""
    encoding, source = encoding_for(model), TOKENIZER
    if encoding is None:
        encoding, source = _estimate_encoding(), ESTIMATE
    return sum(
        len(encoding.encode_ordinary(i)) if isinstance(i, str) else len(i) for i in inputs
    ), source


@functools.cache
def _estimate_encoding() -> Any:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        return _bpe().get_encoding(ESTIMATE_ENCODING)


def _text(value: Any) -> str:
    """The text a message field holds: a string, content parts' text, or tool calls' JSON."""
    if isinstance(value, str):
        return value
    if isinstance(value, list):
        return "".join(
            _text(part.get("text") or part.get("function"))
            for part in value
            if isinstance(part, dict)
        )
    if isinstance(value, dict):
        return "".join(_text(v) for v in value.values())
    return ""

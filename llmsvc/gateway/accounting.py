"""What a request used: the provider's usage where it sent one, else counted here.

Counted once, at the request's end, from the pieces its attempt journaled,
never per token. A request that received nothing and has no usage is left
uncounted: nothing is known billed.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

from llmsvc.gateway.wire import Usage
from llmsvc.providers.base import Native, Reply
from llmsvc.providers.embeddings import EMBEDDINGS, inputs
from llmsvc.tokens import PROVIDER, count_completion, count_input, count_prompt

SURROGATES = "surrogatepass"  # a lone surrogate in a text is kept as it came, not refused

PromptCounter = Callable[[str], tuple[int, str]]  # model -> (tokens, how they were counted)


class Pieces:
    """An attempt's journaled texts, in order: what is counted at its end if the provider
    sends no usage.

    A stream holds them for minutes, a token at a time, so they are kept as one UTF-8
    buffer: a reply costs about its characters, not a str and a list slot per token
    (~60 bytes each, 1 KiB of a paced stream's 18 in BENCHMARKS.md). The last batch's
    length is kept: the WAL may yet refuse it (`drop_last`).
    """

    __slots__ = ("_last", "_text")

    def __init__(self) -> None:
        self._text = bytearray()
        self._last = 0  # bytes of the last batch added

    def add(self, texts: list[str]) -> None:
        """Keep a batch's texts (a batch of tokens, or of tool-call texts)."""
        self._last = 0
        self.join_last(texts)

    def join_last(self, texts: list[str]) -> None:
        """Keep texts as part of the last batch: journaled into its WAL write, refused with it."""
        piece = (texts[0] if len(texts) == 1 else "".join(texts)).encode(errors=SURROGATES)
        self._text += piece
        self._last += len(piece)

    def drop_last(self) -> None:
        """Forget the last batch added (the WAL refused it); once, after that batch."""
        if self._last:
            del self._text[-self._last :]
        self._last = 0

    def __bool__(self) -> bool:
        return bool(self._text)

    def __iter__(self) -> Iterator[list[str]]:
        """The text as one list of one text: what tokens.count_completion joins."""
        yield [self._text.decode(errors=SURROGATES)]


@dataclass(slots=True)
class Counts:
    """A request's tokens and where each figure came from (provider, tokenizer or deltas)."""

    prompt: int | None = None
    completion: int | None = None
    prompt_source: str | None = None
    completion_source: str | None = None

    def usage(self) -> Usage:
        """What the client's `usage` says: the counts, and how llmsvc got any it counted."""
        sources = {"prompt_tokens": self.prompt_source, "completion_tokens": self.completion_source}
        counted = {k: v for k, v in sources.items() if v is not None and v != PROVIDER}
        return Usage(self.prompt, self.completion, counted or None)


def count(
    reply: Reply | None,
    pieces: Pieces,
    deltas: int,
    model: str,
    count_prompt_of: PromptCounter,
) -> Counts:
    """The counts of an attempt that journaled `pieces` (`deltas` of them, tool calls too)."""
    if reply is None and not pieces:
        return Counts()
    prompt = reply.prompt_tokens if reply else None
    completion = reply.completion_tokens if reply else None
    counts = Counts(
        prompt,
        completion,
        PROVIDER if prompt is not None else None,
        PROVIDER if completion is not None else None,
    )
    if completion is None:
        counts.completion, counts.completion_source = count_completion(model, pieces, deltas)
    if prompt is None:
        counts.prompt, counts.prompt_source = count_prompt_of(model)
    return counts


def prompt_counter(data: dict[str, Any], native: Native | None) -> PromptCounter:
    """How a request's prompt is counted here: its messages, or the input of an embeddings
    request, which has no messages."""
    if native is not None and native.api == EMBEDDINGS:
        given = inputs(native.body["input"])
        return lambda model: count_input(model, given)
    messages = data["messages"]
    return lambda model: count_prompt(model, messages)


def tool_texts(deltas: list[dict[str, Any]]) -> list[str]:
    """The text of tool-call deltas that a tokenizer counts: names and arguments."""
    return [(d.get("name") or "") + (d.get("arguments") or "") for d in deltas]

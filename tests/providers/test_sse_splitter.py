"""SseSplitter: the same payloads however the upstream's bytes are cut into reads."""

from __future__ import annotations

import itertools
import random

import pytest

from llmsvc.providers.fields import TooLarge
from llmsvc.providers.sse import SseSplitter

STREAM = (
    b": keep-alive comment\n\n"
    b'data: {"n":1}\n\n'
    b"event: message\n"
    b'data: {"n":2}\n\n'
    b"id: 7\n"
    b"retry: 1000\n"
    b"data: first line\n"
    b"data:second line\n"
    b"data:  two spaces kept after the first\n\n"
    b'data: {"text":"caf\xc3\xa9 \xe2\x82\xac"}\n\n'
    b"data: [DONE]\n\n"
)
PAYLOADS = [
    b'{"n":1}',
    b'{"n":2}',
    b"first line\nsecond line\n two spaces kept after the first",
    b'{"text":"caf\xc3\xa9 \xe2\x82\xac"}',
    b"[DONE]",
]


def _feed(splitter: SseSplitter, chunks: list[bytes]) -> list[bytes]:
    payloads: list[bytes] = []
    for chunk in chunks:
        payloads += splitter.feed(chunk)
    return payloads


def _cut(data: bytes, cuts: list[int]) -> list[bytes]:
    edges = [0, *sorted(cuts), len(data)]
    return [data[a:b] for a, b in itertools.pairwise(edges)]


def test_whole_stream_in_one_read() -> None:
    assert SseSplitter().feed(STREAM) == PAYLOADS


def test_byte_by_byte_gives_the_same_payloads() -> None:
    assert _feed(SseSplitter(), [STREAM[i : i + 1] for i in range(len(STREAM))]) == PAYLOADS


def test_crlf_byte_by_byte_gives_the_same_payloads() -> None:
    crlf = STREAM.replace(b"\n", b"\r\n")
    assert _feed(SseSplitter(), [crlf[i : i + 1] for i in range(len(crlf))]) == PAYLOADS


@pytest.mark.parametrize("line_end", [b"\n", b"\r\n"], ids=["lf", "crlf"])
@pytest.mark.parametrize("seed", range(40))
def test_random_splits_give_the_same_payloads(seed: int, line_end: bytes) -> None:
    data = STREAM.replace(b"\n", line_end)
    rng = random.Random(seed)
    cuts = rng.sample(range(1, len(data)), rng.randint(1, 30))
    assert _feed(SseSplitter(), _cut(data, cuts)) == PAYLOADS


def test_every_single_cut_gives_the_same_payloads() -> None:
    """Each cut point once, with CRLF: splits between \\r and \\n, inside \\r\\n\\r\\n."""
    data = STREAM.replace(b"\n", b"\r\n")
    for cut in range(1, len(data)):
        assert _feed(SseSplitter(), _cut(data, [cut])) == PAYLOADS, cut


def test_incomplete_event_waits_for_its_blank_line() -> None:
    splitter = SseSplitter()
    assert splitter.feed(b'data: {"n":1}\n') == []
    assert splitter.feed(b"data: more") == []
    assert splitter.feed(b"\n\n") == [b'{"n":1}\nmore']


def test_comments_and_event_lines_alone_give_no_payload() -> None:
    assert SseSplitter().feed(b": ping\n\nevent: ping\n\nid: 3\n\n") == []


def test_blank_lines_between_events_are_ignored() -> None:
    assert SseSplitter().feed(b"data: a\n\n\n\ndata: b\n\n") == [b"a", b"b"]


def test_crlf_multi_line_data_is_joined_with_lf() -> None:
    assert SseSplitter().feed(b"data: a\r\ndata: b\r\n\r\n") == [b"a\nb"]


def test_an_event_past_the_limit_is_refused_however_it_arrives() -> None:
    event = b"data: " + b"x" * 94 + b"\n\n"  # 100 bytes before its blank line
    assert SseSplitter(limit=100).feed(event * 3) == [b"x" * 94] * 3

    with pytest.raises(TooLarge):
        _feed(SseSplitter(limit=99), [event[:50], event[50:]])
    with pytest.raises(TooLarge):
        SseSplitter(limit=99).feed(event)
    with pytest.raises(TooLarge):  # never ended: the rest waiting for its blank line grows
        _feed(SseSplitter(limit=99), [b"data: " + b"x" * 60] * 2)

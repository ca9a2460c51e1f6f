"""Reading a request body: what parses is what the WAL can journal, and nothing deeper."""

from __future__ import annotations

from typing import Any

import orjson
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from llmsvc.errors import ClientError
from llmsvc.gateway.request import MAX_DEPTH, parse_chat, too_deep

CHAT = {"model": "mock", "messages": [{"role": "user", "content": "hi"}]}


def depth(value: Any) -> int:
    """Nesting depth the slow, obvious way: an array or object is one level more than its
    deepest member; a scalar is 0."""
    if isinstance(value, dict):
        return 1 + max((depth(v) for v in value.values()), default=0)
    if isinstance(value, list):
        return 1 + max((depth(v) for v in value), default=0)
    return 0


def deep_body(levels: int) -> bytes:
    """A chat request `levels` deep in all, by bytes: orjson cannot write past 254."""
    inner = levels - 1
    return orjson.dumps(CHAT)[:-1] + b',"payload":' + b"[" * inner + b"]" * inner + b"}"


def nested(levels: int, leaf: Any = 1) -> Any:
    """`levels` alternating arrays and objects around `leaf`."""
    value = leaf
    for n in range(levels):
        value = [value] if n % 2 else {"k": value}
    return value


# Strings full of what the byte scan must not take for structure: brackets, quotes and
# backslashes, escaped or not, next to each other.
tricky_text = st.text(alphabet='[]{}"\\\\/ab\x00\n\u00e9\U0001f600', max_size=12)
scalars = (
    st.none()
    | st.booleans()
    | st.integers(-(2**63), 2**64 - 1)
    | st.floats(allow_nan=False, allow_infinity=False)
    | tricky_text
)
json_values = st.recursive(
    scalars,
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(tricky_text, inner, max_size=4),
    max_leaves=40,
)


@settings(max_examples=400, deadline=None, derandomize=True, database=None)
@given(value=json_values, limit=st.integers(min_value=0, max_value=12), pad=st.integers(0, 12))
def test_the_byte_scan_agrees_with_the_parsed_depth(value: Any, limit: int, pad: int) -> None:
    value = nested(pad, value)  # deeper values than `recursive` draws on its own
    body = orjson.dumps(value)

    assert too_deep(body, limit) == (depth(value) > limit)
    pretty = orjson.dumps(value, option=orjson.OPT_INDENT_2)
    assert too_deep(pretty, limit) == (depth(value) > limit)


@pytest.mark.parametrize("levels", [MAX_DEPTH + 1, 254, 255, 300, 1024])
def test_a_body_deeper_than_the_limit_is_a_client_error_naming_the_limit(levels: int) -> None:
    body = deep_body(levels)

    with pytest.raises(ClientError, match=f"deeper than {MAX_DEPTH} levels"):
        parse_chat(body)


def test_a_body_at_the_limit_parses() -> None:
    data, _ = parse_chat(deep_body(MAX_DEPTH))

    assert depth(data) == MAX_DEPTH


def test_a_body_past_the_parsers_own_limit_is_not_valid_json() -> None:
    with pytest.raises(ClientError, match="not valid JSON"):
        parse_chat(b'{"a":' + b"[" * 1025 + b"]" * 1025 + b"}")


@pytest.mark.parametrize(
    "literal",
    [b"18446744073709551616", b"-9223372036854775809", b"1" * 300, b"1e-400", b"-0.0"],
)
def test_numbers_past_64_bits_parse_as_floats_the_wal_can_encode(literal: bytes) -> None:
    data, _ = parse_chat(b'{"model":"m","messages":[{"role":"user"}],"seed":' + literal + b"}")

    assert orjson.loads(orjson.dumps(data))["seed"] == data["seed"]


@pytest.mark.parametrize(
    "body",
    [b'{"model":"m","n":1e400}', b'{"model":"\\ud800"}', b'{"\\udc00":1}', b'{"n":NaN}'],
)
def test_values_orjson_cannot_hold_are_client_errors(body: bytes) -> None:
    with pytest.raises(ClientError, match="not valid JSON"):
        parse_chat(body)


# -- n: one choice per request ----------------------------------------------------------


@pytest.mark.parametrize("n", [1, None])
def test_n_of_one_or_null_is_taken(n: int | None) -> None:
    data, request = parse_chat(orjson.dumps({**CHAT, "n": n}))

    assert request.n == n == data["n"]


@pytest.mark.parametrize("n", [2, 128, 0])
def test_n_other_than_one_is_refused_naming_the_field_and_why(n: int) -> None:
    with pytest.raises(ClientError) as raised:
        parse_chat(orjson.dumps({**CHAT, "n": n}))

    assert raised.value.param == "n"
    assert str(raised.value).startswith("n: ")
    assert "one choice per request" in str(raised.value)

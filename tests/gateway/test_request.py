"""Reading a request body: what parses is what the WAL can journal, and nothing deeper.

Over HTTP (the `served` gateway, conftest.py), bad input gets a 4xx in OpenAI's error
shape naming the problem, and the WAL gets nothing.
"""

from __future__ import annotations

import logging
import uuid
from typing import Any

import orjson
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from served_gateway import (
    _DROP,
    CHAT,
    MAX_BODY_BYTES,
    MESSAGES,
    Served,
    _assert_nothing_recorded,
    _by_type,
    _chat,
    _error,
    _post,
    _raw_http,
)

from llmsvc.errors import ClientError
from llmsvc.gateway.request import (
    CORRELATION_MAX,
    INTEGER_FIELDS,
    MAX_DEPTH,
    correlation_id,
    parse_chat,
    too_deep,
    trace_id,
)
from llmsvc.providers.mock import token
from llmsvc.wal.codec import RecordType

BODY = {"model": "mock", "messages": [{"role": "user", "content": "hi"}]}


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
    return orjson.dumps(BODY)[:-1] + b',"payload":' + b"[" * inner + b"]" * inner + b"}"


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
    """In a field llmsvc does not read (passed as sent); `seed` itself is an int64."""
    body = b'{"model":"m","messages":[{"role":"user"}],"logit_bias":{"1":' + literal + b"}}"
    data, _ = parse_chat(body)

    assert orjson.loads(orjson.dumps(data))["logit_bias"] == data["logit_bias"]


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
    data, request = parse_chat(orjson.dumps({**BODY, "n": n}))

    assert request.n == n == data["n"]


@pytest.mark.parametrize("n", [2, 128, 0])
def test_n_other_than_one_is_refused_naming_the_field_and_why(n: int) -> None:
    with pytest.raises(ClientError) as raised:
        parse_chat(orjson.dumps({**BODY, "n": n}))

    assert raised.value.param == "n"
    assert str(raised.value).startswith("n: ")
    assert "one choice per request" in str(raised.value)


# -- X-Correlation-ID and traceparent ---------------------------------------------------

TRACE = "4bf92f3577b34da6a3ce929d0e0e4736"
TRACEPARENT = f"00-{TRACE}-00f067aa0ba902b7-01"


@pytest.mark.parametrize(
    "sent",
    [
        "req_01HZX3K9Q7V5M2N8P4R6T0W1Y3",
        "8472937462918374659",
        TRACEPARENT,
        "C0FFEE00-0000-4000-8000-000000000000",  # a UUID in capitals stays in capitals
        "Root=1-5759e988-bd862e3fe1be46a994272793;Parent=53995c3f42cd8ad8;Sampled=1",
        "x" * CORRELATION_MAX,
        "~!#$%&'*+-.^_`|{}",
    ],
)
def test_a_correlation_id_of_visible_ascii_is_taken_as_sent(sent: str) -> None:
    assert correlation_id({b"x-correlation-id": sent.encode()}) == sent


@pytest.mark.parametrize(
    ("sent", "problem"),
    [
        (b"", "is 0 bytes long"),
        (b"x" * (CORRELATION_MAX + 1), f"is {CORRELATION_MAX + 1} bytes long"),
        (b"two words", "a space"),
        (b"tab\there", "a control"),
        (b"nul\x00", "a control"),
        ("caf\u00e9".encode(), "non-ASCII"),
    ],
    ids=["empty", "too-long", "space", "tab", "nul", "non-ascii"],
)
def test_a_correlation_id_past_the_rule_is_refused_naming_the_header_and_the_rule(
    sent: bytes, problem: str
) -> None:
    with pytest.raises(ClientError) as raised:
        correlation_id({b"x-correlation-id": sent})

    message = str(raised.value)
    assert message.startswith("the X-Correlation-ID header ")
    assert problem in message
    assert f"1 to {CORRELATION_MAX} visible ASCII characters" in message


def test_without_a_correlation_id_a_traceparents_trace_id_is_taken() -> None:
    assert correlation_id({b"traceparent": TRACEPARENT.encode()}) == TRACE
    sent = {b"traceparent": TRACEPARENT.encode(), b"x-correlation-id": b"mine"}
    assert correlation_id(sent) == "mine"  # the client's own id wins


def test_without_either_a_new_uuid_is_made() -> None:
    made = {correlation_id({}) for _ in range(3)}

    assert len(made) == 3
    assert all(str(uuid.UUID(m)) == m for m in made)


@pytest.mark.parametrize(
    "traceparent",
    [
        f"cc-{TRACE}-00f067aa0ba902b7-01-future-field",  # a later version may add fields
        f"00-{TRACE}-00f067aa0ba902b7-00",
    ],
)
def test_a_valid_traceparent_gives_its_trace_id(traceparent: str) -> None:
    assert trace_id(traceparent.encode()) == TRACE


@pytest.mark.parametrize(
    "traceparent",
    [
        f"ff-{TRACE}-00f067aa0ba902b7-01",  # version ff is invalid
        f"00-{'0' * 32}-00f067aa0ba902b7-01",  # an all-zero trace id
        f"00-{TRACE}-{'0' * 16}-01",  # an all-zero parent id
        f"00-{TRACE.upper()}-00f067aa0ba902b7-01",
        f"00-{TRACE}-00f067aa0ba902b7-01-extra",  # version 00 has four fields
        f"cc-{TRACE}-00f067aa0ba902b7-01x",
        f"00-{TRACE[:-1]}-00f067aa0ba902b7-01",
        "",
    ],
)
def test_an_invalid_traceparent_is_ignored(traceparent: str) -> None:
    assert trace_id(traceparent.encode()) is None
    correlation = correlation_id({b"traceparent": traceparent.encode()})
    assert str(uuid.UUID(correlation)) == correlation


@pytest.mark.parametrize(
    "body",
    [b'{"model": "mock", "messages": ', b"", b"\xff\xfe", b"not json"],
    ids=["truncated", "empty", "not-utf8", "bare-words"],
)
async def test_malformed_json_is_400_and_records_nothing(served: Served, body: bytes) -> None:
    error = _error(*(await _post(served, body))[::2], 400)
    assert "not valid JSON" in error["message"]
    assert error["type"] == "invalid_request_error"
    assert error["param"] is None
    await _assert_nothing_recorded(served)


@pytest.mark.parametrize(
    ("body", "offset"),
    [(b"\xff\xfe", 0), (b'{"model":"m","messages":[{"role":"user","content":"h\xffi"}]}', 52)],
    ids=["bare", "in-content"],
)
def test_a_body_that_is_not_utf8_is_named_with_its_first_bad_byte(body: bytes, offset: int) -> None:
    """orjson says "surrogates not allowed" at char 0 for any such byte; this says which."""
    with pytest.raises(ClientError, match=rf"not UTF-8 \(byte 0xff at offset {offset}\)"):
        parse_chat(body)


@pytest.mark.parametrize("body", [[1, 2], "chat", 42, None], ids=["list", "str", "int", "null"])
async def test_body_that_is_not_an_object_is_400_and_records_nothing(
    served: Served, body: Any
) -> None:
    error = _error(*(await _post(served, body))[::2], 400)
    assert "JSON object" in error["message"]
    await _assert_nothing_recorded(served)


INVALID_FIELDS = {
    "model-missing": (_chat(model=_DROP), "model"),
    "model-int": (_chat(model=5), "model"),
    "model-empty": (_chat(model=""), "model"),
    "messages-missing": (_chat(messages=_DROP), "messages"),
    "messages-empty": (_chat(messages=[]), "messages"),
    "messages-str": (_chat(messages="hello"), "messages"),
    "message-str": (_chat(messages=["hello"]), "messages.0"),
    "role-invalid": (_chat(messages=[{"role": "robot", "content": "hi"}]), "messages.0.role"),
    "role-missing": (_chat(messages=[{"content": "hi"}]), "messages.0.role"),
    "stream-yes": (_chat(stream="yes"), "stream"),
    "max_tokens-negative": (_chat(max_tokens=-1), "max_tokens"),
    "max_tokens-zero": (_chat(max_tokens=0), "max_tokens"),
    "max_tokens-str": (_chat(max_tokens="5"), "max_tokens"),
    "max_tokens-fraction": (_chat(max_tokens=3.5), "max_tokens"),
    "max_tokens-true": (_chat(max_tokens=True), "max_tokens"),
    "max_completion_tokens-fraction": (_chat(max_completion_tokens=2.5), "max_completion_tokens"),
    "seed-fraction": (_chat(seed=1.5), "seed"),
    "seed-past-64-bits": (_chat(seed=2.0**64), "seed"),
    "top_logprobs-fraction": (_chat(top_logprobs=0.5), "top_logprobs"),
    "max_completion_tokens-negative": (_chat(max_completion_tokens=-3), "max_completion_tokens"),
    "temperature-9": (_chat(temperature=9), "temperature"),
    "temperature-str": (_chat(temperature="hot"), "temperature"),
    "mock_delay_ms-negative": (_chat(mock_delay_ms=-1), "mock_delay_ms"),
    "n-2": (_chat(n=2), "n"),  # one choice per request: the store keeps one reply
    "include_usage-int": (
        _chat(stream=True, stream_options={"include_usage": 1}),
        "stream_options.include_usage",
    ),
}


@pytest.mark.parametrize("field", INTEGER_FIELDS)
def test_an_integral_float_is_taken_for_an_integer_field_and_forwarded_as_an_int(
    field: str,
) -> None:
    """OpenAI takes 3.0 where it wants an integer; an upstream that does not gets 3."""
    data, request = parse_chat(orjson.dumps(_chat(**{field: 1.0})))
    assert (type(data[field]), data[field], getattr(request, field)) == (int, 1, 1)


async def test_an_integral_max_tokens_streams_that_many_tokens(served: Served) -> None:
    status, _, raw = await _post(served, _chat(max_tokens=3.0))
    assert status == 200, raw
    doc = orjson.loads(raw)
    assert doc["usage"]["completion_tokens"] == 3
    assert doc["choices"][0]["finish_reason"] == "length"


@pytest.mark.parametrize(("body", "field"), list(INVALID_FIELDS.values()), ids=list(INVALID_FIELDS))
async def test_invalid_field_is_400_naming_it_and_records_nothing(
    served: Served, body: dict[str, Any], field: str
) -> None:
    error = _error(*(await _post(served, body))[::2], 400)
    assert error["param"] == field
    assert error["message"].startswith(f"{field}: ")
    assert error["type"] == "invalid_request_error"
    assert error["code"] == "invalid_request"
    await _assert_nothing_recorded(served)


async def test_invalid_content_is_400_naming_the_field_not_a_union_member(
    served: Served,
) -> None:
    """`content` may be a string, a list of parts or null; the param is the field's path."""
    body = _chat(messages=[{"role": "user", "content": 5}])
    error = _error(*(await _post(served, body))[::2], 400)
    assert error["param"] == "messages.0.content"
    assert error["message"].startswith("messages.0.content: ")
    await _assert_nothing_recorded(served)


def _nested_body(levels: int) -> bytes:
    """A valid request `levels` deep in all, written as bytes: orjson cannot write past 254."""
    inner = levels - 1
    return orjson.dumps(_chat())[:-1] + b',"payload":' + b"[" * inner + b"]" * inner + b"}"


@pytest.mark.parametrize("levels", [MAX_DEPTH + 1, 255, 1024])
async def test_a_body_nested_past_the_depth_limit_is_400_naming_it_in_one_line(
    served: Served, levels: int, caplog: pytest.LogCaptureFixture
) -> None:
    """Past the limit, below and beyond what the WAL's encoder takes: 400 and the one line of
    a rejected request, not a traceback."""
    with caplog.at_level(logging.INFO):
        error = _error(*(await _post(served, _nested_body(levels)))[::2], 400)
    assert f"deeper than {MAX_DEPTH} levels" in error["message"]
    lines = [
        (r.levelno, r.exc_info, r.getMessage().split()[0])
        for r in caplog.records
        if r.name != "uvicorn.access"
    ]
    assert lines == [(logging.INFO, None, "rejected")]
    await _assert_nothing_recorded(served)


async def test_a_body_at_the_depth_limit_is_served_and_journaled(served: Served) -> None:
    status, _, raw = await _post(served, _nested_body(MAX_DEPTH))
    assert status == 200, raw
    (start,) = _by_type(await served.records(), RecordType.REQUEST_START)
    assert start["params"]["payload"] == orjson.loads(_nested_body(MAX_DEPTH))["payload"]


async def test_body_declared_over_the_limit_is_413_before_it_is_sent(served: Served) -> None:
    """The declared length is enough: the server answers without waiting for the body."""
    request = (
        f"POST {CHAT} HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
        f"Content-Length: {MAX_BODY_BYTES + 1}\r\nConnection: close\r\n\r\n"
    ).encode()
    status, raw = await _raw_http(served, request)
    error = _error(status, raw, 413)
    assert error["code"] == "request_too_large"
    assert str(MAX_BODY_BYTES) in error["message"]
    await _assert_nothing_recorded(served)


async def test_chunked_body_over_the_limit_is_413(served: Served) -> None:
    """No Content-Length to trust: the limit is enforced while reading."""
    body = orjson.dumps(
        {"model": "mock", "messages": [{"role": "user", "content": "x" * MAX_BODY_BYTES}]}
    )
    chunks = b"".join(
        b"%x\r\n%s\r\n" % (len(body[i : i + 1000]), body[i : i + 1000])
        for i in range(0, len(body), 1000)
    )
    request = (
        (
            f"POST {CHAT} HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
            "Transfer-Encoding: chunked\r\nConnection: close\r\n\r\n"
        ).encode()
        + chunks
        + b"0\r\n\r\n"
    )
    status, raw = await _raw_http(served, request)
    error = _error(status, raw, 413)
    assert error["code"] == "request_too_large"
    assert str(MAX_BODY_BYTES) in error["message"]
    await _assert_nothing_recorded(served)


async def test_chunked_body_under_the_limit_is_served(served: Served) -> None:
    """The other side of the limit: a chunked body that fits is read whole."""
    body = orjson.dumps({"model": "mock", "messages": MESSAGES, "max_tokens": 2})
    request = (
        f"POST {CHAT} HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
        "Transfer-Encoding: chunked\r\nConnection: close\r\n\r\n"
    ).encode()
    for i in range(0, len(body), 7):
        request += b"%x\r\n%s\r\n" % (len(body[i : i + 7]), body[i : i + 7])
    status, raw = await _raw_http(served, request + b"0\r\n\r\n")
    assert status == 200, raw
    assert orjson.loads(raw)["choices"][0]["message"]["content"] == token(0) + token(1)


@pytest.mark.parametrize("value", ["x" * 129, "two words", ""], ids=["long", "space", "empty"])
async def test_invalid_correlation_id_is_400_and_records_nothing(
    served: Served, value: str
) -> None:
    body = {"model": "mock", "messages": MESSAGES}
    error = _error(*(await _post(served, body, **{"X-Correlation-ID": value}))[::2], 400)
    assert error["message"].startswith("the X-Correlation-ID header ")
    assert "1 to 128 visible ASCII characters" in error["message"]
    await _assert_nothing_recorded(served)


@pytest.mark.parametrize(
    "value",
    [
        "req_8d2f0c",
        "12345678901234567890",
        "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
    ],
    ids=["prefixed", "decimal", "traceparent"],
)
async def test_a_correlation_id_that_is_not_a_uuid_is_echoed_and_journaled_as_sent(
    served: Served, value: str
) -> None:
    body = {"model": "mock", "messages": MESSAGES, "max_tokens": 1}
    status, headers, raw = await _post(served, body, **{"X-Correlation-ID": value})
    assert status == 200, raw
    assert headers["X-Correlation-ID"] == value
    [start] = _by_type(await served.records(), RecordType.REQUEST_START)
    assert start["correlation_id"] == value

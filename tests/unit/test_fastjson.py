"""`fastjson` answers as the standard library does: same values, same bytes, same errors."""

from __future__ import annotations

import json
import uuid
from collections.abc import Callable
from datetime import UTC, datetime, timedelta, timezone
from typing import Any

import hypothesis.strategies as st
import pytest
from hypothesis import given, settings

from services.common import fastjson
from services.common.api import _json_default
from services.common.events import FailureReason


def outcome(call: Callable[[], Any]) -> tuple[str, str]:
    """What a call gave, comparable across int/float and NaN: its value's repr, or its error's
    type."""
    try:
        return "value", repr(call())
    except Exception as exc:
        return "error", type(exc).__name__


def std_loads(raw: bytes) -> tuple[str, str]:
    return outcome(lambda: json.loads(raw))


def std_dumps(value: Any, default: Callable[[Any], Any] | None = None) -> tuple[str, str]:
    return outcome(
        lambda: json.dumps(
            value, default=default, separators=(",", ":"), ensure_ascii=False
        ).encode()
    )


scalars = (
    st.none()
    | st.booleans()
    | st.integers()
    | st.integers(min_value=-(2**70), max_value=2**70)
    | st.text()
)


def nested(leaves: st.SearchStrategy[Any]) -> st.SearchStrategy[Any]:
    """JSON documents: `leaves` in lists and objects, a few levels deep."""
    return st.recursive(
        leaves,
        lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(), inner, max_size=4),
        max_leaves=12,
    )


documents = nested(scalars)
with_floats = nested(scalars | st.floats())


@settings(max_examples=400)
@given(with_floats, st.booleans(), st.sampled_from([None, 1]), st.booleans())
def test_loads_reads_what_the_standard_library_reads(
    value: Any, ascii_only: bool, indent: int | None, compact: bool
) -> None:
    separators = (",", ":") if compact else None
    text = json.dumps(value, ensure_ascii=ascii_only, indent=indent, separators=separators)
    raw = text.encode("utf-8", "surrogatepass")  # lone surrogates: bytes neither one reads
    assert outcome(lambda: fastjson.loads(raw)) == std_loads(raw)


@pytest.mark.parametrize(
    "raw",
    [
        b'{"amount": 123456789012345678901234567890}',  # orjson alone: a float
        b"-9223372036854775809",
        b"18446744073709551615",
        b'{"a": 1, "a": 2}',
        b"1e400",
        b"NaN",
        b"[Infinity, -Infinity]",
        b'"\\ud800"',
        b'"\\ud83d\\ude00"',
        b"\xef\xbb\xbf{}",
        '{"x": 1}'.encode("utf-16"),
        '{"x": 1}'.encode("utf-32"),
        b'"\xff"',
        b'{"a":1}x',
        b"",
        b" ",
        b"-0",
        b"-0.0",
        b'"\\u0000"',
        b"9" * 4300,
    ],
)
def test_loads_edges(raw: bytes) -> None:
    assert outcome(lambda: fastjson.loads(raw)) == std_loads(raw)


@pytest.mark.parametrize(
    ("raw", "error"),
    [
        (b"[" * 5000 + b"]" * 5000, fastjson.TooDeep),  # json: RecursionError
        (b'{"a": ' * 5000 + b"1" + b"}" * 5000, fastjson.TooDeep),
        (b"9" * 4301, fastjson.NumberTooLong),  # json: a plain ValueError
        (b'{"amount": -' + b"9" * 5000 + b"}", fastjson.NumberTooLong),
        # Bad syntax after a long number is bad syntax (400), not a number too long (422).
        (b'{"amount": ' + b"9" * 5000 + b', "user_id": ', json.JSONDecodeError),
    ],
)
def test_loads_refuses_what_python_cannot_hold_with_a_value_error_of_its_own(
    raw: bytes, error: type[ValueError]
) -> None:
    # Callers catch ValueError for bad input; a RecursionError would have been a 500.
    assert issubclass(error, ValueError)
    with pytest.raises(error):
        fastjson.loads(raw)


@settings(max_examples=400)
@given(documents)
def test_dumps_writes_the_standard_librarys_bytes(value: Any) -> None:
    assert outcome(lambda: fastjson.dumps(value)) == std_dumps(value)


@pytest.mark.parametrize(
    "value",
    [
        {"id": uuid.UUID("0193a0b6-3d6e-7c1a-9e2f-1a2b3c4d5e6f")},
        {"at": datetime(2026, 12, 3, 16, 29, 52, 123456, tzinfo=UTC)},
        {"at": datetime(2026, 12, 3, 16, 29, 52, tzinfo=timezone(timedelta(hours=3)))},
        {"reason": FailureReason.INSUFFICIENT_FUNDS},
        {"big": 2**64, "small": -(2**63) - 1},
        {1: "not a string key"},
        {"s": "\ud800"},
        {"s": '\x00\x1f\x7f\u2028é😀"\\/'},
        {"t": (1, 2)},
        {"unknown": object()},
    ],
)
def test_dumps_edges(value: Any) -> None:
    assert outcome(lambda: fastjson.dumps(value, default=_json_default)) == std_dumps(
        value, default=_json_default
    )

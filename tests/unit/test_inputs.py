"""What errands accepts: text, integers, seqs, JSON values and cursors (no I/O)."""

from __future__ import annotations

import base64
import math
from typing import Any

import orjson
import pytest
from hypothesis import given
from hypothesis import strategies as st
from pydantic import BaseModel, ConfigDict, ValidationError

from errands.errors import InvalidCursor
from errands.inputs import (
    MAX_INT64,
    MIN_INT64,
    BadValue,
    Int64,
    Owner,
    Seq,
    Text,
    check_json,
    check_text,
    load_json,
    parse_seq,
)
from errands.service import decode_cursor


class Strict(BaseModel):
    model_config = ConfigDict(strict=True, extra="forbid")

    n: Int64 = 0
    seq: Seq = 0
    owner: Owner | None = None
    text: Text | None = None


@pytest.mark.parametrize(
    ("value", "depth"),
    [(1, 0), ({}, 1), ([], 1), ({"a": [1, {"b": 2}]}, 3), ([[[[[]]]]], 5)],
)
def test_json_is_refused_only_beyond_its_depth(value: object, depth: int) -> None:
    check_json(value, max_depth=depth)
    if depth:
        with pytest.raises(BadValue, match="nested deeper"):
            check_json(value, max_depth=depth - 1)


def test_very_deep_json_is_judged_without_recursion() -> None:
    deep: object = 1
    for _ in range(50_000):
        deep = [deep]
    check_json(deep, max_depth=50_000)
    with pytest.raises(BadValue):
        check_json(deep, max_depth=49_999)


@pytest.mark.parametrize(
    ("value", "where"),
    [
        ({"n": MAX_INT64 + 1}, "input.n"),
        ({"n": MIN_INT64 - 1}, "input.n"),
        ({"a": [1, 10**30]}, "input.a[1]"),
        ({"f": math.nan}, "input.f"),
        ({"f": math.inf}, "input.f"),
        ({"f": -math.inf}, "input.f"),
        ({"s": "\ud800"}, "input.s"),
        ({"\udfff": 1}, "input"),
        ({1: "non-string key"}, "input"),
        ({"x": object()}, "input.x"),
    ],
)
def test_values_json_cannot_keep_are_refused_saying_where(value: Any, where: str) -> None:
    with pytest.raises(BadValue) as refused:
        check_json(value, what="input")
    assert str(refused.value).startswith(where)


def test_values_json_keeps_are_accepted_as_they_are() -> None:
    value = {"nul": "a\x00b", "max": MAX_INT64, "min": MIN_INT64, "f": 1.5e300, "t": (1, 2), "u": "😀"}
    assert check_json(value) is value


def test_a_result_may_hold_types_the_serialiser_renders() -> None:
    import datetime

    check_json({"at": datetime.datetime(2026, 1, 1), 3: "x"}, other_types=True)
    with pytest.raises(BadValue):
        check_json({"at": datetime.datetime(2026, 1, 1), "n": math.nan}, other_types=True)


@given(st.integers())
def test_every_integer_either_fits_in_64_bits_or_is_refused(n: int) -> None:
    if MIN_INT64 <= n <= MAX_INT64:
        assert check_json([n]) == [n]
    else:
        with pytest.raises(BadValue):
            check_json([n])


def test_load_json_keeps_big_integers_big_so_they_are_refused() -> None:
    assert load_json(b'{"n": 9223372036854775807}') == {"n": MAX_INT64}
    for body in (b'{"n": 9223372036854775808}', b'{"n": 1e400}', b"NaN", b"{nope", b'"\\ud800"', b"[1] x"):
        with pytest.raises(BadValue):
            load_json(body)


def test_text_with_nul_is_refused() -> None:
    assert check_text("fine") == "fine"
    with pytest.raises(BadValue, match="NUL"):
        check_text("a\x00b", "owner")


@pytest.mark.parametrize("text", ["0", "42", " 7 ", str(MAX_INT64)])
def test_seqs_in_headers(text: str) -> None:
    assert parse_seq(text, "Last-Event-ID") == int(text)


@pytest.mark.parametrize("text", ["-1", "1.5", "x", "", str(MAX_INT64 + 1), "9" * 400, "٣", "1_0"])
def test_bad_seqs_in_headers(text: str) -> None:
    with pytest.raises(BadValue):
        parse_seq(text, "Last-Event-ID")


def test_strict_models_take_integral_floats_and_64_bit_integers_only() -> None:
    assert Strict.model_validate_json(b'{"n": 3.0, "seq": 7.0}').n == 3
    for body in (
        b'{"n": 3.5}',
        b'{"n": "3"}',
        b'{"n": true}',
        b'{"n": 9223372036854775808}',
        b'{"n": 1e300}',
        b'{"seq": -1}',
        b'{"owner": "a\\u0000"}',
        b'{"owner": ""}',
        b'{"text": "\\u0000"}',
    ):
        with pytest.raises(ValidationError):
            Strict.model_validate_json(body)


def _cursor(value: Any) -> str:
    return base64.urlsafe_b64encode(orjson.dumps(value)).decode().rstrip("=")


@pytest.mark.parametrize(
    "cursor",
    [
        "",
        "nope",
        "W10",
        "WyJhIiwxXQ",
        "e30",
        _cursor([None, "a"]),
        _cursor([1, "a\x00b"]),
        _cursor([True, "a"]),
        _cursor([1, "a/b"]),
        base64.urlsafe_b64encode(b"[" + b"9" * 400 + b', "a"]').decode(),
    ],
)
def test_cursors_this_service_did_not_make_are_refused(cursor: str) -> None:
    with pytest.raises(InvalidCursor):
        decode_cursor(cursor)

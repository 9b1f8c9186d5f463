"""What errands accepts from outside: ids and names, text, integers and JSON values. No I/O.

One rule for both stores, applied wherever a value enters (the API, WebSocket frames, provider
reports, handlers):

* **Ids and names** match their patterns; text errands stores as text (owners, messages, error
  codes and messages, URLs, descriptions, provider job ids) may not hold ``NUL`` (U+0000), which
  PostgreSQL cannot store in ``text``: refused with 422 (400 in a provider's report).
* **Integers** fit in 64 bits (``-2**63 .. 2**63-1``); seqs and ids are not negative. A number
  with a zero fraction (``3.0``) is accepted where an integer is asked for, as JSON Schema says.
* **JSON values** (a task's input, a handler's result, a provider's output) are kept faithfully:
  strings may hold any character (NUL included: it is stored escaped), integers fit in 64 bits,
  and there is no ``NaN`` or ``Infinity`` (JSON has none); anything else is refused, never
  stored altered.
"""

from __future__ import annotations

import base64
import datetime
import math
import os
import re
import time
from collections.abc import Sequence
from typing import Annotated, Any, TypeVar

import orjson
import pydantic_core
from pydantic import (
    AfterValidator,
    AwareDatetime,
    BaseModel,
    BeforeValidator,
    Field,
    StringConstraints,
    TypeAdapter,
    ValidationError,
)

from errands.errors import ApiError, BadRequest, InvalidRequest

MAX_INT64 = 2**63 - 1
MIN_INT64 = -(2**63)

TASK_ID_PATTERN = r"^[A-Za-z0-9_-]{1,64}$"
TYPE_PATTERN = r"^[A-Za-z0-9_.:-]{1,128}$"
STREAM_NAME_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$"
#: Text that PostgreSQL can store (it has no NUL in ``text``).
NO_NUL_PATTERN = r"^[^\u0000]*$"
OWNER_MAX_CHARS = 256
PRIORITY_MIN, PRIORITY_MAX = -1000, 1000


class BadValue(ValueError):
    """A value errands does not accept; the message says why, for a client."""


def check_text(text: str, what: str = "text") -> str:
    """``text`` if errands can store it as text; :class:`BadValue` otherwise."""
    if "\x00" in text:
        raise BadValue(f"{what} may not contain NUL (\\u0000) characters")
    return text


def _no_nul(text: str) -> str:
    return check_text(text, "the value")


def _integral(value: Any) -> Any:
    """``3.0`` as ``3``: JSON Schema counts a number with a zero fraction as an integer."""
    if isinstance(value, float) and value.is_integer() and abs(value) <= 2**64:
        return int(value)
    return value


#: Use in ``Annotated[int, Field(ge=…, le=…), integral]`` for an integer field of a strict model
#: (the constraints first: after a validator, pydantic no longer writes them into the schema).
integral = BeforeValidator(_integral)

#: Text stored as text: no NUL (checked with a clear message; the pattern documents it).
Text = Annotated[str, AfterValidator(_no_nul), Field(json_schema_extra={"pattern": NO_NUL_PATTERN})]
Owner = Annotated[
    str,
    StringConstraints(min_length=1, max_length=OWNER_MAX_CHARS),
    AfterValidator(_no_nul),
    Field(json_schema_extra={"pattern": NO_NUL_PATTERN}),
]
_OWNER: TypeAdapter[str] = TypeAdapter(Owner)
TaskId = Annotated[str, StringConstraints(pattern=TASK_ID_PATTERN)]
Priority = Annotated[int, Field(ge=PRIORITY_MIN, le=PRIORITY_MAX), integral]
TypeName = Annotated[str, StringConstraints(pattern=TYPE_PATTERN)]


def _moment(value: Any) -> Any:
    """A date and time as RFC 3339 text (or a datetime from code); never a number, which lax
    validation would read as seconds since 1970 where the document says a string."""
    text = isinstance(value, str) and not _NUMBER.fullmatch(value.strip())
    if text or isinstance(value, datetime.datetime):
        return value
    raise ValueError("an RFC 3339 date and time with an offset, such as 2026-12-04T09:00:00+08:00")


_NUMBER = re.compile(r"[-+]?(\d+\.?\d*|\.\d+)([eE][-+]?\d+)?")
#: A date and time with an offset, given as RFC 3339 text (query parameters and lax models too).
Moment = Annotated[AwareDatetime, BeforeValidator(_moment)]
#: An integer field of a strict model: 64 bits, and ``3.0`` counts as ``3``.
Int64 = Annotated[int, Field(ge=MIN_INT64, le=MAX_INT64), integral]
#: A position in the event log (``after``, ``Last-Event-ID``): 0 up to the largest seq.
Seq = Annotated[int, Field(ge=0, le=MAX_INT64), integral]


def parse_seq(text: str, what: str) -> int:
    """A seq written as text (a header): decimal digits, at most the largest seq."""
    value = text.strip()
    if not value.isascii() or not value.isdigit() or len(value) > 19 or int(value) > MAX_INT64:
        raise BadValue(f"{what} must be a seq: a whole number from 0 to {MAX_INT64}")
    return int(value)


def check_owner(owner: str) -> str:
    """``owner`` if it is one (what :data:`Owner` checks, for values that come from code)."""
    try:
        return _OWNER.validate_python(owner)
    except ValidationError:
        raise BadValue(f"an owner is 1 to {OWNER_MAX_CHARS} characters without NUL") from None


def check_json(
    value: Any, *, what: str = "the value", max_depth: int | None = None, other_types: bool = False
) -> Any:
    """``value`` if it is a JSON value errands keeps faithfully (see the module docstring);
    :class:`BadValue` saying where it is not. Walks without recursion.

    ``other_types`` lets values of other types through (a handler's result may hold datetimes
    or dataclasses, which the serialiser renders), so only numbers and strings are judged."""
    stack: list[tuple[Any, int, str]] = [(value, 0, what)]
    while stack:
        item, depth, where = stack.pop()
        if isinstance(item, dict):
            children: Sequence[tuple[Any, str]] = [(v, f"{where}.{k}") for k, v in item.items()]
            for key in item:
                if isinstance(key, str):
                    _check_unicode(key, where)
                elif not other_types:
                    raise BadValue(f"{where}: object keys must be strings")
        elif isinstance(item, list | tuple):  # tuples: from Python callers
            children = [(v, f"{where}[{i}]") for i, v in enumerate(item)]
        else:
            if isinstance(item, bool) or item is None:
                continue
            if isinstance(item, int):
                if not MIN_INT64 <= item <= MAX_INT64:
                    raise BadValue(f"{where}: integers must fit in 64 bits (-2^63 to 2^63-1)")
            elif isinstance(item, float):
                if not math.isfinite(item):
                    raise BadValue(f"{where}: JSON has no NaN or Infinity")
            elif isinstance(item, str):
                _check_unicode(item, where)
            elif not other_types:
                raise BadValue(f"{where}: {type(item).__name__} is not a JSON value")
            continue
        if max_depth is not None and depth + 1 > max_depth:
            raise BadValue(f"{what} is nested deeper than {max_depth} levels")
        stack.extend((child, depth + 1, name) for child, name in children)
    return value


def _check_unicode(text: str, where: str) -> None:
    # Python strings may hold lone surrogates (JSON parsers refuse them; Python callers may not).
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        raise BadValue(f"{where}: strings must be valid Unicode (no lone surrogates)") from None


def load_json(body: bytes) -> Any:
    """A JSON document, with integers of any size kept as such (so the range check sees them)
    and no ``NaN``; :class:`BadValue` when it is not JSON errands keeps."""
    try:
        value = pydantic_core.from_json(body, allow_inf_nan=False)
    except ValueError:
        raise BadValue("the body is not valid JSON") from None
    return check_json(value, what="the body")


_CROCKFORD = "0123456789ABCDEFGHJKMNPQRSTVWXYZ"


_TRIPLES = [a + b + c for a in _CROCKFORD for b in _CROCKFORD for c in _CROCKFORD]  # 15 bits → 3 chars


def new_task_id() -> str:
    """A 26-character id that sorts by creation time (48-bit milliseconds, 80 random bits)."""
    return new_task_ids(1)[0]


def new_task_ids(count: int) -> list[str]:
    """``count`` ids like :func:`new_task_id`'s, their random bits drawn in one system call (a
    batch makes a thousand: one call each cost a twentieth of its time)."""
    ms = int(time.time() * 1000) << 80
    entropy = os.urandom(10 * count)
    return [_encode_id(ms | int.from_bytes(entropy[i : i + 10], "big")) for i in range(0, 10 * count, 10)]


def _encode_id(n: int) -> str:
    t = _TRIPLES
    # 130 bits, the first two characters (10 bits) then eight of three (a batch makes thousands).
    return (
        t[n >> 120][1:] + t[(n >> 105) & 32767] + t[(n >> 90) & 32767] + t[(n >> 75) & 32767]
        + t[(n >> 60) & 32767] + t[(n >> 45) & 32767] + t[(n >> 30) & 32767] + t[(n >> 15) & 32767]
        + t[n & 32767]
    )  # fmt: skip


# -- validation errors, as clients are told them -----------------------------------------------

M = TypeVar("M", bound=BaseModel)


def _describe(error: dict[str, Any]) -> str:
    loc = [str(part) for part in error.get("loc", ()) if part not in ("body", "query", "path")]
    where = ".".join(loc)
    kind = error.get("type", "")
    if kind == "extra_forbidden":
        return f"{where}: unknown field" if where else "unknown field"
    if kind == "missing":
        return f"{where}: required" if where else "a JSON object body is required"
    message = str(error.get("msg", "invalid value")).removeprefix("Value error, ")
    return f"{where}: {message}" if where else message


def invalid(errors: list[Any]) -> ApiError:
    """The API error for pydantic validation errors: malformed JSON is a 400, the rest 422."""
    if any(e.get("type") == "json_invalid" for e in errors):
        return BadRequest("The body is not valid JSON.")
    return InvalidRequest("; ".join(_describe(e) for e in errors[:5]))


def parse(model: type[M], body: bytes) -> M:
    """Validate a JSON body against ``model`` (strict, no recursion limit issues) or raise."""
    try:
        return model.model_validate_json(body)
    except ValidationError as exc:
        raise invalid(list(exc.errors())) from None


def validate(model: type[M], data: Any) -> M:
    """Validate Python values against ``model`` (from Python callers) or raise as :func:`parse`."""
    try:
        return model.model_validate(data)
    except ValidationError as exc:
        raise invalid(list(exc.errors())) from None


def pack_cursor(parts: Sequence[Any]) -> str:
    """A page's position as the opaque text a client passes back (base64url of its JSON)."""
    return base64.urlsafe_b64encode(orjson.dumps(list(parts))).decode().rstrip("=")


def unpack_cursor(cursor: str) -> Any:
    """What :func:`pack_cursor` packed; a ``ValueError`` for text it cannot have made (the
    caller checks every part: the text is the client's)."""
    return orjson.loads(base64.urlsafe_b64decode(cursor + "=" * (-len(cursor) % 4)))

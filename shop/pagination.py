"""Opaque keyset cursors: `?cursor=&limit=` on every list."""

from __future__ import annotations

import base64
from typing import Annotated, Any

import msgspec
from litestar.params import Parameter

from shop.errors import ValidationFailed

DEFAULT_LIMIT = 20
MAX_LIMIT = 100

# The `?limit=` parameter of every list.
Limit = Annotated[int, Parameter(ge=1, le=MAX_LIMIT)]
# An id in a list's filter (`?user_id=`): out of bigint range is a 422, not an overflow (500).
IdFilter = Annotated[int | None, Parameter(ge=1, le=2**63 - 1)]


def encode_cursor(*values: Any) -> str:
    return base64.urlsafe_b64encode(msgspec.json.encode(list(values))).decode().rstrip("=")


BIGINT_MAX = 2**63 - 1
BIGINT_MIN = -(2**63)


def invalid_cursor() -> ValidationFailed:
    return ValidationFailed(
        "Invalid cursor", code="invalid_cursor", details=[{"field": "cursor", "message": "invalid cursor"}]
    )


def cursor_bigint(value: object) -> int:
    """A cursor value that goes into a bigint parameter; anything else is a 422, not a 500."""
    if type(value) is not int or not BIGINT_MIN <= value <= BIGINT_MAX:
        raise invalid_cursor()
    return value


def decode_id_cursor(cursor: str | None) -> int | None:
    """The last id an id-ordered page ended at (encode_cursor(id)), or None for the first page."""
    values = decode_cursor(cursor)
    return None if values is None else cursor_bigint(values[0])


def decode_cursor(cursor: str | None, arity: int = 1) -> list[Any] | None:
    """The values a cursor was made from, or None for the first page; a bad cursor is 422."""
    if not cursor:
        return None
    try:
        values = msgspec.json.decode(base64.urlsafe_b64decode(cursor + "=" * (-len(cursor) % 4)))
    except (ValueError, msgspec.DecodeError):
        values = None
    if not isinstance(values, list) or len(values) != arity:
        raise invalid_cursor()
    return values

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


def encode_cursor(*values: Any) -> str:
    return base64.urlsafe_b64encode(msgspec.json.encode(list(values))).decode().rstrip("=")


def decode_cursor(cursor: str | None, arity: int = 1) -> list[Any] | None:
    """The values a cursor was made from, or None for the first page; a bad cursor is 422."""
    if not cursor:
        return None
    try:
        values = msgspec.json.decode(base64.urlsafe_b64decode(cursor + "=" * (-len(cursor) % 4)))
    except (ValueError, msgspec.DecodeError):
        values = None
    if not isinstance(values, list) or len(values) != arity:
        raise ValidationFailed(
            "Invalid cursor",
            code="invalid_cursor",
            details=[{"field": "cursor", "message": "invalid cursor"}],
        )
    return values

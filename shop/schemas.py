"""The shared base of every request and response Struct."""

from __future__ import annotations

import msgspec


class Schema(msgspec.Struct, kw_only=True, forbid_unknown_fields=True):
    """Requests reject unknown fields; responses are encoded field by field."""


class Page(Schema):
    items: list
    next_cursor: str | None = None

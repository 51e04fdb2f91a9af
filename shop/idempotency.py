"""Idempotency-Key handling for mutating shopper calls.

The first request with a key does its work and stores its response in the same transaction;
a repeat with the same body replays that response, a repeat with another body is 422
`idempotency.mismatch`. A transaction-scoped advisory lock on the key makes a concurrent
duplicate wait for the first request and then replay its answer instead of working twice.
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Awaitable, Callable
from typing import Annotated, Any

import asyncpg
import msgspec
from litestar import Response
from litestar.params import Parameter

from shop.errors import ValidationFailed

KEY_PATTERN = re.compile(r"^[\x21-\x7e]{1,128}$")

# The header parameter every mutating shopper route takes.
# Checked by `check_key` (422 `idempotency.invalid_key`), the same way on every route.
IdempotencyKey = Annotated[str | None, Parameter(header="Idempotency-Key", required=False)]


class Outcome(msgspec.Struct, frozen=True):
    status: int
    body: bytes  # encoded JSON
    replayed: bool = False


def check_key(key: str | None) -> str | None:
    if key is None:
        return None
    if not KEY_PATTERN.fullmatch(key):
        raise ValidationFailed(
            "Idempotency-Key must be 1-128 printable ASCII characters",
            code="idempotency.invalid_key",
            details=[{"field": "Idempotency-Key", "message": "1-128 printable ASCII characters"}],
        )
    return key


def key_mismatch() -> ValidationFailed:
    """422 for a key repeated with another request (the hot paths' form, naming the header)."""
    return ValidationFailed(
        "This Idempotency-Key was used with a different request",
        code="idempotency.mismatch",
        details=[{"field": "Idempotency-Key", "message": "used with a different request"}],
    )


async def run_idempotent(
    conn: asyncpg.Connection,
    *,
    user_id: int,
    scope: str,
    key: str | None,
    request: Any,
    work: Callable[[], Awaitable[tuple[int, Any]]],
) -> Outcome:
    """Run `work` (returning status and a msgspec-encodable body) once per (user, scope, key), in one transaction."""
    key = check_key(key)
    async with conn.transaction():
        if key is None:
            status, body = await work()
            return Outcome(status, msgspec.json.encode(body))
        digest = hashlib.sha256(msgspec.json.encode(request, order="sorted")).digest()
        await conn.execute(
            "select pg_advisory_xact_lock(hashtextextended($1, 0))", f"idem:{scope}:{user_id}:{key}"
        )
        row = await conn.fetchrow(
            """select request_hash, response_status, response_body from idempotency_keys
               where user_id = $1 and scope = $2 and key = $3""",
            user_id,
            scope,
            key,
        )
        if row is not None:
            if bytes(row["request_hash"]) != digest:
                raise ValidationFailed(
                    "This Idempotency-Key was used with a different request", code="idempotency.mismatch"
                )
            return Outcome(row["response_status"], bytes(row["response_body"]), replayed=True)
        status, result = await work()
        body = msgspec.json.encode(result)
        await conn.execute(
            """insert into idempotency_keys (user_id, scope, key, request_hash, response_status, response_body)
               values ($1, $2, $3, $4, $5, $6)""",
            user_id,
            scope,
            key,
            digest,
            status,
            body,
        )
        return Outcome(status, body)


def idempotent_response(outcome: Outcome) -> Response:
    """The stored bytes as the response; a replay says so in a header."""
    headers = {"Idempotent-Replayed": "true"} if outcome.replayed else None
    return Response(outcome.body, status_code=outcome.status, headers=headers, media_type="application/json")

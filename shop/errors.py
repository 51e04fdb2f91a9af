"""Domain errors carry their code and HTTP status; one handler renders every error the same way."""

from __future__ import annotations

import errno
import logging
import re
import socket
from typing import Any

import asyncpg
from litestar import Request, Response
from litestar.exceptions import (
    HTTPException,
    MethodNotAllowedException,
    NotAuthorizedException,
    NotFoundException,
    PermissionDeniedException,
    ValidationException,
)
from redis.exceptions import AuthenticationError as RedisAuthenticationError
from redis.exceptions import ClusterDownError, SlotNotCoveredError, TryAgainError
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import ReadOnlyError as RedisReadOnlyError
from redis.exceptions import TimeoutError as RedisTimeoutError

log = logging.getLogger("shop.errors")


class ShopError(Exception):
    """A refusal the client can act on: rendered as {"error": {"code", "message"}} with `status`."""

    status: int = 400
    code: str = "bad_request"

    def __init__(
        self,
        message: str,
        *,
        code: str | None = None,
        status: int | None = None,
        details: list[dict[str, str]] | None = None,
        headers: dict[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.message = message
        if code is not None:
            self.code = code
        if status is not None:
            self.status = status
        self.details = details
        self.headers = headers


class BadRequest(ShopError):
    status, code = 400, "bad_request"


class Unauthorized(ShopError):
    status, code = 401, "unauthorized"


class Forbidden(ShopError):
    status, code = 403, "forbidden"


class NotFound(ShopError):
    status, code = 404, "not_found"


class Conflict(ShopError):
    status, code = 409, "conflict"


class ValidationFailed(ShopError):
    status, code = 422, "validation_failed"


class RateLimited(ShopError):
    status, code = 429, "rate_limited"

    def __init__(self, message: str = "Too many requests", *, retry_after: int = 1, code: str | None = None):
        super().__init__(message, code=code, headers={"Retry-After": str(max(1, retry_after))})


class Unavailable(ShopError):
    status, code = 503, "unavailable"


def error_body(code: str, message: str, details: list[dict[str, str]] | None = None) -> dict[str, Any]:
    err: dict[str, Any] = {"code": code, "message": message}
    if details is not None:
        err["details"] = details
    return {"error": err}


_NAMED_FIELD = re.compile(r"(?:missing required|unknown) field `([^`]+)`")


def validation_details(extra: Any) -> list[dict[str, str]]:
    details = []
    for item in extra if isinstance(extra, list) else []:
        if isinstance(item, dict):
            key = item.get("key") or item.get("source") or ""
            message = str(item.get("message", "invalid"))
            # msgspec messages end with " - at `$.field`": expose the field path on its own.
            field = "body" if key == "data" else str(key)  # Litestar names the request body "data"
            if " - at `$." in message:
                message, _, path = message.partition(" - at `$.")
                field = path.rstrip("`")
            elif " - at `$`" in message:
                message = message.partition(" - at `$`")[0]
                field = "body"
            # "Object missing required field `x`" / "contains unknown field `x`": the field is x.
            named = _NAMED_FIELD.search(message)
            if named is not None:
                field = named[1] if field in ("body", "") else f"{field}.{named[1]}"
            details.append({"field": field or "body", "message": message})
    return details or [{"field": "body", "message": "invalid request"}]


# A store the request needs could not be reached or did not answer in time (down, restarting,
# failing over, out of connections): the request may well succeed if it is tried again. Errors
# that say something about the request or the code (a cancelled statement, a protocol violation,
# a refused password, a file error) are not among them: they stay 500s.
OUTAGES = (
    ConnectionError,  # refused, reset, broken pipe (the builtin: an OSError of the socket)
    TimeoutError,  # a client-side deadline: the pool's command timeout, a batch's deadline
    asyncpg.PostgresConnectionError,
    asyncpg.CannotConnectNowError,
    asyncpg.AdminShutdownError,
    asyncpg.CrashShutdownError,
    asyncpg.TooManyConnectionsError,
    RedisConnectionError,
    RedisTimeoutError,
    RedisReadOnlyError,  # a replica promoted, the client still on the old primary
    ClusterDownError,  # a Redis Cluster shard failing over
    SlotNotCoveredError,  # a Redis Cluster slot map not (yet) covering every slot
    TryAgainError,
)
NOT_OUTAGES = (asyncpg.ProtocolViolationError, RedisAuthenticationError)
# The bare OSErrors of a connect that could not reach the host at all.
UNREACHABLE = {errno.EHOSTUNREACH, errno.ENETUNREACH, errno.EHOSTDOWN, errno.ENETDOWN}


def is_outage(exc: BaseException) -> bool:
    if isinstance(exc, OUTAGES):
        return not isinstance(exc, NOT_OUTAGES)
    if isinstance(exc, socket.gaierror):  # DNS: a temporary failure (a name that does not exist is a 500)
        return exc.errno == socket.EAI_AGAIN
    if not isinstance(exc, OSError):
        return False
    # asyncio's connect to a name with several addresses, each refused or unreachable
    return exc.errno in UNREACHABLE or (exc.errno is None and str(exc).startswith("Multiple exceptions: "))


def outage_error(exc: BaseException) -> ShopError | None:
    """503 `service_unavailable` with Retry-After for an outage of PostgreSQL or Redis (logged as
    a warning with its traceback), None for anything else."""
    if not is_outage(exc):
        return None
    log.warning("a store is unavailable: %s", type(exc).__name__, exc_info=exc)
    return Unavailable(
        "The shop cannot reach its data right now; try again shortly",
        code="service_unavailable",
        headers={"Retry-After": "1"},
    )


BIGINT_MAX = 2**63 - 1


async def unaddressable_ids_name_nothing(request: Request) -> None:
    """Every route's `before_request`: an integer path parameter that PostgreSQL's bigint cannot
    hold is passed on as 0, which no row has, so the route answers with its own not-found (as for
    any unknown id) instead of asyncpg refusing to encode it (a 500)."""
    params = request.path_params
    for name, value in params.items():
        if type(value) is int and not -BIGINT_MAX <= value <= BIGINT_MAX:
            params[name] = 0


def render_error(request: Request, exc: Exception) -> Response:
    """The one exception handler: domain errors, framework errors, outages, and anything unexpected."""
    exc = outage_error(exc) or exc
    if isinstance(exc, ShopError):
        return Response(
            error_body(exc.code, exc.message, exc.details), status_code=exc.status, headers=exc.headers
        )
    if isinstance(exc, ValidationException):
        details = validation_details(exc.extra)
        message = "; ".join(f"{d['field']}: {d['message']}" for d in details)
        return Response(error_body("validation_failed", message, details), status_code=422)
    if isinstance(exc, NotFoundException):
        return Response(error_body("not_found", "No such resource"), status_code=404)
    if isinstance(exc, MethodNotAllowedException):
        return Response(
            error_body("method_not_allowed", "Method not allowed"),
            status_code=405,
            headers=exc.headers or None,
        )
    if isinstance(exc, NotAuthorizedException):
        return Response(error_body("unauthorized", exc.detail or "Authentication required"), status_code=401)
    if isinstance(exc, PermissionDeniedException):
        return Response(error_body("forbidden", exc.detail or "Forbidden"), status_code=403)
    if isinstance(exc, HTTPException) and exc.status_code == 400:
        # Malformed JSON and the like: bad input, reported like any other validation failure.
        detail = exc.detail or "invalid request"
        return Response(
            error_body("validation_failed", detail, [{"field": "body", "message": detail}]), status_code=422
        )
    if isinstance(exc, HTTPException) and exc.status_code < 500:
        code = {413: "payload_too_large", 415: "unsupported_media_type", 429: "rate_limited"}.get(
            exc.status_code, "bad_request"
        )
        return Response(error_body(code, exc.detail or "Bad request"), status_code=exc.status_code)
    log.exception("unhandled error on %s %s", request.method, request.url.path, exc_info=exc)
    return Response(error_body("internal_error", "Internal server error"), status_code=500)

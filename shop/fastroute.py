"""Crowd routes served straight from ASGI, in front of Litestar's router.

During a live-stream rush a couple of routes (the flash-sale buy call, a game's draw) take nearly
all the traffic, and per request Litestar's routing, kwargs model, dependency resolution and
response machinery cost more CPU than the purchase or draw itself (a py-spy profile of `shop
serve` under wrk: the framework ~85% of the request's Python time, the shop's code ~15%). A
`FastRoute` does the same work as its Litestar route, through one shared core, with the same
auth, body validation, Idempotency-Key check, answers and error envelope; the Litestar route stays
the documented one (OpenAPI) and serves the call when `SHOP_FAST_ROUTES=false`. The observability
wrapper around this one still gives every call its request id, metrics and log line.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from typing import Any, TypeVar

import msgspec
from litestar.types import ASGIApp, Receive, Scope, Send

from shop.auth import client_ip_of
from shop.auth_tokens import AuthUser, shopper_of
from shop.errors import ShopError, error_body, outage_error, validation_details
from shop.idempotency import check_key

log = logging.getLogger("shop.fastroute")

MAX_BODY = 4096  # the crowd routes' bodies are a few hundred bytes
JSON_HEADERS = [(b"content-type", b"application/json")]
T = TypeVar("T")


@dataclass(slots=True)
class Call:
    """One request to a fast route: what the handlers need, taken from the ASGI scope."""

    state: Any
    scope: Scope
    receive: Receive
    params: tuple[int, ...]
    authorization: str = ""
    idempotency_key: str | None = None
    forwarded_for: str = ""

    def shopper(self) -> AuthUser:
        """The shopper the bearer token proves, or 401."""
        return shopper_of(self.state.settings, self.authorization)

    def key(self) -> str | None:
        """The Idempotency-Key header, checked (422 when malformed)."""
        return check_key(self.idempotency_key)

    def client_ip(self) -> str:
        client = self.scope.get("client")
        return client_ip_of(client[0] if client else "", self.forwarded_for, self.state.settings)

    async def body(self, decoder: msgspec.json.Decoder[T], *, empty: T | None = None) -> T:
        """The JSON body as `decoder`'s type (422 like Litestar's validation); `empty` when none is sent."""
        raw = await _read_body(self.receive)
        if empty is not None and (raw == b"" or raw.strip() == b"null"):  # no body, as Litestar reads it
            return empty
        try:
            return decoder.decode(raw)
        except msgspec.ValidationError as exc:
            details = validation_details([{"message": str(exc), "key": "body"}])
        except msgspec.DecodeError:
            details = [{"field": "body", "message": "malformed JSON"}]
        message = "; ".join(f"{d['field']}: {d['message']}" for d in details)
        raise ShopError(message, code="validation_failed", status=422, details=details)


@dataclass(frozen=True, slots=True)
class Answer:
    """A fast route's response: status, extra headers and the encoded JSON body."""

    status: int
    body: bytes
    headers: Sequence[tuple[bytes, bytes]] = ()


Handler = Callable[[Call], Awaitable[Answer]]


@dataclass(frozen=True)
class FastRoute:
    method: str
    pattern: re.Pattern[str]  # fullmatch on the path; its groups are the integer path parameters
    template: str  # the route as Litestar documents it (metrics label)
    handler: Handler


def fast_routes(routes: Sequence[FastRoute]) -> Callable[[ASGIApp], ASGIApp]:
    """Middleware: requests matching one of `routes` go to its handler, the rest to `app`."""

    def middleware(app: ASGIApp) -> ASGIApp:
        async def wrapped(scope: Scope, receive: Receive, send: Send) -> None:
            if scope["type"] == "http" and scope["app"].state.settings.fast_routes:
                for route in routes:
                    if route.method == scope["method"]:
                        match = route.pattern.fullmatch(scope["path"])
                        if match is not None:
                            scope["path_template"] = route.template
                            await _serve(route, scope, receive, send, tuple(int(g) for g in match.groups()))
                            return
            await app(scope, receive, send)

        return wrapped

    return middleware


async def _serve(
    route: FastRoute, scope: Scope, receive: Receive, send: Send, params: tuple[int, ...]
) -> None:
    call = Call(scope["app"].state, scope, receive, params)
    for name, value in scope["headers"]:  # a repeated header counts once, its first value (as Litestar)
        if name == b"authorization":
            call.authorization = call.authorization or value.decode("latin-1")
        elif name == b"idempotency-key":
            if call.idempotency_key is None:
                call.idempotency_key = value.decode("latin-1")
        elif name == b"x-forwarded-for":
            call.forwarded_for = call.forwarded_for or value.decode("latin-1")
    try:
        answer = await route.handler(call)
        status, body = answer.status, answer.body
        headers = [*JSON_HEADERS, *answer.headers] if answer.headers else JSON_HEADERS
    except Exception as caught:
        exc = caught if isinstance(caught, ShopError) else outage_error(caught)
        if exc is None:
            log.exception("unhandled error on %s %s", scope["method"], scope["path"])
            exc = ShopError("Internal server error", code="internal_error", status=500)
        status, body = exc.status, msgspec.json.encode(error_body(exc.code, exc.message, exc.details))
        headers = JSON_HEADERS
        if exc.headers:
            headers = [*JSON_HEADERS, *((k.lower().encode(), v.encode()) for k, v in exc.headers.items())]
    headers = [*headers, (b"content-length", str(len(body)).encode())]
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": body})


async def _read_body(receive: Receive) -> bytes:
    chunks: list[bytes] = []
    size = 0
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            raise ShopError("The client went away", code="bad_request", status=400)
        chunk = message.get("body", b"")
        size += len(chunk)
        if size > MAX_BODY:
            raise ShopError("Request body too large", code="payload_too_large", status=413)
        chunks.append(chunk)
        if not message.get("more_body", False):
            return b"".join(chunks)


REPLAYED = ((b"idempotent-replayed", b"true"),)


def created(value: Any, replayed: bool = False) -> Answer:
    """201 with the value encoded, marked as a replay when it is one."""
    return Answer(201, msgspec.json.encode(value), REPLAYED if replayed else ())

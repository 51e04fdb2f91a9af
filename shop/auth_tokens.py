"""JWT access tokens and the `user` / `admin` dependencies that require them.

Shopper and merchant tokens differ in audience, so one is never accepted where the other is
expected. Keys are chosen by the `kid` header among SHOP_JWT_KEYS, so keys can rotate.
"""

from __future__ import annotations

import time

import jwt
import msgspec
from litestar import Request

from shop.errors import Unauthorized
from shop.settings import Settings

ALGORITHMS = ["HS256"]  # fixed allow-list: never taken from the token
AUD_SHOPPER = "shop-api"
AUD_ADMIN = "shop-admin"


class AuthUser(msgspec.Struct, frozen=True):
    id: int


class AuthAdmin(msgspec.Struct, frozen=True):
    id: int
    username: str


def issue_access_token(settings: Settings, subject: int, audience: str, **claims: object) -> str:
    now = int(time.time())
    payload = {
        "sub": str(subject),
        "iss": settings.jwt_issuer,
        "aud": audience,
        "iat": now,
        "exp": now + settings.access_token_ttl,
        **claims,
    }
    kid = settings.signing_kid
    return jwt.encode(payload, settings.jwt_key_map[kid], algorithm="HS256", headers={"kid": kid})


# Verified tokens by (token, audience, keys, issuer): a shopper sends the same token many times,
# and PyJWT's full check costs ~60 µs. Only `exp` is re-checked on a hit; the signature and the
# other claims cannot change for the same token string and keys.
_VERIFIED: dict[tuple[str, str, str, str], dict] = {}
_VERIFIED_MAX = 100_000


def decode_access_token(settings: Settings, token: str, audience: str) -> dict:
    cache_key = (token, audience, settings.jwt_keys, settings.jwt_issuer)
    claims = _VERIFIED.get(cache_key)
    if claims is not None:
        if claims["exp"] > time.time():
            return claims
        del _VERIFIED[cache_key]
    claims = _verify_access_token(settings, token, audience)
    if len(_VERIFIED) >= _VERIFIED_MAX:
        _VERIFIED.clear()
    _VERIFIED[cache_key] = claims
    return claims


def _verify_access_token(settings: Settings, token: str, audience: str) -> dict:
    try:
        header = jwt.get_unverified_header(token)
    except jwt.PyJWTError as exc:
        raise Unauthorized("Malformed token", code="auth.invalid_token") from exc
    key = settings.jwt_key_map.get(str(header.get("kid")))
    if key is None:
        raise Unauthorized("Unknown signing key", code="auth.invalid_token")
    try:
        return jwt.decode(
            token,
            key,
            algorithms=ALGORITHMS,
            audience=audience,
            issuer=settings.jwt_issuer,
            options={"require": ["exp", "iat", "iss", "aud", "sub"]},
        )
    except jwt.ExpiredSignatureError as exc:
        raise Unauthorized("Token expired", code="auth.token_expired") from exc
    except jwt.PyJWTError as exc:
        raise Unauthorized("Invalid token", code="auth.invalid_token") from exc


def bearer_token(header: str) -> str:
    """The token of an `Authorization: Bearer …` header value; 401 `auth.required` otherwise."""
    scheme, _, token = header.partition(" ")
    if scheme.lower() != "bearer" or not token.strip():
        raise Unauthorized("Missing bearer token", code="auth.required")
    return token.strip()


def _bearer(request: Request) -> str:
    return bearer_token(request.headers.get("authorization", ""))


def shopper_of(settings: Settings, authorization: str) -> AuthUser:
    """The shopper an Authorization header value proves, or 401."""
    claims = decode_access_token(settings, bearer_token(authorization), AUD_SHOPPER)
    try:
        return AuthUser(id=int(claims["sub"]))
    except ValueError as exc:
        raise Unauthorized("Invalid token", code="auth.invalid_token") from exc


async def provide_user(request: Request) -> AuthUser:
    return shopper_of(request.app.state.settings, request.headers.get("authorization", ""))


async def provide_admin(request: Request) -> AuthAdmin:
    claims = decode_access_token(request.app.state.settings, _bearer(request), AUD_ADMIN)
    try:
        return AuthAdmin(id=int(claims["sub"]), username=str(claims.get("username", "")))
    except ValueError as exc:
        raise Unauthorized("Invalid token", code="auth.invalid_token") from exc


async def admin_guard(connection, _handler) -> None:
    """Controller-level guard for /api/v1/admin/*: a merchant token of an account that is still active."""
    claims = decode_access_token(connection.app.state.settings, _bearer(connection), AUD_ADMIN)
    try:
        admin_id = int(claims["sub"])
    except ValueError as exc:
        raise Unauthorized("Invalid token", code="auth.invalid_token") from exc
    # A disabled account loses access at once, not when its access token expires.
    active = await connection.app.state.pool.fetchval("select is_active from admins where id = $1", admin_id)
    if not active:
        raise Unauthorized("This merchant account is disabled or gone", code="auth.account_disabled")

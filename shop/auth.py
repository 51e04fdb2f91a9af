"""Shopper login (WeChat mini-program code or the dev provider), rotating refresh tokens, merchant login.

Access tokens are short-lived JWTs (shop.auth_tokens). Refresh tokens are opaque random strings
stored as SHA-256 hashes; every refresh spends the presented token and issues its successor in the
same family, and presenting a spent token again revokes the whole family (a stolen copy was used).
"""

from __future__ import annotations

import asyncio
import hashlib
import ipaddress
import secrets
import uuid
from datetime import datetime
from functools import lru_cache
from typing import Annotated, Literal

import asyncpg
import msgspec
from litestar import Controller, Request, get, post

from shop import wechat
from shop.auth_tokens import (
    AUD_ADMIN,
    AUD_SHOPPER,
    AuthAdmin,
    admin_guard,
    issue_access_token,
)
from shop.errors import BadRequest, Forbidden, RateLimited, Unauthorized
from shop.passwords import DUMMY_HASH, verify_password
from shop.schemas import Schema
from shop.settings import Settings

DEV_APPID = "dev"
# Failed or not, every merchant login attempt counts: a crowd of parallel guesses gets the same 429.
ADMIN_LOGIN_LIMIT = 10
ADMIN_LOGIN_WINDOW = 60  # seconds
# Advisory lock class for "one unionid at a time" (two-int key space, apart from shop.migrate's lock).
UNIONID_LOCK_CLASS = 7_420_002

LoginCode = Annotated[str, msgspec.Meta(min_length=1, max_length=128, pattern=r"^[A-Za-z0-9_-]+$")]
AppId = Annotated[str, msgspec.Meta(min_length=1, max_length=64, pattern=r"^[A-Za-z0-9_-]+$")]
# `\Z`, not `$`: `$` also matches before a trailing newline.
Channel = Annotated[str, msgspec.Meta(min_length=1, max_length=64, pattern=r"^[\w.:-]+\Z")]
RefreshTokenText = Annotated[str, msgspec.Meta(min_length=20, max_length=128)]


class LoginRequest(Schema):
    provider: Literal["wechat", "dev"]
    code: LoginCode
    inviter_id: Annotated[int, msgspec.Meta(ge=1)] | None = None
    channel: Channel | None = None
    # The mini-program the code came from; when sent it must be the one this shop serves.
    appid: AppId | None = None


class LoginUser(Schema):
    id: int
    nickname: str
    avatar_url: str
    is_new: bool


class TokenPair(Schema):
    access_token: str
    token_type: str
    expires_in: int
    refresh_token: str
    refresh_expires_in: int


class LoginResponse(TokenPair):
    user: LoginUser


class RefreshRequest(Schema):
    refresh_token: RefreshTokenText


class AdminLoginRequest(Schema):
    username: Annotated[str, msgspec.Meta(min_length=1, max_length=64)]
    password: Annotated[str, msgspec.Meta(min_length=1, max_length=256)]


class AdminProfile(Schema):
    id: int
    username: str
    last_login_at: datetime | None = None


class AdminLoginResponse(Schema):
    access_token: str
    token_type: str
    expires_in: int
    admin: AdminProfile


# --- SQL ---------------------------------------------------------------------------------------

SELECT_IDENTITY = """
select user_id, unionid from user_identities where provider = $1 and appid = $2 and openid = $3
"""
# A unionid appears once the mini-program is bound to an Open Platform account: fill it in then.
SET_IDENTITY_UNIONID = """
update user_identities set unionid = $4 where provider = $1 and appid = $2 and openid = $3 and unionid is null
"""
SELECT_UNIONID_OWNER = "select user_id from user_identities where unionid = $1 order by id limit 1"
LOCK_UNIONID = "select pg_advisory_xact_lock($1::int, hashtext($2))"
# An inviter that does not exist is dropped rather than failing the login.
INSERT_USER = """
insert into users (inviter_id, channel) values ((select id from users where id = $1), $2) returning id
"""
INSERT_IDENTITY = """
insert into user_identities (user_id, provider, appid, openid, unionid) values ($1, $2, $3, $4, $5)
on conflict (provider, appid, openid) do nothing
returning user_id
"""
SELECT_LOGIN_USER = "select id, nickname, avatar_url from users where id = $1"
INSERT_REFRESH_TOKEN = """
insert into refresh_tokens (token_hash, family_id, user_id, expires_at)
values ($1, $2, $3, now() + make_interval(secs => $4))
"""
# The conditional UPDATE is the whole race: of two concurrent refreshes only one spends the token.
SPEND_REFRESH_TOKEN = """
update refresh_tokens set used_at = now()
where token_hash = $1 and used_at is null and revoked_at is null and expires_at > now()
returning family_id, user_id
"""
SELECT_REFRESH_TOKEN = """
select family_id, used_at, revoked_at, expires_at <= now() as expired from refresh_tokens where token_hash = $1
"""
REVOKE_FAMILY = "update refresh_tokens set revoked_at = now() where family_id = $1 and revoked_at is null"
REVOKE_FAMILY_OF_TOKEN = """
update refresh_tokens set revoked_at = now()
where family_id = (select family_id from refresh_tokens where token_hash = $1) and revoked_at is null
"""
SELECT_ADMIN_BY_USERNAME = "select id, username, password_hash, is_active from admins where username = $1"
TOUCH_ADMIN_LOGIN = "update admins set last_login_at = now() where id = $1 returning last_login_at"
SELECT_ADMIN = "select id, username, is_active, last_login_at from admins where id = $1"


# --- data functions ----------------------------------------------------------------------------


def hash_refresh_token(token: str) -> bytes:
    return hashlib.sha256(token.encode()).digest()


class _LostRace(Exception):
    """Another login created this identity first; our savepoint (and its new user) is rolled back."""


async def claim_identity(
    conn: asyncpg.Connection,
    *,
    provider: str,
    appid: str,
    openid: str,
    unionid: str | None,
    inviter_id: int | None,
    channel: str | None,
) -> tuple[int, bool]:
    """The user behind this identity, creating it on first login; returns (user_id, is_new). Call in a transaction."""
    found = await conn.fetchrow(SELECT_IDENTITY, provider, appid, openid)
    if found is not None:
        if unionid and found["unionid"] is None:
            await conn.execute(SET_IDENTITY_UNIONID, provider, appid, openid, unionid)
        return found["user_id"], False
    owner = None
    if unionid:
        # Serialise first logins of one unionid from different mini-programs: one shopper, one user.
        await conn.execute(LOCK_UNIONID, UNIONID_LOCK_CLASS, unionid)
        owner = await conn.fetchval(SELECT_UNIONID_OWNER, unionid)
    try:
        async with conn.transaction():
            user_id = owner or await conn.fetchval(INSERT_USER, inviter_id, channel)
            # A concurrent first login with the same code waits here on the unique index.
            claimed = await conn.fetchval(INSERT_IDENTITY, user_id, provider, appid, openid, unionid)
            if claimed is None:
                raise _LostRace
    except _LostRace:
        return await conn.fetchval(SELECT_IDENTITY, provider, appid, openid), False
    return user_id, owner is None


async def insert_refresh_token(
    conn: asyncpg.Connection, settings: Settings, user_id: int, family_id: uuid.UUID
) -> str:
    token = secrets.token_urlsafe(32)
    await conn.execute(
        INSERT_REFRESH_TOKEN, hash_refresh_token(token), family_id, user_id, settings.refresh_token_ttl
    )
    return token


# --- services ----------------------------------------------------------------------------------


def _token_pair_fields(settings: Settings, user_id: int, refresh_token: str) -> dict:
    return {
        "access_token": issue_access_token(settings, user_id, AUD_SHOPPER),
        "token_type": "Bearer",
        "expires_in": settings.access_token_ttl,
        "refresh_token": refresh_token,
        "refresh_expires_in": settings.refresh_token_ttl,
    }


async def resolve_login_identity(settings: Settings, data: LoginRequest) -> tuple[str, str, str | None]:
    """(appid, openid, unionid) for the login code; network calls happen here, outside any transaction."""
    if data.provider == "dev":
        if settings.env == "production":
            raise Forbidden("The dev login provider is disabled in production", code="auth.provider_disabled")
        if data.appid not in (None, DEV_APPID):
            raise BadRequest("The dev provider serves appid 'dev' only", code="auth.unknown_appid")
        # Stable and readable: the same code is always the same shopper.
        return DEV_APPID, f"dev_{data.code}", None
    if data.appid is not None and data.appid != settings.wechat_appid:
        raise BadRequest("This shop does not serve that mini-program", code="auth.unknown_appid")
    session = await wechat.code2session(settings, data.code)
    return settings.wechat_appid, session.openid, session.unionid


async def login_shopper(conn: asyncpg.Connection, settings: Settings, data: LoginRequest) -> LoginResponse:
    """Log a shopper in with a mini-program login code, creating the user on first login."""
    appid, openid, unionid = await resolve_login_identity(settings, data)
    async with conn.transaction():
        user_id, is_new = await claim_identity(
            conn,
            provider=data.provider,
            appid=appid,
            openid=openid,
            unionid=unionid,
            inviter_id=data.inviter_id,
            channel=data.channel,
        )
        if is_new:
            from shop.coupons.service import grant_newcomer_coupons

            await grant_newcomer_coupons(conn, user_id)
        row = await conn.fetchrow(SELECT_LOGIN_USER, user_id)
        refresh_token = await insert_refresh_token(conn, settings, user_id, uuid.uuid4())
    return LoginResponse(
        **_token_pair_fields(settings, user_id, refresh_token),
        user=LoginUser(id=row["id"], nickname=row["nickname"], avatar_url=row["avatar_url"], is_new=is_new),
    )


async def refresh_session(conn: asyncpg.Connection, settings: Settings, token: str) -> TokenPair:
    """Spend a refresh token for a new pair; a token presented twice revokes its whole family."""
    token_hash = hash_refresh_token(token)
    async with conn.transaction():
        spent = await conn.fetchrow(SPEND_REFRESH_TOKEN, token_hash)
        if spent is not None:
            successor = await insert_refresh_token(conn, settings, spent["user_id"], spent["family_id"])
            return TokenPair(**_token_pair_fields(settings, spent["user_id"], successor))
    # Refused: find out why outside the transaction, so a revocation commits before we answer.
    row = await conn.fetchrow(SELECT_REFRESH_TOKEN, token_hash)
    if row is None:
        raise Unauthorized("Invalid refresh token", code="auth.invalid_refresh_token")
    if row["revoked_at"] is not None:
        raise Unauthorized("Refresh token revoked", code="auth.refresh_token_revoked")
    if row["used_at"] is not None:
        await conn.execute(REVOKE_FAMILY, row["family_id"])
        raise Unauthorized(
            "Refresh token already used; the session has been revoked", code="auth.refresh_token_reused"
        )
    raise Unauthorized("Refresh token expired", code="auth.refresh_token_expired")


async def logout_session(conn: asyncpg.Connection, token: str) -> None:
    """Revoke every refresh token of the presented token's login; unknown tokens are a no-op."""
    await conn.execute(REVOKE_FAMILY_OF_TOKEN, hash_refresh_token(token))


async def login_admin(
    conn: asyncpg.Connection, settings: Settings, data: AdminLoginRequest
) -> AdminLoginResponse:
    """Check a merchant's password; unknown user and wrong password are indistinguishable."""
    row = await conn.fetchrow(SELECT_ADMIN_BY_USERNAME, data.username)
    # scrypt is deliberately slow: keep it off the event loop, and run it for unknown users too.
    ok = await asyncio.to_thread(
        verify_password, data.password, row["password_hash"] if row is not None else DUMMY_HASH
    )
    if row is None or not ok:
        raise Unauthorized("Wrong username or password", code="auth.invalid_credentials")
    if not row["is_active"]:
        raise Forbidden("This merchant account is disabled", code="auth.account_disabled")
    last_login_at = await conn.fetchval(TOUCH_ADMIN_LOGIN, row["id"])
    token = issue_access_token(settings, row["id"], AUD_ADMIN, username=row["username"])
    return AdminLoginResponse(
        access_token=token,
        token_type="Bearer",
        expires_in=settings.access_token_ttl,
        admin=AdminProfile(id=row["id"], username=row["username"], last_login_at=last_login_at),
    )


@lru_cache(maxsize=8)
def _trusted_networks(raw: str) -> tuple[ipaddress.IPv4Network | ipaddress.IPv6Network, ...]:
    return tuple(ipaddress.ip_network(part.strip(), strict=False) for part in raw.split(",") if part.strip())


@lru_cache(maxsize=4096)
def _is_trusted(host: str, networks: tuple) -> bool:
    try:
        address = ipaddress.ip_address(host)
    except ValueError:
        return False
    return any(address in network for network in networks)


def client_ip(request: Request, settings: Settings) -> str:
    """The caller's address: X-Forwarded-For is believed only as far as it was added by trusted proxies."""
    peer = request.client.host if request.client else ""
    return client_ip_of(peer, request.headers.get("x-forwarded-for", ""), settings)


def client_ip_of(peer: str, forwarded_for: str, settings: Settings) -> str:
    """`client_ip` from the peer address and the X-Forwarded-For header value."""
    if not settings.trusted_proxies:
        return peer
    networks = _trusted_networks(settings.trusted_proxies)
    if not _is_trusted(peer, networks):
        return peer
    hops = [hop.strip() for hop in forwarded_for.split(",") if hop.strip()]
    for hop in reversed(hops):
        if not _is_trusted(hop, networks):
            return hop
    return hops[0] if hops else peer


async def count_admin_login_attempt(request: Request, settings: Settings) -> None:
    """Fixed-window limit per client IP; INCR first, so parallel guesses cannot slip past a check."""
    key = request.app.state.redis_keys.login_bucket(client_ip(request, settings))
    async with request.app.state.redis.pipeline(transaction=True) as pipe:
        pipe.incr(key)
        pipe.expire(key, ADMIN_LOGIN_WINDOW, nx=True)
        pipe.ttl(key)
        attempts, _, ttl = await pipe.execute()
    if attempts > ADMIN_LOGIN_LIMIT:
        raise RateLimited("Too many login attempts", retry_after=ttl, code="auth.too_many_attempts")


# --- routes ------------------------------------------------------------------------------------


class ShopperAuthController(Controller):
    path = "/api/v1/auth"
    tags = ["auth"]

    @post("/login", status_code=200)
    async def login(self, request: Request, conn: asyncpg.Connection, data: LoginRequest) -> LoginResponse:
        """Log in with the wx.login code; the first login creates the shopper."""
        return await login_shopper(conn, request.app.state.settings, data)

    @post("/refresh", status_code=200)
    async def refresh(self, request: Request, conn: asyncpg.Connection, data: RefreshRequest) -> TokenPair:
        """Trade a refresh token for a new access token and a new refresh token."""
        return await refresh_session(conn, request.app.state.settings, data.refresh_token)

    @post("/logout", status_code=204)
    async def logout(self, conn: asyncpg.Connection, data: RefreshRequest) -> None:
        """Revoke the session the refresh token belongs to (access tokens expire on their own)."""
        await logout_session(conn, data.refresh_token)


class AdminAuthController(Controller):
    # No controller guard: logging in is how a merchant gets a token. `me` is guarded itself.
    path = "/api/v1/admin/auth"
    tags = ["admin-auth"]

    @post("/login", status_code=200)
    async def login(
        self, request: Request, conn: asyncpg.Connection, data: AdminLoginRequest
    ) -> AdminLoginResponse:
        """Merchant login with username and password."""
        settings = request.app.state.settings
        await count_admin_login_attempt(request, settings)
        return await login_admin(conn, settings, data)

    @get("/me", guards=[admin_guard])
    async def me(self, conn: asyncpg.Connection, admin: AuthAdmin) -> AdminProfile:
        """The merchant the token belongs to."""
        row = await conn.fetchrow(SELECT_ADMIN, admin.id)
        if row is None or not row["is_active"]:
            raise Unauthorized("This merchant account is disabled", code="auth.account_disabled")
        return AdminProfile(id=row["id"], username=row["username"], last_login_at=row["last_login_at"])

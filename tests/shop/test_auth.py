"""Shopper login (dev provider), refresh rotation and reuse detection, logout, merchant login."""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
from collections.abc import AsyncIterator

import httpx
import msgspec

from shop.app import create_app
from shop.cli import create_admin
from shop.settings import Settings
from tests.conftest import running
from tests.fakes import wechatpay as fakes

PROD_JWT_KEYS = "prod1:" + "p" * 40
fake_wechatpay_server = fakes.fake_wechatpay_server  # a production app needs its payment provider
fake_wechatpay = fakes.fake_wechatpay


@contextlib.asynccontextmanager
async def client_for(settings: Settings) -> AsyncIterator[httpx.AsyncClient]:
    """A client on an app built with other settings (production, rotated keys, another appid)."""
    app = create_app(settings)
    async with running(app):
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://shop.test") as client:
            yield client


async def dev_login(client: httpx.AsyncClient, code: str, **extra: object) -> httpx.Response:
    return await client.post("/api/v1/auth/login", json={"provider": "dev", "code": code, **extra})


def bearer(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


# --- shopper login -----------------------------------------------------------------------------


async def test_first_dev_login_creates_the_shopper_and_the_next_recognises_them(client, db, settings):
    first = await dev_login(client, "alice")
    assert first.status_code == 200, first.text
    body = first.json()
    assert body["token_type"] == "Bearer"
    assert body["expires_in"] == settings.access_token_ttl
    assert body["refresh_expires_in"] == settings.refresh_token_ttl
    assert body["user"] == {"id": body["user"]["id"], "nickname": "", "avatar_url": "", "is_new": True}
    user_id = body["user"]["id"]
    identity = await db.fetchrow("select * from user_identities where user_id = $1", user_id)
    assert (identity["provider"], identity["appid"], identity["openid"]) == ("dev", "dev", "dev_alice")
    # Only the hash of the refresh token is stored.
    stored = await db.fetchrow("select * from refresh_tokens where user_id = $1", user_id)
    assert bytes(stored["token_hash"]) == hashlib.sha256(body["refresh_token"].encode()).digest()
    assert stored["used_at"] is None and stored["revoked_at"] is None

    again = await dev_login(client, "alice")
    assert again.status_code == 200
    assert again.json()["user"]["id"] == user_id
    assert again.json()["user"]["is_new"] is False
    assert await db.fetchval("select count(*) from users") == 1
    # Each login is its own refresh family (logging out one device leaves the other).
    assert await db.fetchval("select count(distinct family_id) from refresh_tokens") == 2

    me = await client.get("/api/v1/me", headers=bearer(body["access_token"]))
    assert me.status_code == 200
    assert me.json()["id"] == user_id


async def test_first_login_records_inviter_and_channel_and_later_logins_do_not_change_them(client, db):
    inviter = (await dev_login(client, "inviter")).json()["user"]["id"]
    r = await dev_login(client, "bob", inviter_id=inviter, channel="poster_2024")
    assert r.status_code == 200
    bob = r.json()["user"]["id"]
    await dev_login(client, "bob", inviter_id=bob, channel="moments")
    row = await db.fetchrow("select inviter_id, channel from users where id = $1", bob)
    assert (row["inviter_id"], row["channel"]) == (inviter, "poster_2024")

    # An inviter that does not exist is dropped rather than failing the login.
    r = await dev_login(client, "carol", inviter_id=999_999)
    assert r.status_code == 200
    assert await db.fetchval("select inviter_id from users where id = $1", r.json()["user"]["id"]) is None


async def test_login_rejects_unknown_fields_and_bad_values(client, db):
    for body in (
        {"provider": "dev", "code": "x", "nickname": "sneaky"},
        {"provider": "qq", "code": "x"},
        {"provider": "dev", "code": ""},
        {"provider": "dev", "code": "has space"},
        {"provider": "dev"},
        {"provider": "dev", "code": "x", "inviter_id": 0},
        {"provider": "dev", "code": "x", "channel": "bad\n"},
    ):
        r = await client.post("/api/v1/auth/login", json=body)
        assert r.status_code == 422, body
        assert r.json()["error"]["code"] == "validation_failed"
    r = await client.post("/api/v1/auth/login", json={"provider": "dev", "code": "x", "nickname": "sneaky"})
    assert "unknown field `nickname`" in r.json()["error"]["message"]
    assert await db.fetchval("select count(*) from users") == 0


async def test_dev_login_with_another_appid_is_refused(client, db):
    r = await dev_login(client, "alice", appid="wx1234567890")
    assert r.status_code == 400
    assert r.json()["error"]["code"] == "auth.unknown_appid"
    assert (await dev_login(client, "alice", appid="dev")).status_code == 200


async def test_concurrent_first_logins_with_one_code_create_one_shopper(client, db):
    responses = await asyncio.gather(*(dev_login(client, "race") for _ in range(8)))
    assert all(r.status_code == 200 for r in responses), [r.text for r in responses]
    assert len({r.json()["user"]["id"] for r in responses}) == 1
    assert sum(r.json()["user"]["is_new"] for r in responses) == 1
    assert await db.fetchval("select count(*) from users") == 1
    assert await db.fetchval("select count(*) from user_identities") == 1


async def test_dev_provider_is_refused_in_production(settings, db, fake_wechatpay):
    production = msgspec.structs.replace(
        fakes.wechatpay_settings(settings, fake_wechatpay), env="production", jwt_keys=PROD_JWT_KEYS
    )
    async with client_for(production) as client:
        r = await dev_login(client, "alice")
    assert r.status_code == 403
    assert r.json()["error"]["code"] == "auth.provider_disabled"
    assert await db.fetchval("select count(*) from users") == 0


# --- refresh and logout ------------------------------------------------------------------------


async def refresh(client: httpx.AsyncClient, token: str) -> httpx.Response:
    return await client.post("/api/v1/auth/refresh", json={"refresh_token": token})


async def test_refresh_rotates_the_token_within_its_family(client, db):
    login = (await dev_login(client, "alice")).json()
    r = await refresh(client, login["refresh_token"])
    assert r.status_code == 200, r.text
    pair = r.json()
    assert set(pair) == {"access_token", "token_type", "expires_in", "refresh_token", "refresh_expires_in"}
    assert pair["refresh_token"] != login["refresh_token"]
    rows = await db.fetch("select family_id, used_at, revoked_at from refresh_tokens order by id")
    assert len(rows) == 2
    assert rows[0]["family_id"] == rows[1]["family_id"]
    assert rows[0]["used_at"] is not None and rows[1]["used_at"] is None
    me = await client.get("/api/v1/me", headers=bearer(pair["access_token"]))
    assert me.json()["id"] == login["user"]["id"]
    # The successor is good for the next rotation.
    assert (await refresh(client, pair["refresh_token"])).status_code == 200


async def test_reusing_a_spent_refresh_token_revokes_the_whole_family(client, db):
    login = (await dev_login(client, "alice")).json()
    other_device = (await dev_login(client, "alice")).json()
    successor = (await refresh(client, login["refresh_token"])).json()["refresh_token"]

    reused = await refresh(client, login["refresh_token"])
    assert reused.status_code == 401
    assert reused.json()["error"]["code"] == "auth.refresh_token_reused"
    # The thief's or the victim's successor: either way that session is over.
    r = await refresh(client, successor)
    assert r.status_code == 401
    assert r.json()["error"]["code"] == "auth.refresh_token_revoked"
    family = await db.fetchval(
        "select family_id from refresh_tokens where token_hash = $1",
        hashlib.sha256(successor.encode()).digest(),
    )
    assert await db.fetchval(
        "select bool_and(revoked_at is not null) from refresh_tokens where family_id = $1", family
    )
    # Another login of the same shopper is a different family and keeps working.
    assert (await refresh(client, other_device["refresh_token"])).status_code == 200


async def test_concurrent_refreshes_of_one_token_let_exactly_one_through(client, db):
    login = (await dev_login(client, "alice")).json()
    responses = await asyncio.gather(*(refresh(client, login["refresh_token"]) for _ in range(5)))
    statuses = sorted(r.status_code for r in responses)
    assert statuses == [200, 401, 401, 401, 401], [r.text for r in responses]
    # The first loser finds the token spent and revokes the family; later ones may find it revoked.
    refused = {r.json()["error"]["code"] for r in responses if r.status_code == 401}
    assert "auth.refresh_token_reused" in refused
    assert refused <= {"auth.refresh_token_reused", "auth.refresh_token_revoked"}
    # Only one successor was ever issued. A second presentation is indistinguishable from theft,
    # so the family is revoked: clients must refresh one request at a time.
    assert await db.fetchval("select count(*) from refresh_tokens") == 2
    assert await db.fetchval("select count(*) from refresh_tokens where revoked_at is null") == 0


async def test_unknown_and_expired_refresh_tokens_are_refused(client, db):
    r = await refresh(client, "x" * 43)
    assert r.status_code == 401
    assert r.json()["error"]["code"] == "auth.invalid_refresh_token"

    login = (await dev_login(client, "alice")).json()
    await db.execute("update refresh_tokens set expires_at = now() - interval '1 second'")
    r = await refresh(client, login["refresh_token"])
    assert r.status_code == 401
    assert r.json()["error"]["code"] == "auth.refresh_token_expired"

    r = await client.post("/api/v1/auth/refresh", json={"refresh_token": "short"})
    assert r.status_code == 422
    r = await client.post("/api/v1/auth/refresh", json={"refresh_token": "x" * 43, "user_id": 1})
    assert r.status_code == 422


async def test_logout_revokes_the_session(client, db):
    login = (await dev_login(client, "alice")).json()
    other_device = (await dev_login(client, "alice")).json()
    successor = (await refresh(client, login["refresh_token"])).json()["refresh_token"]

    r = await client.post("/api/v1/auth/logout", json={"refresh_token": successor})
    assert r.status_code == 204
    r = await refresh(client, successor)
    assert r.status_code == 401
    assert r.json()["error"]["code"] == "auth.refresh_token_revoked"
    assert (await refresh(client, other_device["refresh_token"])).status_code == 200
    # Logging out twice, or with an unknown token, is harmless.
    assert (await client.post("/api/v1/auth/logout", json={"refresh_token": successor})).status_code == 204
    assert (await client.post("/api/v1/auth/logout", json={"refresh_token": "y" * 43})).status_code == 204
    assert (await client.post("/api/v1/auth/logout", json={})).status_code == 422


# --- merchant login ----------------------------------------------------------------------------


async def admin_login(client: httpx.AsyncClient, username: str, password: str) -> httpx.Response:
    return await client.post("/api/v1/admin/auth/login", json={"username": username, "password": password})


async def test_admin_made_by_create_admin_logs_in(client, db, settings):
    admin_id = await create_admin(settings, "manager", "long-enough-secret")
    r = await admin_login(client, "manager", "long-enough-secret")
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["token_type"] == "Bearer"
    assert body["admin"]["id"] == admin_id and body["admin"]["username"] == "manager"
    assert await db.fetchval("select last_login_at is not null from admins where id = $1", admin_id)
    me = await client.get("/api/v1/admin/auth/me", headers=bearer(body["access_token"]))
    assert me.status_code == 200
    assert me.json()["username"] == "manager"
    # A merchant token is not a shopper token.
    r = await client.get("/api/v1/me", headers=bearer(body["access_token"]))
    assert r.status_code == 401
    assert r.json()["error"]["code"] == "auth.invalid_token"


async def test_admin_wrong_password_and_unknown_user_look_the_same(client, db, settings):
    await create_admin(settings, "manager", "long-enough-secret")
    wrong = await admin_login(client, "manager", "not-the-password")
    unknown = await admin_login(client, "nobody", "not-the-password")
    assert wrong.status_code == unknown.status_code == 401
    assert wrong.json() == unknown.json()
    assert wrong.json()["error"]["code"] == "auth.invalid_credentials"
    assert await db.fetchval("select last_login_at from admins where username = 'manager'") is None


async def test_disabled_admin_is_refused_and_create_admin_reactivates(client, db, settings):
    admin_id = await create_admin(settings, "manager", "long-enough-secret")
    token = (await admin_login(client, "manager", "long-enough-secret")).json()["access_token"]
    await db.execute("update admins set is_active = false where id = $1", admin_id)

    r = await admin_login(client, "manager", "long-enough-secret")
    assert r.status_code == 403
    assert r.json()["error"]["code"] == "auth.account_disabled"
    # A disabled account's wrong password still reveals nothing.
    assert (await admin_login(client, "manager", "guess")).json()["error"][
        "code"
    ] == "auth.invalid_credentials"
    r = await client.get("/api/v1/admin/auth/me", headers=bearer(token))
    assert r.status_code == 401
    assert r.json()["error"]["code"] == "auth.account_disabled"
    # Every merchant route refuses the still-unexpired token of a disabled account.
    r = await client.get("/api/v1/admin/orders", headers=bearer(token))
    assert (r.status_code, r.json()["error"]["code"]) == (401, "auth.account_disabled")

    # `shop create-admin` resets the password and re-enables the account.
    assert await create_admin(settings, "manager", "a-brand-new-secret") == admin_id
    assert (await admin_login(client, "manager", "long-enough-secret")).status_code == 401
    assert (await admin_login(client, "manager", "a-brand-new-secret")).status_code == 200


async def test_admin_login_validation_and_rate_limit(client, db, settings):
    r = await client.post(
        "/api/v1/admin/auth/login", json={"username": "manager", "password": "x", "remember": True}
    )
    assert r.status_code == 422
    assert r.json()["error"]["code"] == "validation_failed"
    # Parallel guesses from one address: the limit holds however they interleave.
    responses = await asyncio.gather(*(admin_login(client, "manager", f"guess-{i}") for i in range(12)))
    statuses = sorted(r.status_code for r in responses)
    assert statuses.count(401) == 10 and statuses.count(429) == 2
    limited = next(r for r in responses if r.status_code == 429)
    assert limited.json()["error"]["code"] == "auth.too_many_attempts"
    assert 1 <= int(limited.headers["retry-after"]) <= 60
    # Another client behind the trusted proxy has its own budget.
    await create_admin(settings, "manager", "long-enough-secret")
    r = await client.post(
        "/api/v1/admin/auth/login",
        json={"username": "manager", "password": "long-enough-secret"},
        headers={"X-Forwarded-For": "203.0.113.9"},
    )
    assert r.status_code == 200

"""The JWT attack set and key rotation, against real routes."""

from __future__ import annotations

import base64
import json
import time

import jwt
import msgspec
import pytest
from cryptography.hazmat.primitives.asymmetric import rsa

from shop.auth_tokens import AUD_ADMIN, AUD_SHOPPER, issue_access_token
from tests.shop.test_auth import bearer, client_for

OLD_KEY = "old:" + "o" * 40
NEW_KEY = "new:" + "n" * 40


def claims(settings, user_id: int, **changes: object) -> dict:
    now = int(time.time())
    base = {"sub": str(user_id), "iss": settings.jwt_issuer, "aud": AUD_SHOPPER, "iat": now, "exp": now + 300}
    base.update(changes)
    return {k: v for k, v in base.items() if v is not None}


def sign(settings, payload: dict, *, algorithm: str = "HS256", kid: str | None = None, key=None) -> str:
    kid = kid or settings.signing_kid
    return jwt.encode(
        payload, key or settings.jwt_key_map[settings.signing_kid], algorithm=algorithm, headers={"kid": kid}
    )


async def assert_refused(
    client, token: str, code: str = "auth.invalid_token", path: str = "/api/v1/me"
) -> None:
    r = await client.get(path, headers=bearer(token))
    assert r.status_code == 401, r.text
    assert r.json()["error"]["code"] == code


async def test_a_well_formed_token_is_accepted(client, make_user, settings):
    user_id, _ = await make_user()
    r = await client.get("/api/v1/me", headers=bearer(sign(settings, claims(settings, user_id))))
    assert r.status_code == 200
    assert r.json()["id"] == user_id


async def test_alg_none_is_refused(client, make_user, settings):
    user_id, _ = await make_user()
    token = jwt.encode(
        claims(settings, user_id), None, algorithm="none", headers={"kid": settings.signing_kid}
    )
    await assert_refused(client, token)
    # The same, hand-built with an empty signature.
    header = base64.urlsafe_b64encode(json.dumps({"alg": "none", "kid": settings.signing_kid}).encode())
    body = base64.urlsafe_b64encode(json.dumps(claims(settings, user_id)).encode())
    await assert_refused(client, f"{header.decode().rstrip('=')}.{body.decode().rstrip('=')}.")


async def test_algorithms_outside_the_allow_list_are_refused(client, make_user, settings):
    user_id, _ = await make_user()
    rsa_key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    await assert_refused(client, sign(settings, claims(settings, user_id), algorithm="RS256", key=rsa_key))
    # Right secret, other HMAC: the algorithm comes from our list, never from the token.
    await assert_refused(client, sign(settings, claims(settings, user_id), algorithm="HS512"))


async def test_wrong_audience_or_issuer_is_refused(client, make_user, settings):
    user_id, _ = await make_user()
    await assert_refused(client, sign(settings, claims(settings, user_id, aud="another-api")))
    await assert_refused(client, sign(settings, claims(settings, user_id, iss="someone-else")))


@pytest.mark.parametrize("missing", ["exp", "iat", "iss", "aud", "sub"])
async def test_required_claims_are_required(client, make_user, settings, missing):
    user_id, _ = await make_user()
    await assert_refused(client, sign(settings, claims(settings, user_id, **{missing: None})))


async def test_expired_token_is_refused(client, make_user, settings):
    user_id, _ = await make_user()
    now = int(time.time())
    token = sign(settings, claims(settings, user_id, iat=now - 1000, exp=now - 60))
    await assert_refused(client, token, code="auth.token_expired")


async def test_unknown_or_missing_kid_is_refused(client, make_user, settings):
    user_id, _ = await make_user()
    await assert_refused(client, sign(settings, claims(settings, user_id), kid="nope"))
    token = jwt.encode(
        claims(settings, user_id), settings.jwt_key_map[settings.signing_kid], algorithm="HS256"
    )
    await assert_refused(client, token)


async def test_tampered_payload_is_refused(client, make_user, settings):
    user_id, _ = await make_user()
    victim_id, _ = await make_user("victim")
    header, _, signature = sign(settings, claims(settings, user_id)).split(".")
    forged = base64.urlsafe_b64encode(json.dumps(claims(settings, victim_id)).encode()).decode().rstrip("=")
    await assert_refused(client, f"{header}.{forged}.{signature}")


async def test_missing_or_malformed_authorization_is_refused(client):
    r = await client.get("/api/v1/me")
    assert r.status_code == 401
    assert r.json()["error"]["code"] == "auth.required"
    r = await client.get("/api/v1/me", headers={"Authorization": "Basic dXNlcjpwYXNz"})
    assert r.json()["error"]["code"] == "auth.required"
    await assert_refused(client, "not-a-jwt")


async def test_shopper_and_admin_tokens_are_not_interchangeable(client, make_user, admin_headers, settings):
    user_id, shopper_headers = await make_user()
    r = await client.get("/api/v1/admin/auth/me", headers=shopper_headers)
    assert r.status_code == 401
    assert r.json()["error"]["code"] == "auth.invalid_token"
    # Even a shopper token whose subject is an admin's id.
    await assert_refused(
        client, issue_access_token(settings, 1, AUD_SHOPPER, username="boss"), path="/api/v1/admin/auth/me"
    )
    r = await client.get("/api/v1/me", headers=admin_headers)
    assert r.status_code == 401
    assert (await client.get("/api/v1/admin/auth/me", headers=admin_headers)).status_code == 200
    # An admin-audience token for a shopper's id does not open shopper routes either.
    await assert_refused(client, issue_access_token(settings, user_id, AUD_ADMIN))


async def test_key_rotation_old_kid_verifies_while_listed(settings, make_user):
    old_only = msgspec.structs.replace(settings, jwt_keys=OLD_KEY)
    rotated = msgspec.structs.replace(settings, jwt_keys=f"{NEW_KEY},{OLD_KEY}")
    new_only = msgspec.structs.replace(settings, jwt_keys=NEW_KEY)
    user_id, _ = await make_user()
    old_token = issue_access_token(old_only, user_id, AUD_SHOPPER)
    new_token = issue_access_token(rotated, user_id, AUD_SHOPPER)
    assert jwt.get_unverified_header(old_token)["kid"] == "old"
    assert jwt.get_unverified_header(new_token)["kid"] == "new"  # the first listed key signs

    async with client_for(rotated) as client:
        assert (await client.get("/api/v1/me", headers=bearer(old_token))).status_code == 200
        assert (await client.get("/api/v1/me", headers=bearer(new_token))).status_code == 200
    async with client_for(new_only) as client:
        await assert_refused(client, old_token)
        assert (await client.get("/api/v1/me", headers=bearer(new_token))).status_code == 200
        # The old key's id with the new secret is still a forgery for the old kid.
        await assert_refused(client, sign(new_only, claims(new_only, user_id), kid="old"))


async def test_a_cached_token_still_expires(client, settings, make_user):
    import asyncio

    user_id, _ = await make_user()
    token = sign(settings, claims(settings, user_id, exp=int(time.time()) + 2))
    r = await client.get("/api/v1/me", headers=bearer(token))
    assert r.status_code == 200  # verified, and now cached
    assert (await client.get("/api/v1/me", headers=bearer(token))).status_code == 200
    await asyncio.sleep(2.1)
    r = await client.get("/api/v1/me", headers=bearer(token))
    assert (r.status_code, r.json()["error"]["code"]) == (401, "auth.token_expired")
    # A tampered copy of a cached token is not a cache hit.
    head, payload, sig = token.split(".")
    forged = json.loads(base64.urlsafe_b64decode(payload + "=="))
    forged["sub"] = str(user_id + 1)
    forged_payload = base64.urlsafe_b64encode(json.dumps(forged).encode()).decode().rstrip("=")
    r = await client.get("/api/v1/me", headers=bearer(f"{head}.{forged_payload}.{sig}"))
    assert r.status_code == 401

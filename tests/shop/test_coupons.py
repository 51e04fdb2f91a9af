"""Coupon templates, crowd-safe claiming, grants and stats, through the HTTP API (real PostgreSQL and Redis)."""

from __future__ import annotations

import asyncio
from datetime import UTC, datetime, timedelta

from shop.auth_tokens import AUD_SHOPPER, issue_access_token
from shop.coupons.service import grant_coupon
from shop.keys import Keys

ADMIN = "/api/v1/admin/coupon-templates"


def later(**delta) -> str:
    return (datetime.now(UTC) + timedelta(**delta)).isoformat()


async def make_template(client, admin_headers, *, activate: bool = True, **fields) -> dict:
    """满100减20, 7 days from claim, 100 units, 1 per shopper, unless overridden."""
    body = {
        "name": "满100减20",
        "kind": "threshold",
        "threshold": 10000,
        "amount": 2000,
        "validity": "relative",
        "valid_days": 7,
        "total_quantity": 100,
        "per_user_limit": 1,
        **fields,
    }
    r = await client.post(ADMIN, json=body, headers=admin_headers)
    assert r.status_code == 201, r.text
    template = r.json()
    if activate:
        r = await client.post(f"{ADMIN}/{template['id']}/activate", headers=admin_headers)
        assert r.status_code == 200, r.text
        template = r.json()
    return template


async def many_users(db, settings, n: int) -> list[tuple[int, dict]]:
    """n shoppers in one statement (fast), with their auth headers."""
    rows = await db.fetch(
        "insert into users (nickname) select 'u' || g from generate_series(1, $1) g returning id", n
    )
    return [
        (r["id"], {"Authorization": f"Bearer {issue_access_token(settings, r['id'], AUD_SHOPPER)}"})
        for r in rows
    ]


async def claim(client, headers, template_id: int, key: str | None = None):
    h = dict(headers)
    if key:
        h["Idempotency-Key"] = key
    return await client.post(f"/api/v1/coupons/templates/{template_id}/claim", headers=h)


async def expire_coupon(db, coupon_id: int) -> None:
    await db.execute(
        """update coupons set valid_from = now() - interval '2 days', valid_until = now() - interval '1 second'
           where id = $1""",
        coupon_id,
    )


def code_of(r) -> str:
    return r.json()["error"]["code"]


async def redis_counters(app, template_id: int) -> tuple[int, dict[int, int]]:
    keys = Keys(app.state.settings.redis_prefix)
    claimed = int(await app.state.redis.hget(keys.coupon_state(template_id), "claimed"))
    users = await app.state.redis.hgetall(keys.coupon_users(template_id))
    return claimed, {int(k): int(v) for k, v in users.items()}


async def db_counters(db, template_id: int) -> tuple[int, dict[int, int]]:
    rows = await db.fetch(
        "select user_id, count(*) n from coupons where template_id = $1 and source = 'claim' group by user_id",
        template_id,
    )
    counts = {r["user_id"]: r["n"] for r in rows}
    return sum(counts.values()), counts


# ---------------------------------------------------------------- templates


async def test_template_lifecycle_and_validation(client, db, settings, admin_headers, make_user):
    _, shopper = await make_user()
    template = await make_template(client, admin_headers, activate=False)
    assert template["status"] == "draft" and template["claimed"] is None
    bad = [
        {"kind": "percent", "amount": 100},  # no percent_off, and an amount
        {"kind": "threshold", "threshold": 0},
        {"kind": "no_threshold", "threshold": 100},
        {"scope": "products"},  # no ids
        {"scope": "all", "scope_ids": [1]},
        {"validity": "fixed", "valid_days": None},
        {"validity": "fixed", "valid_days": None, "valid_from": later(days=2), "valid_until": later(days=1)},
        {"claim_starts_at": later(days=2), "claim_ends_at": later(days=1)},
        {"per_user_limit": 0},
        {"unknown": 1},
    ]
    base = {
        "name": "x",
        "kind": "threshold",
        "threshold": 100,
        "amount": 10,
        "validity": "relative",
        "valid_days": 3,
    }
    for fields in bad:
        r = await client.post(ADMIN, json={**base, **fields}, headers=admin_headers)
        assert (r.status_code, code_of(r)) == (422, "validation_failed"), fields
    assert (await client.post(ADMIN, json=base)).status_code == 401
    assert (await client.post(ADMIN, json=base, headers=shopper)).status_code == 401
    r = await client.get(f"{ADMIN}/999999", headers=admin_headers)
    assert (r.status_code, code_of(r)) == (404, "coupon.template_not_found")

    # A draft can be edited freely.
    tid = template["id"]
    form = {
        k: template[k]
        for k in ("name", "kind", "threshold", "amount", "validity", "valid_days", "per_user_limit")
    }
    r = await client.put(
        f"{ADMIN}/{tid}", json={**form, "amount": 3000, "total_quantity": 3}, headers=admin_headers
    )
    assert r.status_code == 200 and r.json()["amount"] == 3000
    form["amount"] = 3000
    r = await client.post(f"{ADMIN}/{tid}/activate", headers=admin_headers)
    assert r.json()["status"] == "active" and (r.json()["claimed"], r.json()["remaining"]) == (0, 3)
    r = await client.post(f"{ADMIN}/{tid}/activate", headers=admin_headers)
    assert (r.status_code, code_of(r)) == (409, "coupon.illegal_transition")

    users = await many_users(db, settings, 2)
    for _, h in users:
        assert (await claim(client, h, tid)).status_code == 201
    # Live: what a held coupon is worth is frozen; the quantity moves by the delta, never below claimed.
    r = await client.put(
        f"{ADMIN}/{tid}", json={**form, "amount": 5000, "total_quantity": 3}, headers=admin_headers
    )
    assert (r.status_code, code_of(r)) == (409, "coupon.template_live")
    r = await client.put(f"{ADMIN}/{tid}", json={**form, "total_quantity": 1}, headers=admin_headers)
    assert (r.status_code, code_of(r)) == (409, "coupon.quantity_below_claimed")
    assert (await client.get(f"{ADMIN}/{tid}", headers=admin_headers)).json()["total_quantity"] == 3
    r = await client.put(
        f"{ADMIN}/{tid}", json={**form, "total_quantity": 10, "name": "改名"}, headers=admin_headers
    )
    assert r.status_code == 200 and (r.json()["claimed"], r.json()["remaining"], r.json()["name"]) == (
        2,
        8,
        "改名",
    )
    # Unlimited.
    r = await client.put(f"{ADMIN}/{tid}", json={**form, "total_quantity": None}, headers=admin_headers)
    assert r.status_code == 200 and r.json()["remaining"] is None and r.json()["claimed"] == 2

    _, h3 = await make_user("third")
    r = await client.post(f"{ADMIN}/{tid}/pause", headers=admin_headers)
    assert r.json()["status"] == "paused"
    assert code_of(await claim(client, h3, tid)) == "coupon.paused"
    await client.post(f"{ADMIN}/{tid}/activate", headers=admin_headers)
    assert (await claim(client, h3, tid)).status_code == 201
    r = await client.post(f"{ADMIN}/{tid}/end", headers=admin_headers)
    assert r.json()["status"] == "ended" and r.json()["claimed"] == 3
    _, h4 = await make_user("fourth")
    r = await claim(client, h4, tid)
    assert (r.status_code, code_of(r)) == (409, "coupon.ended")
    r = await client.post(f"{ADMIN}/{tid}/pause", headers=admin_headers)
    assert (r.status_code, code_of(r)) == (409, "coupon.illegal_transition")
    r = await client.get(ADMIN, params={"status": "ended"}, headers=admin_headers)
    assert [t["id"] for t in r.json()["items"]] == [tid]


# ---------------------------------------------------------------- claiming


async def test_claim_and_each_refusal(client, db, admin_headers, make_user):
    user_id, headers = await make_user()
    template = await make_template(client, admin_headers)
    r = await claim(client, headers, template["id"])
    assert r.status_code == 201, r.text
    coupon = r.json()
    assert coupon["status"] == "available" and coupon["source"] == "claim" and coupon["amount"] == 2000
    valid = datetime.fromisoformat(coupon["valid_until"]) - datetime.fromisoformat(coupon["valid_from"])
    assert valid == timedelta(days=7)
    row = await db.fetchrow("select user_id, code from coupons where id = $1", coupon["id"])
    assert (row["user_id"], row["code"]) == (user_id, coupon["code"])

    r = await claim(client, headers, template["id"])
    assert (r.status_code, code_of(r)) == (409, "coupon.limit_exceeded")
    soon = await make_template(client, admin_headers, claim_starts_at=later(hours=1))
    r = await claim(client, headers, soon["id"])
    assert (r.status_code, code_of(r)) == (409, "coupon.not_started")
    over = await make_template(
        client,
        admin_headers,
        validity="fixed",
        valid_days=None,
        valid_from=later(days=-3),
        valid_until=later(days=-1),
    )
    r = await claim(client, headers, over["id"])
    assert (r.status_code, code_of(r)) == (409, "coupon.ended")
    draft = await make_template(client, admin_headers, activate=False)
    private = await make_template(client, admin_headers, is_public=False)
    for tid in (draft["id"], private["id"], 999999):
        r = await claim(client, headers, tid)
        assert (r.status_code, code_of(r)) == (404, "coupon.not_found"), tid
    assert (await client.post(f"/api/v1/coupons/templates/{template['id']}/claim")).status_code == 401
    r = await claim(client, headers, template["id"], key="bad key")
    assert (r.status_code, code_of(r)) == (422, "idempotency.invalid_key")
    assert await db.fetchval("select count(*) from coupons") == 1

    # The coupon centre lists what can be claimed, with what is left.
    r = await client.get("/api/v1/coupons/templates", headers=headers)
    items = {t["id"]: t for t in r.json()["items"]}
    assert set(items) == {template["id"], soon["id"]} and items[template["id"]]["remaining"] == 99


async def test_idempotency_key_replays_the_same_coupon(client, db, admin_headers, make_user):
    _, headers = await make_user()
    template = await make_template(client, admin_headers, per_user_limit=3)
    results = await asyncio.gather(*(claim(client, headers, template["id"], key="k1") for _ in range(10)))
    assert {r.status_code for r in results} == {201}
    assert len({r.json()["id"] for r in results}) == 1
    assert sum(r.headers.get("idempotent-replayed") == "true" for r in results) == 9
    r = await claim(client, headers, template["id"], key="k2")
    assert r.status_code == 201 and r.json()["id"] != results[0].json()["id"]
    assert await db.fetchval("select count(*) from coupons") == 2


async def test_total_one_and_64_shoppers_get_exactly_one(client, app, db, settings, admin_headers):
    """litemall #581: a check-then-insert lets several shoppers take the last coupon."""
    template = await make_template(client, admin_headers, total_quantity=1)
    users = await many_users(db, settings, 64)
    results = await asyncio.gather(*(claim(client, h, template["id"]) for _, h in users))
    statuses = [r.status_code for r in results]
    assert statuses.count(201) == 1 and statuses.count(409) == 63
    assert {code_of(r) for r in results if r.status_code == 409} == {"coupon.sold_out"}
    assert await db.fetchval("select count(*) from coupons") == 1
    assert await redis_counters(app, template["id"]) == await db_counters(db, template["id"])


async def test_per_user_limit_one_and_30_concurrent_claims_by_one_shopper(
    client, app, db, admin_headers, make_user
):
    user_id, headers = await make_user()
    template = await make_template(client, admin_headers, per_user_limit=1)
    results = await asyncio.gather(*(claim(client, headers, template["id"]) for _ in range(30)))
    statuses = [r.status_code for r in results]
    assert statuses.count(201) == 1 and statuses.count(409) == 29
    assert {code_of(r) for r in results if r.status_code == 409} == {"coupon.limit_exceeded"}
    assert await db.fetchval("select count(*) from coupons where user_id = $1", user_id) == 1
    assert await redis_counters(app, template["id"]) == (1, {user_id: 1})


async def test_500_claims_on_100_units_exactly_100_and_counters_agree(
    client, app, db, settings, admin_headers
):
    template = await make_template(client, admin_headers, total_quantity=100)
    users = await many_users(db, settings, 500)
    results = await asyncio.gather(*(claim(client, h, template["id"]) for _, h in users))
    statuses = [r.status_code for r in results]
    assert statuses.count(201) == 100 and statuses.count(409) == 400
    # Every 201 is already a row (written before the answer), one per winner.
    winners = {r.json()["code"] for r in results if r.status_code == 201}
    rows = await db.fetch("select code, user_id from coupons")
    assert {r["code"] for r in rows} == winners and len({r["user_id"] for r in rows}) == 100
    claimed, per_user = await redis_counters(app, template["id"])
    assert (claimed, per_user) == await db_counters(db, template["id"]) and claimed == 100
    r = await client.get(f"{ADMIN}/{template['id']}", headers=admin_headers)
    assert (r.json()["claimed"], r.json()["remaining"]) == (100, 0)


async def test_losers_never_touch_postgresql(client, app, db, settings, admin_headers, make_user):
    template = await make_template(client, admin_headers, total_quantity=1)
    _, first = await make_user()
    assert (await claim(client, first, template["id"])).status_code == 201
    pool = app.state.pool

    class CountingPool:
        acquired = 0

        def acquire(self, *args, **kwargs):
            CountingPool.acquired += 1
            return pool.acquire(*args, **kwargs)

        def __getattr__(self, name):
            return getattr(pool, name)

    app.state.pool = CountingPool()
    try:
        users = await many_users(db, settings, 20)
        results = await asyncio.gather(*(claim(client, h, template["id"]) for _, h in users))
        again = await claim(client, first, template["id"])
    finally:
        app.state.pool = pool
    acquired = CountingPool.acquired
    assert {code_of(r) for r in results} == {"coupon.sold_out"} and code_of(again) == "coupon.sold_out"
    assert acquired == 0


async def test_redis_without_the_template_answers_503_until_restored(
    client, app, db, admin_headers, make_user
):
    _, headers = await make_user()
    template = await make_template(client, admin_headers)
    keys = Keys(app.state.settings.redis_prefix)
    await app.state.redis.delete(keys.coupon_state(template["id"]))
    r = await claim(client, headers, template["id"])
    assert (r.status_code, code_of(r)) == (503, "coupon.not_ready")
    assert await db.fetchval("select count(*) from coupons") == 0


# ---------------------------------------------------------------- my coupons, grants, stats


async def test_my_coupons_by_state_and_pagination(client, db, admin_headers, make_user):
    _, headers = await make_user()
    _, other = await make_user("other")
    template = await make_template(client, admin_headers, per_user_limit=5)
    ids = [(await claim(client, headers, template["id"])).json()["id"] for _ in range(3)]
    await expire_coupon(db, ids[0])
    r = await client.get("/api/v1/coupons", params={"limit": 1}, headers=headers)
    assert [c["id"] for c in r.json()["items"]] == [ids[2]] and r.json()["next_cursor"]
    r2 = await client.get(
        "/api/v1/coupons", params={"limit": 5, "cursor": r.json()["next_cursor"]}, headers=headers
    )
    assert [c["id"] for c in r2.json()["items"]] == [ids[1], ids[0]]
    r = await client.get("/api/v1/coupons", params={"status": "expired"}, headers=headers)
    assert [c["id"] for c in r.json()["items"]] == [ids[0]]
    r = await client.get("/api/v1/coupons", params={"status": "available"}, headers=headers)
    assert [c["id"] for c in r.json()["items"]] == [ids[2], ids[1]]
    assert (await client.get(f"/api/v1/coupons/{ids[1]}", headers=headers)).status_code == 200
    r = await client.get(f"/api/v1/coupons/{ids[1]}", headers=other)
    assert (r.status_code, code_of(r)) == (404, "coupon.not_found")
    assert (
        await client.get("/api/v1/coupons", params={"status": "lost"}, headers=headers)
    ).status_code == 422
    r = await client.get("/api/v1/coupons", params={"cursor": "garbage!"}, headers=headers)
    assert r.status_code == 422
    assert (await client.get("/api/v1/coupons")).status_code == 401


async def test_merchant_grant_is_idempotent_per_grant_and_shopper(client, app, db, settings, admin_headers):
    template = await make_template(client, admin_headers, total_quantity=1, is_public=False)
    users = await many_users(db, settings, 3)
    ids = [u for u, _ in users]
    url = f"{ADMIN}/{template['id']}/grants"
    r = await client.post(
        url, json={"grant_id": "spring-1", "user_ids": [*ids, 999999]}, headers=admin_headers
    )
    assert r.status_code == 200 and r.json() == {
        "granted": 3,
        "already_granted": 0,
        "unknown_users": [999999],
    }
    r = await client.post(url, json={"grant_id": "spring-1", "user_ids": ids}, headers=admin_headers)
    assert r.json() == {"granted": 0, "already_granted": 3, "unknown_users": []}
    r = await client.post(url, json={"grant_id": "spring-2", "user_ids": ids[:1]}, headers=admin_headers)
    assert r.json()["granted"] == 1
    # Grants are not public claims: the quota of 1 is untouched.
    assert await db.fetchval("select count(*) from coupons where source = 'grant'") == 4
    assert (await redis_counters(app, template["id"]))[0] == 0
    assert (
        await client.post(url, json={"grant_id": "x", "user_ids": []}, headers=admin_headers)
    ).status_code == 422
    assert (await client.post(url, json={"grant_id": "x", "user_ids": ids})).status_code == 401
    draft = await make_template(client, admin_headers, activate=False)
    r = await client.post(
        f"{ADMIN}/{draft['id']}/grants", json={"grant_id": "x", "user_ids": ids}, headers=admin_headers
    )
    assert (r.status_code, code_of(r)) == (409, "coupon.template_inactive")
    r = await client.post(
        f"{ADMIN}/999999/grants", json={"grant_id": "x", "user_ids": ids}, headers=admin_headers
    )
    assert r.status_code == 404

    # The internal service: a game prize, budgeted by the prize stock, idempotent per reference.
    first = await grant_coupon(db, ids[0], template["id"], source="game", ref="draw:1")
    again = await grant_coupon(db, ids[0], template["id"], source="game", ref="draw:1")
    assert first is not None and again is None
    assert await db.fetchval("select source from coupons where id = $1", first) == "game"


async def test_newcomers_get_the_newcomer_coupons_on_first_login_only(client, db, admin_headers):
    gift = await make_template(
        client,
        admin_headers,
        is_public=False,
        for_newcomers=True,
        kind="no_threshold",
        threshold=0,
        amount=500,
    )
    await make_template(client, admin_headers, for_newcomers=True, activate=False)  # a draft is not granted
    r = await client.post("/api/v1/auth/login", json={"provider": "dev", "code": "newbie"})
    assert r.status_code == 200, r.text
    user_id = r.json()["user"]["id"]
    rows = await db.fetch("select template_id, source from coupons where user_id = $1", user_id)
    assert [(row["template_id"], row["source"]) for row in rows] == [(gift["id"], "newcomer")]
    await client.post("/api/v1/auth/login", json={"provider": "dev", "code": "newbie"})
    assert await db.fetchval("select count(*) from coupons where user_id = $1", user_id) == 1


async def test_stats_count_issued_claimed_granted_and_states(client, db, settings, admin_headers):
    template = await make_template(client, admin_headers, per_user_limit=2)
    users = await many_users(db, settings, 3)
    for _, h in users:
        await claim(client, h, template["id"])
    await client.post(
        f"{ADMIN}/{template['id']}/grants",
        json={"grant_id": "g", "user_ids": [users[0][0]]},
        headers=admin_headers,
    )
    await expire_coupon(db, await db.fetchval("select min(id) from coupons"))
    r = await client.get(f"{ADMIN}/{template['id']}/stats", headers=admin_headers)
    assert r.status_code == 200
    stats = r.json()
    assert (stats["issued"], stats["claimed"], stats["granted"]) == (4, 3, 1)
    assert (stats["available"], stats["expired"], stats["used"], stats["orders"], stats["gmv"]) == (
        3,
        1,
        0,
        0,
        0,
    )
    assert (await client.get(f"{ADMIN}/999999/stats", headers=admin_headers)).status_code == 404


async def test_demo_coupon_is_seeded_once_and_claimable(client, app, db, make_user):
    from shop.coupons.service import seed_demo_coupons

    state = app.state
    keys = Keys(state.settings.redis_prefix)
    assert await seed_demo_coupons(db, state.redis, state.scripts, keys) == 1
    assert await seed_demo_coupons(db, state.redis, state.scripts, keys) == 0
    _, headers = await make_user()
    templates = (await client.get("/api/v1/coupons/templates", headers=headers)).json()["items"]
    assert len(templates) == 1 and templates[0]["status"] == "active"
    assert (await claim(client, headers, templates[0]["id"])).status_code == 201


async def test_the_worker_stops_polling_a_drained_ended_templates_stream(
    client, app, db, settings, admin_headers
):
    """An ended template's stream leaves the worker's pass once nothing in it is unacknowledged
    (no claim can add to it any more); a live template's stays; reconcile expects exactly that."""
    from shop.hotpath import GROUP, registered_streams
    from shop.hotpath.jobs import persist_all_streams
    from shop.reconcile import reconcile
    from tests.shop.test_hotpath import ctx_of

    live = await make_template(client, admin_headers)
    ended = await make_template(client, admin_headers)
    [(_, shopper)] = await many_users(db, settings, 1)
    for template in (live, ended):
        assert (await claim(client, shopper, template["id"])).status_code == 201
    keys, redis = Keys(settings.redis_prefix), app.state.redis
    live_stream, ended_stream = keys.coupon_stream(live["id"]), keys.coupon_stream(ended["id"])
    # A worker read the claim and died before acknowledging it.
    assert await redis.xreadgroup(GROUP, "dead-worker", {ended_stream: ">"})
    r = await client.post(f"{ADMIN}/{ended['id']}/end", headers=admin_headers)
    assert r.status_code == 200, r.text
    await persist_all_streams(ctx_of(app))  # the dead worker's entry is not idle long enough yet
    assert {live_stream, ended_stream} <= set(await registered_streams(redis, keys, "coupon"))
    await persist_all_streams(ctx_of(app), min_idle_ms=0)  # taken over, persisted, acknowledged
    registered = set(await registered_streams(redis, keys, "coupon"))
    assert live_stream in registered and ended_stream not in registered
    assert (await reconcile(settings)).found == []
    # A claim window that closed over a minute ago counts as over too.
    await db.execute(
        """update coupon_templates set claim_starts_at = now() - interval '1 hour',
           claim_ends_at = now() - interval '2 minutes' where id = $1""",
        live["id"],
    )
    await persist_all_streams(ctx_of(app))
    assert live_stream not in set(await registered_streams(redis, keys, "coupon"))
    # The merchant extends the window: claimable again, the stream is read again.
    body = {
        "name": live["name"], "kind": live["kind"], "validity": live["validity"], "threshold": live["threshold"],
        "amount": live["amount"], "total_quantity": live["total_quantity"], "valid_days": live["valid_days"],
        "claim_starts_at": later(hours=-1), "claim_ends_at": later(days=1),
    }  # fmt: skip
    r = await client.put(f"{ADMIN}/{live['id']}", json=body, headers=admin_headers)
    assert r.status_code == 200, r.text
    assert live_stream in set(await registered_streams(redis, keys, "coupon"))
    [(_, second)] = await many_users(db, settings, 1)
    assert (await claim(client, second, live["id"])).status_code == 201
    await persist_all_streams(ctx_of(app))
    assert live_stream in set(await registered_streams(redis, keys, "coupon"))
    assert (await reconcile(settings)).found == []

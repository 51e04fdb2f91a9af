"""The wheel on the draw engine: stored before the answer, crowd-safe stock and chances, paid draws,
pity, extra chances and the prize outbox (real PostgreSQL, real Redis, real concurrency)."""

from __future__ import annotations

import asyncio
from datetime import timedelta

from games import engine
from games.delivery import deliver_prizes, expire_unclaimed_goods
from shop.auth_tokens import AUD_SHOPPER, issue_access_token
from shop.events import dispatch_order_events
from shop.hotpath import hotpath_of
from shop.keys import Keys
from shop.points import earn_points
from tests.factories import make_address, make_product
from tests.games.test_admin import ADMIN, THANKS, code_of, coupon_template, make_game, many_users
from tests.shop.test_events import paid_order
from tests.shop.test_hotpath import ctx_of

ONLY_POINTS = [{"name": "10 积分", "kind": "points", "points": 10, "weight": 1}]


async def draw(client, headers, game_id: int, key: str | None = None, **body):
    h = dict(headers)
    if key:
        h["Idempotency-Key"] = key
    return await client.post(f"/api/v1/games/{game_id}/draw", json=body or None, headers=h)


async def test_a_draw_is_stored_before_the_answer_and_its_points_delivered_once(
    client, app, db, make_user, admin_headers
):
    user_id, headers = await make_user()
    game = await make_game(client, admin_headers, prizes=ONLY_POINTS, out_of_stock="redistribute")
    r = await draw(client, headers, game["id"])
    assert r.status_code == 201, r.text
    out = r.json()
    assert out["slot_index"] == 0 and out["prize"] == {
        "position": 0, "name": "10 积分", "kind": "points", "is_win": True, "points": 10,
        "coupon_template_id": None, "sku_id": None,
    }  # fmt: skip
    row = await db.fetchrow("select * from game_draws where draw_no = $1", out["draw_no"])
    assert row["user_id"] == user_id and row["weights_version"] == game["weights_version"]
    assert (
        0 <= row["rand"] < 2**52
        and not row["paid"]
        and row["business_date"] == engine.business_date(app.state.settings)
    )
    assert await db.fetchval("select status from prize_deliveries where draw_id = $1", row["id"]) == "pending"

    assert await deliver_prizes(app.state.pool) == 1
    assert await deliver_prizes(app.state.pool) == 0
    r = await client.get("/api/v1/points", headers=headers)
    assert r.status_code == 200 and r.json()["balance"] == 10
    assert [(e["kind"], e["amount"]) for e in r.json()["items"]] == [("prize", 10)]
    r = await client.get("/api/v1/games/prizes", headers=headers)
    assert [(p["kind"], p["status"]) for p in r.json()["items"]] == [("points", "delivered")]
    r = await client.get("/api/v1/games/draws", headers=headers)
    assert [d["draw_no"] for d in r.json()["items"]] == [out["draw_no"]]
    # One free draw a day: the second is refused from Redis alone.
    r = await draw(client, headers, game["id"])
    assert r.status_code == 409 and code_of(r) == "game.no_chances"
    assert await db.fetchval("select count(*) from game_draws") == 1


async def test_same_idempotency_key_replays_the_draw(client, db, make_user, admin_headers):
    _, headers = await make_user()
    game = await make_game(client, admin_headers, free_per_day=5)
    first = await draw(client, headers, game["id"], key="spin-1")
    again = await draw(client, headers, game["id"], key="spin-1")
    assert first.status_code == again.status_code == 201
    assert again.json() == first.json() and again.headers["Idempotent-Replayed"] == "true"
    assert await db.fetchval("select count(*) from game_draws") == 1
    r = await client.get(f"/api/v1/games/{game['id']}", headers=headers)
    assert r.json()["free_left_today"] == 4


async def test_five_thousand_concurrent_draws_never_give_more_than_the_stock(
    client, app, db, settings, admin_headers
):
    prizes = [
        {"name": "100 积分", "kind": "points", "points": 100, "weight": 50, "stock": 10},
        {**THANKS, "weight": 50},
    ]
    game = await make_game(client, admin_headers, prizes=prizes)
    users = await many_users(db, settings, 5000)
    state, keys = app.state, Keys(settings.redis_prefix)
    hotpath = hotpath_of(state)

    async def one(user_id: int):
        try:
            return await engine.draw(
                hotpath, state.scripts, keys, settings, game_id=game["id"], game_type="wheel",
                user_id=user_id, idempotency_key=None,
            )  # fmt: skip
        except Exception as exc:
            return exc

    results = await asyncio.gather(*(one(u) for u, _ in users))
    assert not [r for r in results if isinstance(r, Exception)]
    winners = [r for r in results if r.position == 0]
    assert len(winners) == 10
    assert await state.redis.hget(keys.game_state(game["id"]), "s:0") == "0"
    assert await db.fetchval("select count(*) from game_draws") == 5000
    assert await db.fetchval("select count(*) from game_draws where position = 0") == 10
    assert await db.fetchval("select count(*) from prize_deliveries") == 10
    while await deliver_prizes(state.pool):
        pass
    rows = await db.fetch(
        "select user_id, sum(amount) as n from points_entries where kind = 'prize' group by user_id"
    )
    assert len(rows) == 10 and all(r["n"] == 100 for r in rows)
    stats = (await client.get(f"{ADMIN}/{game['id']}/stats", headers=admin_headers)).json()
    assert stats["draws"] == 5000 and stats["players"] == 5000 and stats["winners"] == 10
    assert [(p["won"], p["remaining"]) for p in stats["prizes"]] == [(10, 0), (4990, None)]
    assert stats["cost_total"] == 1000


async def test_daily_chances_hold_under_a_burst_and_reset_the_next_day(
    client, db, make_user, admin_headers, monkeypatch
):
    _, headers = await make_user()
    ends = (engine.clock() + timedelta(days=3)).isoformat()
    game = await make_game(client, admin_headers, free_per_day=3, total_per_user=5, ends_at=ends)
    results = await asyncio.gather(*(draw(client, headers, game["id"]) for _ in range(30)))
    assert sorted(r.status_code for r in results) == [201] * 3 + [409] * 27
    assert {code_of(r) for r in results if r.status_code == 409} == {"game.no_chances"}
    assert await db.fetchval("select count(*) from game_draws") == 3

    # The store's next business day (its time zone, computed in Python): three fresh chances,
    # of which the lifetime cap of 5 leaves two.
    tomorrow = engine.clock() + timedelta(days=1)
    monkeypatch.setattr(engine, "clock", lambda: tomorrow)
    results = await asyncio.gather(*(draw(client, headers, game["id"]) for _ in range(10)))
    assert sorted(r.status_code for r in results) == [201] * 2 + [409] * 8
    assert {code_of(r) for r in results if r.status_code == 409} == {"game.limit_exceeded"}
    days = await db.fetch("select business_date, count(*) from game_draws group by 1 order by 1")
    assert [d["count"] for d in days] == [3, 2]
    assert days[1]["business_date"] - days[0]["business_date"] == timedelta(days=1)


async def test_paid_draws_debit_points_first_and_refunds_a_refused_draw(
    client, app, db, make_user, admin_headers
):
    user_id, headers = await make_user()
    game = await make_game(client, admin_headers, free_per_day=0, cost_points=5, total_per_user=2)
    r = await draw(client, headers, game["id"])
    assert r.status_code == 409 and code_of(r) == "game.no_chances"
    r = await draw(client, headers, game["id"], pay_with_points=True)
    assert r.status_code == 409 and code_of(r) == "points.insufficient"
    await earn_points(db, user_id, 17, kind="adjust", ref="gift")
    for key in ("a", "a", "b"):  # the repeated key neither draws nor pays twice
        r = await draw(client, headers, game["id"], key=key, pay_with_points=True)
        assert r.status_code == 201 and r.json()["paid"] is True
    # The lifetime cap refuses the third draw after the debit: the points come back.
    r = await draw(client, headers, game["id"], key="c", pay_with_points=True)
    assert r.status_code == 409 and code_of(r) == "game.limit_exceeded"
    entries = await db.fetch(
        "select kind, amount from points_entries where user_id = $1 order by id", user_id
    )
    assert [(e["kind"], e["amount"]) for e in entries] == [
        ("adjust", 17), ("draw", -5), ("draw", -5), ("draw", -5), ("draw_refund", 5),
    ]  # fmt: skip
    assert await db.fetchval("select balance from points_accounts where user_id = $1", user_id) == 7
    assert await db.fetchval("select sum(cost_points) from game_draws where paid") == 10
    plain = await make_game(client, admin_headers)
    r = await draw(client, headers, plain["id"], pay_with_points=True)
    assert r.status_code == 409 and code_of(r) == "game.no_paid_draws"


async def test_a_retry_after_a_refunded_refusal_pays_again(client, db, make_user, admin_headers):
    user_id, headers = await make_user()
    game = await make_game(client, admin_headers, free_per_day=0, cost_points=5)
    await earn_points(db, user_id, 10, kind="adjust", ref="gift")
    await client.post(f"{ADMIN}/{game['id']}/pause", headers=admin_headers)
    r = await draw(client, headers, game["id"], key="k", pay_with_points=True)
    assert r.status_code == 409 and code_of(r) == "game.paused"
    await client.post(f"{ADMIN}/{game['id']}/activate", headers=admin_headers)
    r = await draw(client, headers, game["id"], key="k", pay_with_points=True)
    assert r.status_code == 201
    r = await draw(client, headers, game["id"], key="k", pay_with_points=True)
    assert r.status_code == 201 and r.headers["Idempotent-Replayed"] == "true"
    r = await draw(client, headers, game["id"], key="k")  # the same key, another request
    assert r.status_code == 422 and code_of(r) == "idempotency.mismatch"
    entries = await db.fetch(
        "select kind, amount from points_entries where user_id = $1 order by id", user_id
    )
    assert [(e["kind"], e["amount"]) for e in entries] == [
        ("adjust", 10), ("draw", -5), ("draw_refund", 5), ("draw", -5),
    ]  # fmt: skip
    assert await db.fetchval("select balance from points_accounts where user_id = $1", user_id) == 5


async def test_the_client_cannot_choose_the_outcome(client, make_user, admin_headers):
    _, headers = await make_user()
    game = await make_game(client, admin_headers, free_per_day=5)
    for body in ({"prize": 0}, {"rand": 0}, {"position": 0}, {"slot_index": 0}):
        r = await draw(client, headers, game["id"], **body)
        assert r.status_code == 422, body
    r = await draw(client, headers, game["id"])
    assert r.status_code == 201


async def test_pity_gives_the_guaranteed_prize_after_n_losses_in_a_row(client, db, make_user, admin_headers):
    _, headers = await make_user()
    prizes = [
        {"name": "保底 20 积分", "kind": "points", "points": 20, "weight": 1},
        {**THANKS, "weight": 1_000_000},
    ]
    game = await make_game(
        client, admin_headers, prizes=prizes, free_per_day=9, pity_after=3, pity_position=0
    )
    kinds = []
    for _ in range(8):
        r = await draw(client, headers, game["id"])
        kinds.append((r.json()["prize"]["kind"], r.json()["pity"]))
    pity = ("points", True)
    loss = ("thanks", False)
    assert kinds == [loss, loss, loss, pity, loss, loss, loss, pity]
    assert await db.fetchval("select count(*) from game_draws where pity") == 2


async def test_refusals_outside_the_window_or_state(client, db, make_user, admin_headers):
    _, headers = await make_user()
    later = await make_game(
        client, admin_headers, starts_at=(engine.clock() + timedelta(hours=1)).isoformat()
    )
    r = await draw(client, headers, later["id"])
    assert r.status_code == 409 and code_of(r) == "game.not_started"
    game = await make_game(client, admin_headers)
    await client.post(f"{ADMIN}/{game['id']}/pause", headers=admin_headers)
    r = await draw(client, headers, game["id"])
    assert r.status_code == 409 and code_of(r) == "game.paused"
    await client.post(f"{ADMIN}/{game['id']}/end", headers=admin_headers)
    r = await draw(client, headers, game["id"])
    assert r.status_code == 409 and code_of(r) == "game.ended"
    draft = await make_game(client, admin_headers, activate=False)
    assert (await draw(client, headers, draft["id"])).status_code == 404
    assert (await draw(client, headers, 999)).status_code == 404
    egg = await make_game(client, admin_headers, type="egg")
    r = await draw(client, headers, egg["id"])
    assert r.status_code == 404 and code_of(r) == "game.not_found"
    assert (await draw(client, {}, game["id"])).status_code == 401


async def test_coupon_prizes_are_granted_outside_the_public_quota(client, app, db, make_user, admin_headers):
    user_id, headers = await make_user()
    template = await coupon_template(db)
    prizes = [{"name": "5 元券", "kind": "coupon", "coupon_template_id": template, "weight": 1}]
    game = await make_game(client, admin_headers, prizes=prizes, out_of_stock="redistribute")
    assert (await draw(client, headers, game["id"])).status_code == 201
    assert await deliver_prizes(app.state.pool) == 1
    coupon = await db.fetchrow("select * from coupons where user_id = $1", user_id)
    assert coupon["source"] == "game" and coupon["template_id"] == template
    record = (await client.get("/api/v1/games/prizes", headers=headers)).json()["items"][0]
    assert record["status"] == "delivered" and record["coupon_id"] == coupon["id"]


async def test_a_failed_delivery_is_retried_later(client, app, db, make_user, admin_headers):
    user_id, headers = await make_user()
    template = await coupon_template(db, status="paused")
    prizes = [{"name": "5 元券", "kind": "coupon", "coupon_template_id": template, "weight": 1}]
    game = await make_game(client, admin_headers, prizes=prizes, out_of_stock="redistribute")
    assert (await draw(client, headers, game["id"])).status_code == 201
    assert await deliver_prizes(app.state.pool) == 0
    row = await db.fetchrow("select status, attempts, last_error from prize_deliveries")
    assert row["status"] == "pending" and row["attempts"] == 1 and "paused" in row["last_error"]
    await db.execute("update coupon_templates set status = 'active' where id = $1", template)
    await db.execute("update prize_deliveries set next_attempt_at = now()")
    assert await deliver_prizes(app.state.pool) == 1
    assert await db.fetchval("select count(*) from coupons where user_id = $1", user_id) == 1


async def test_goods_are_claimed_with_an_address_as_a_zero_price_prize_order(
    client, app, db, make_user, admin_headers
):
    user_id, headers = await make_user()
    other_id, other = await make_user()
    _, (sku,) = await make_product(db, skus=[(19900, 5)])
    prizes = [{"name": "耳机", "kind": "goods", "sku_id": sku, "weight": 1, "stock": 2}]
    game = await make_game(client, admin_headers, prizes=prizes, out_of_stock="redistribute", free_per_day=2)
    assert (await draw(client, headers, game["id"])).status_code == 201
    assert (await draw(client, headers, game["id"])).status_code == 201
    assert await deliver_prizes(app.state.pool) == 2
    r = await client.get("/api/v1/games/prizes", params={"status": "awaiting_claim"}, headers=headers)
    first, second = sorted(p["id"] for p in r.json()["items"])
    address = await make_address(db, user_id)
    other_address = await make_address(db, other_id)
    claim = f"/api/v1/games/prizes/{first}/claim"
    assert (await client.post(claim, json={"address_id": address}, headers=other)).status_code == 404
    assert (await client.post(claim, json={"address_id": other_address}, headers=headers)).status_code == 404
    assert (await client.post(claim, json={}, headers=headers)).status_code == 422
    r = await client.post(claim, json={"address_id": address}, headers=headers)
    assert r.status_code == 201, r.text
    order = r.json()
    assert order["kind"] == "prize" and order["status"] == "paid" and order["payable_amount"] == 0
    assert order["address"]["receiver"] == "张三" and order["lines"][0]["sku_id"] == sku
    # Both units left SKU stock at activation; the claim consumed one of them, not a third.
    assert await db.fetchval("select stock from skus where id = $1", sku) == 3
    r = await client.post(claim, json={"address_id": address}, headers=headers)
    assert r.status_code == 409 and code_of(r) == "game.prize_not_claimable"

    # The second prize is never claimed: after the window its unit returns to the prize stock once.
    keys = Keys(app.state.settings.redis_prefix)
    assert await app.state.redis.hget(keys.game_state(game["id"]), "s:0") == "0"
    await db.execute(
        "update prize_deliveries set claim_deadline = now() - interval '1 second' where id = $1", second
    )
    assert await expire_unclaimed_goods(app.state.pool, app.state.scripts, keys) == 1
    assert await expire_unclaimed_goods(app.state.pool, app.state.scripts, keys) == 0
    assert await app.state.redis.hget(keys.game_state(game["id"]), "s:0") == "1"
    r = await client.post(
        f"/api/v1/games/prizes/{second}/claim", json={"address_id": address}, headers=headers
    )
    assert r.status_code == 409


async def test_paid_orders_and_merchant_tasks_grant_extra_chances_within_the_daily_cap(
    client, app, db, make_user, admin_headers
):
    game = await make_game(
        client, admin_headers, free_per_day=0, chances_per_paid_order=1, extra_per_day_cap=2
    )
    order_id = await paid_order(client, db, make_user)
    user_id = await db.fetchval("select user_id from orders where id = $1", order_id)
    await dispatch_order_events(app.state.pool, ctx_of(app))
    assert await db.fetchval("select sum(amount) from game_chance_grants where user_id = $1", user_id) == 1
    # Granted in the event's transaction; Redis is told after its commit, by the worker.
    assert (
        await engine.restore_pending(app.state.pool, app.state.scripts, Keys(app.state.settings.redis_prefix))
        == 1
    )
    r = await client.post(
        f"{ADMIN}/{game['id']}/chances",
        json={"user_id": user_id, "amount": 5, "ref": "invite:42"},
        headers=admin_headers,
    )
    assert r.status_code == 200 and r.json() == {"granted": 1}  # the daily cap leaves one
    r = await client.post(
        f"{ADMIN}/{game['id']}/chances",
        json={"user_id": user_id, "amount": 1, "ref": "invite:43"},
        headers=admin_headers,
    )
    assert r.json() == {"granted": 0}
    r = await client.post(
        f"{ADMIN}/{game['id']}/chances",
        json={"user_id": 999999, "amount": 1, "ref": "x"},
        headers=admin_headers,
    )
    assert r.status_code == 404
    headers = {"Authorization": f"Bearer {issue_access_token(app.state.settings, user_id, AUD_SHOPPER)}"}
    results = [await draw(client, headers, game["id"]) for _ in range(3)]
    assert [r.status_code for r in results] == [201, 201, 409]


async def test_invited_shoppers_who_log_in_give_their_inviter_chances_once(
    client, app, db, settings, admin_headers
):
    game = await make_game(client, admin_headers, free_per_day=0, chances_per_invite=1, extra_per_day_cap=2)
    [(inviter, headers)] = await many_users(db, settings, 1)
    # First logins with an inviter create these rows (shop/auth.py); one before the game does not count.
    await db.execute(
        "insert into users (nickname, inviter_id, created_at) values ('early', $1, now() - interval '1 day')",
        inviter,
    )
    await db.execute(
        "insert into users (nickname, inviter_id) select 'friend' || g, $1 from generate_series(1, 3) g",
        inviter,
    )
    state, keys = app.state, Keys(settings.redis_prefix)
    runs = await asyncio.gather(
        *(engine.grant_invite_chances(state.pool, state.scripts, keys, settings) for _ in range(3))
    )
    assert sum(runs) == 2  # three invitees, a daily cap of two
    assert await engine.grant_invite_chances(state.pool, state.scripts, keys, settings) == 0
    rows = await db.fetch("select amount from game_chance_grants where source = 'invite' order by ref")
    assert sorted(r["amount"] for r in rows) == [0, 1, 1]
    results = [await draw(client, headers, game["id"]) for _ in range(3)]
    assert [r.status_code for r in results] == [201, 201, 409]


async def test_concurrent_paid_draws_with_one_key_pay_exactly_once(client, db, make_user, admin_headers):
    user_id, headers = await make_user()
    game = await make_game(client, admin_headers, free_per_day=0, cost_points=5)
    await earn_points(db, user_id, 10, kind="adjust", ref="gift")
    # Refused while paused: every concurrent duplicate is paid back, none draws.
    await client.post(f"{ADMIN}/{game['id']}/pause", headers=admin_headers)
    refused = await asyncio.gather(
        *(draw(client, headers, game["id"], key="k", pay_with_points=True) for _ in range(10))
    )
    assert {(r.status_code, code_of(r)) for r in refused} == {(409, "game.paused")}
    assert await db.fetchval("select balance from points_accounts where user_id = $1", user_id) == 10
    # Live: one draw, paid once, the duplicates replay it.
    await client.post(f"{ADMIN}/{game['id']}/activate", headers=admin_headers)
    drawn = await asyncio.gather(
        *(draw(client, headers, game["id"], key="k", pay_with_points=True) for _ in range(10))
    )
    assert [r.status_code for r in drawn] == [201] * 10
    assert len({r.json()["draw_no"] for r in drawn}) == 1
    assert await db.fetchval("select count(*) from game_draws where user_id = $1", user_id) == 1
    assert await db.fetchval("select balance from points_accounts where user_id = $1", user_id) == 5


async def test_a_paid_draw_is_replayed_from_postgres_after_redis_forgets_the_key(
    client, app, db, settings, make_user, admin_headers
):
    user_id, headers = await make_user()
    game = await make_game(client, admin_headers, free_per_day=0, cost_points=5)
    await earn_points(db, user_id, 10, kind="adjust", ref="gift")
    first = await draw(client, headers, game["id"], key="k", pay_with_points=True)
    assert first.status_code == 201
    # Redis's idempotency record expires after a day (or Redis is lost): the retry must not draw again.
    await app.state.redis.delete(Keys(settings.redis_prefix).game_idem(game["id"], user_id, "k"))
    again = await draw(client, headers, game["id"], key="k", pay_with_points=True)
    assert again.status_code == 201 and again.headers["Idempotent-Replayed"] == "true"
    assert again.json()["draw_no"] == first.json()["draw_no"]
    assert await db.fetchval("select count(*) from game_draws where user_id = $1", user_id) == 1
    assert await db.fetchval("select balance from points_accounts where user_id = $1", user_id) == 5


async def test_the_fast_route_and_the_litestar_route_answer_alike(
    client, app, db, settings, make_user, admin_headers
):
    """The wheel draw served from ASGI (default) and by Litestar (SHOP_FAST_ROUTES=false): same
    statuses, codes, detail fields and headers."""
    import msgspec

    async def scenarios(fast: bool) -> list:
        app.state.settings = msgspec.structs.replace(settings, fast_routes=fast)
        _, headers = await make_user()
        game = await make_game(
            client, admin_headers, prizes=ONLY_POINTS, free_per_day=2, out_of_stock="redistribute"
        )
        path = f"/api/v1/games/{game['id']}/draw"
        requests = [
            {},  # no bearer token
            {"headers": headers, "content": b"{oops", "extra": {"content-type": "application/json"}},
            {"headers": headers, "json": {"prize": 0}},  # the client cannot choose
            {"headers": headers, "json": {"pay_with_points": "yes"}},
            {"headers": {**headers, "Idempotency-Key": "x" * 200}},
            {"headers": {**headers, "Idempotency-Key": "spin"}},  # no body: a free draw
            {"headers": {**headers, "Idempotency-Key": "spin"}, "json": {}},  # the replay
            {"headers": headers, "json": {"pay_with_points": False}},
            {"headers": headers},  # no chances left today
            {"headers": headers, "json": {"pay_with_points": True}},  # no points
            {"content": b"{oops", "extra": {"content-type": "application/json"}},  # no token, bad body
            {"headers": headers, "content": b"   ", "extra": {"content-type": "application/json"}},
            {"headers": {**headers, "Idempotency-Key": "spin-null"}, "content": b"null",
             "extra": {"content-type": "application/json"}},  # null is no body: a draw (none left: 409)
        ]  # fmt: skip
        seen = []
        for spec in requests:
            h = {**spec.get("headers", {}), **spec.get("extra", {})}
            kwargs = {k: spec[k] for k in ("json", "content") if k in spec}
            r = await client.post(path, headers=h, **kwargs)
            body = r.json()
            seen.append(
                (
                    r.status_code,
                    body["error"]["code"] if "error" in body else body["prize"]["kind"],
                    [d["field"] for d in body["error"].get("details", [])] if "error" in body else [],
                    r.headers.get("idempotent-replayed"),
                    bool(r.headers.get("x-request-id")),
                    r.headers.get("content-length") == str(len(r.content)),
                )
            )
        return seen

    fast, routed = await scenarios(True), await scenarios(False)
    app.state.settings = settings
    assert fast == routed
    assert [s[0] for s in fast] == [401, 422, 422, 422, 422, 201, 201, 201, 409, 409, 422, 422, 409]
    assert all(s[5] for s in fast)
    assert fast[2][2] == ["prize"] and fast[3][2] == ["pay_with_points"] and fast[6][3] == "true"

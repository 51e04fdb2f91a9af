"""The points ledger: append-only entries, a balance never below zero, refund debt repaid first."""

from __future__ import annotations

import asyncio

import pytest

from shop.errors import Conflict
from shop.events import dispatch_order_events, record_event
from shop.points import earn_points, points_balance, reverse_points, spend_points
from tests.shop.test_events import paid_order
from tests.shop.test_hotpath import ctx_of


async def test_earn_spend_and_the_same_reference_only_once(db, make_user):
    user_id, _ = await make_user()
    entry = await earn_points(db, user_id, 100, kind="adjust", ref="welcome")
    assert (entry.amount, entry.balance_after) == (100, 100)
    assert await earn_points(db, user_id, 100, kind="adjust", ref="welcome") is None
    assert (await spend_points(db, user_id, 30, kind="draw", ref="d1")).balance_after == 70
    assert await spend_points(db, user_id, 30, kind="draw", ref="d1") is None
    with pytest.raises(Conflict) as exc:
        await spend_points(db, user_id, 71, kind="draw", ref="d2")
    assert exc.value.code == "points.insufficient"
    assert await points_balance(db, user_id) == (70, 0)
    assert await db.fetchval("select count(*) from points_entries") == 2


async def test_concurrent_spends_never_take_the_balance_below_zero(client, app, db, make_user):
    user_id, _ = await make_user()
    await earn_points(db, user_id, 50, kind="adjust", ref="gift")

    async def spend(i: int):
        async with app.state.pool.acquire() as conn:
            try:
                return await spend_points(conn, user_id, 10, kind="draw", ref=f"d{i}")
            except Conflict:
                return None

    results = await asyncio.gather(*(spend(i) for i in range(20)))
    assert sum(r is not None for r in results) == 5
    assert await points_balance(db, user_id) == (0, 0)


async def test_a_reversal_of_spent_points_leaves_a_debt_that_earnings_repay_first(db, make_user):
    user_id, _ = await make_user()
    await earn_points(db, user_id, 100, kind="order", ref="order:1")
    await spend_points(db, user_id, 80, kind="draw", ref="d1")
    entry = await reverse_points(db, user_id, 100, kind="refund_reversal", ref="refund:1:1")
    assert (entry.amount, entry.balance_delta, entry.debt_delta, entry.balance_after) == (-100, -20, 80, 0)
    assert await points_balance(db, user_id) == (0, 80)
    entry = await earn_points(db, user_id, 50, kind="prize", ref="prize:1")
    assert (entry.balance_delta, entry.debt_delta) == (0, -50)
    entry = await earn_points(db, user_id, 50, kind="prize", ref="prize:2")
    assert (entry.balance_delta, entry.debt_delta, entry.balance_after) == (20, -30, 20)
    assert await points_balance(db, user_id) == (20, 0)


async def test_points_endpoint_lists_the_shoppers_own_entries(client, db, make_user):
    user_id, headers = await make_user()
    other_id, _ = await make_user()
    for i in range(3):
        await earn_points(db, user_id, 10 + i, kind="adjust", ref=f"u{i}")
    await earn_points(db, other_id, 999, kind="adjust", ref="other")
    r = await client.get("/api/v1/points", params={"limit": 2}, headers=headers)
    assert r.status_code == 200
    page = r.json()
    assert page["balance"] == 33 and page["debt"] == 0
    assert [e["amount"] for e in page["items"]] == [12, 11] and page["next_cursor"]
    r = await client.get("/api/v1/points", params={"cursor": page["next_cursor"]}, headers=headers)
    assert [e["amount"] for e in r.json()["items"]] == [10] and r.json()["next_cursor"] is None
    assert (await client.get("/api/v1/points")).status_code == 401
    assert (await client.get("/api/v1/points", params={"limit": 0}, headers=headers)).status_code in (
        400,
        422,
    )
    _, fresh = await make_user()
    assert (await client.get("/api/v1/points", headers=fresh)).json() == {
        "balance": 0, "debt": 0, "items": [], "next_cursor": None,
    }  # fmt: skip


async def test_completed_orders_earn_at_the_configured_rate_and_refunds_reverse_them(
    client, app, db, make_user, admin_headers
):
    r = await client.put("/api/v1/admin/points/rule", json={"points_per_yuan": 2}, headers=admin_headers)
    assert r.status_code == 200 and r.json() == {"points_per_yuan": 2}
    assert (await client.get("/api/v1/admin/points/rule", headers=admin_headers)).json() == {
        "points_per_yuan": 2
    }
    assert (
        await client.put("/api/v1/admin/points/rule", json={"points_per_yuan": -1}, headers=admin_headers)
    ).status_code == 422
    assert (await client.get("/api/v1/admin/points/rule")).status_code == 401

    order_id = await paid_order(client, db, make_user)
    order = await db.fetchrow("select user_id, paid_amount from orders where id = $1", order_id)
    await db.execute("update orders set status = 'completed', completed_at = now() where id = $1", order_id)
    await record_event(db, order_id, "order.completed", {"by": "test"})
    await dispatch_order_events(app.state.pool, ctx_of(app))
    earned = order["paid_amount"] // 100 * 2
    assert await points_balance(db, order["user_id"]) == (earned, 0)

    # The shopper spends most of it, then a partial refund takes back its share: the rest is debt.
    await spend_points(db, order["user_id"], earned - 10, kind="draw", ref="d1")
    refund = order["paid_amount"] // 2
    await db.execute(
        "update orders set refunded_amount = $2 where id = $1", order_id, refund
    )  # finish_refund
    await record_event(db, order_id, "order.refunded", {"refund_id": 7, "amount": refund})
    await dispatch_order_events(app.state.pool, ctx_of(app))
    await dispatch_order_events(app.state.pool, ctx_of(app))
    taken = earned - (order["paid_amount"] - refund) // 100 * 2
    assert await points_balance(db, order["user_id"]) == (max(10 - taken, 0), max(taken - 10, 0))
    assert await db.fetchval("select count(*) from points_entries where kind = 'refund_reversal'") == 1


@pytest.mark.parametrize("completion_first", [True, False])
async def test_a_refund_that_finished_before_the_earning_is_not_taken_back_twice(
    client, app, db, make_user, completion_first
):
    # The refund finished while `order.completed` waited (a backlog, a failed handler's retry):
    # the earning already leaves it out, in whichever order the two events are delivered.
    order_id = await paid_order(client, db, make_user)
    order = await db.fetchrow("select user_id, paid_amount from orders where id = $1", order_id)
    refund = order["paid_amount"] // 3
    await db.execute(
        "update orders set status = 'completed', completed_at = now(), refunded_amount = $2 where id = $1",
        order_id,
        refund,
    )
    completed = await record_event(db, order_id, "order.completed", {"by": "test"})
    refunded = await record_event(db, order_id, "order.refunded", {"refund_id": 9, "amount": refund})
    first, second = (completed, refunded) if completion_first else (refunded, completed)
    await db.execute(
        "update order_events set next_attempt_at = now() + interval '1 hour' where id = $1", second
    )
    assert await dispatch_order_events(app.state.pool, ctx_of(app)) >= 1
    assert await db.fetchval("select dispatched_at is not null from order_events where id = $1", first)
    await db.execute("update order_events set next_attempt_at = now() where id = $1", second)
    assert await dispatch_order_events(app.state.pool, ctx_of(app)) >= 1
    assert await db.fetchval("select count(*) from order_events where dispatched_at is null") == 0
    kept_points = (order["paid_amount"] - refund) // 100
    assert await points_balance(db, order["user_id"]) == (kept_points, 0)
    assert await db.fetchval("select count(*) from points_entries where kind = 'refund_reversal'") == 0
    # A second refund later takes back only its own share.
    await db.execute("update orders set refunded_amount = $2 where id = $1", order_id, 2 * refund)
    await record_event(db, order_id, "order.refunded", {"refund_id": 10, "amount": refund})
    await dispatch_order_events(app.state.pool, ctx_of(app))
    assert await points_balance(db, order["user_id"]) == ((order["paid_amount"] - 2 * refund) // 100, 0)

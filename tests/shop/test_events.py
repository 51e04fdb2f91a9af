"""The order-events outbox: at-least-once dispatch, each handler's effect exactly once."""

from __future__ import annotations

import asyncio

import pytest

from shop import events
from shop.events import dispatch_order_events, on_order_event, record_event
from shop.orders.jobs import dispatch_events
from tests.factories import make_address, make_product
from tests.shop.test_hotpath import ctx_of


@pytest.fixture
def handlers():
    saved = {k: list(v) for k, v in events.HANDLERS.items()}
    yield events.HANDLERS
    events.HANDLERS.clear()
    events.HANDLERS.update(saved)


async def paid_order(client, db, make_user) -> int:
    user_id, headers = await make_user()
    address_id = await make_address(db, user_id)
    _, (sku,) = await make_product(db)
    order = (
        await client.post(
            "/api/v1/orders",
            json={"items": [{"sku_id": sku, "qty": 1}], "address_id": address_id},
            headers=headers,
        )
    ).json()
    await client.post(f"/api/v1/payments/sandbox/{order['order_no']}/simulate", headers=headers)
    return order["id"]


async def test_each_handler_acts_once_per_event_even_with_concurrent_dispatchers(
    client, app, db, make_user, handlers
):
    await db.execute("create table if not exists test_effects (event_id bigint, handler text)")
    await db.execute("truncate test_effects")

    async def effect(conn, event, ctx, name):
        await conn.execute("insert into test_effects values ($1, $2)", event.id, name)

    on_order_event("order.paid", "test.grant_points")(lambda c, e, x: effect(c, e, x, "points"))
    on_order_event("order.paid", "test.rebate")(lambda c, e, x: effect(c, e, x, "rebate"))
    order_ids = [await paid_order(client, db, make_user) for _ in range(5)]
    pool = app.state.pool
    await asyncio.gather(*(dispatch_order_events(pool, None, batch=3) for _ in range(4)))
    while await dispatch_order_events(pool, None):
        pass
    effects = await db.fetch(
        "select handler, count(*) as n from test_effects group by handler order by handler"
    )
    assert [(r["handler"], r["n"]) for r in effects] == [("points", 5), ("rebate", 5)]
    assert await db.fetchval("select count(*) from order_events where dispatched_at is null") == 0
    # Re-dispatching an event (as after a crash) does not repeat an effect.
    await db.execute("update order_events set dispatched_at = null")
    await dispatch_order_events(pool, None)
    assert await db.fetchval("select count(*) from test_effects") == 10
    assert len(order_ids) == 5
    await db.execute("drop table test_effects")


async def test_a_backlog_is_worked_off_in_one_run_of_the_job_even_by_two_workers(client, app, db, handlers):
    # A live stream's payments: 450 events due at once. The job used to take 100 a second.
    handlers.clear()
    await db.execute("create table if not exists test_effects (event_id bigint, handler text)")
    await db.execute("truncate test_effects")

    async def effect(conn, event, ctx):
        await conn.execute("insert into test_effects values ($1, 'count')", event.id)

    on_order_event("order.paid", "test.count")(effect)
    await db.execute(
        """insert into order_events (order_id, type, payload)
           select g, 'order.paid', '{}'::jsonb from generate_series(1, 450) g"""
    )
    ctx = ctx_of(app)
    first, second = await asyncio.gather(dispatch_events(ctx), dispatch_events(ctx))
    assert first + second == 450 and first > 0 and second > 0
    assert await db.fetchval("select count(*) from order_events where dispatched_at is null") == 0
    assert await db.fetchval("select count(distinct event_id) from test_effects") == 450
    assert await db.fetchval("select count(*) from test_effects") == 450
    # A quiet outbox: one run dispatches nothing and returns at once.
    assert await dispatch_events(ctx) == 0
    await db.execute("drop table test_effects")


async def test_a_failing_handler_is_retried_without_repeating_the_others(
    client, app, db, make_user, handlers
):
    calls = {"ok": 0, "flaky": 0}

    async def ok(conn, event, ctx):
        calls["ok"] += 1

    async def flaky(conn, event, ctx):
        calls["flaky"] += 1
        if calls["flaky"] == 1:
            raise RuntimeError("downstream unavailable")

    on_order_event("order.paid", "test.ok")(ok)
    on_order_event("order.paid", "test.flaky")(flaky)
    order_id = await paid_order(client, db, make_user)
    pool = app.state.pool
    await dispatch_order_events(pool, None)
    row = await db.fetchrow(
        "select attempts, last_error, dispatched_at from order_events where type = 'order.paid'"
    )
    assert (
        row["attempts"] == 1
        and "downstream unavailable" in row["last_error"]
        and row["dispatched_at"] is None
    )
    await dispatch_order_events(pool, None)  # not due yet: backoff
    assert calls == {"ok": 1, "flaky": 1}
    await db.execute("update order_events set next_attempt_at = now() where order_id = $1", order_id)
    await dispatch_order_events(pool, None)
    assert calls == {"ok": 1, "flaky": 2}
    assert await db.fetchval("select dispatched_at is not null from order_events where type = 'order.paid'")


async def test_event_types_are_checked(db):
    with pytest.raises(ValueError):
        on_order_event("order.exploded", "x")
    with pytest.raises(ValueError):
        await record_event(db, 1, "order.exploded")

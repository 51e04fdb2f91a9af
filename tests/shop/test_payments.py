"""Paying orders: payment attempts, signed notifications (replays, forgeries), and the timeout race."""

from __future__ import annotations

import asyncio
import json

import pytest

from shop.orders.service import cancel_expired_orders
from shop.payments.sandbox import SandboxProvider
from shop.payments.service import sync_payment_closes
from shop.refunds import process_refunds
from tests.factories import make_address, make_product, stock_of


@pytest.fixture
async def buyer(db, make_user):
    user_id, headers = await make_user("buyer")
    return user_id, headers, await make_address(db, user_id)


async def new_order(client, headers, address_id, sku, qty=1):
    r = await client.post(
        "/api/v1/orders",
        json={"items": [{"sku_id": sku, "qty": qty}], "address_id": address_id},
        headers=headers,
    )
    assert r.status_code == 201, r.text
    return r.json()


async def open_payment(client, headers, order):
    r = await client.post(f"/api/v1/orders/{order['id']}/pay", headers=headers)
    assert r.status_code == 200, r.text
    return r.json()


def signed(settings, payment, *, amount=None, transaction_id="TX1", timestamp=None, trade_state="SUCCESS"):
    provider = SandboxProvider(settings.sandbox_secret)
    return provider.sign_notification(
        {
            "out_trade_no": payment["out_trade_no"],
            "transaction_id": transaction_id,
            "amount": payment["amount"] if amount is None else amount,
            "trade_state": trade_state,
        },
        timestamp=timestamp,
    )


async def notify(client, headers, body):
    return await client.post("/api/v1/payments/sandbox/notify", content=body, headers=headers)


async def test_pay_opens_one_attempt_at_a_time(client, db, buyer):
    _, headers, address_id = buyer
    _, (sku,) = await make_product(db, skus=[(2500, 10)])
    order = await new_order(client, headers, address_id, sku)
    first = await open_payment(client, headers, order)
    assert first["provider"] == "sandbox" and first["amount"] == order["payable_amount"]
    assert first["expires_at"] == order["pay_deadline"]
    second = await open_payment(client, headers, order)
    assert second["out_trade_no"] != first["out_trade_no"]
    rows = await db.fetch("select out_trade_no, status from payments order by id")
    assert [r["status"] for r in rows] == ["closed", "open"]
    r = await client.post("/api/v1/orders/999999/pay", headers=headers)
    assert (r.status_code, r.json()["error"]["code"]) == (404, "order.not_found")
    r = await client.post(f"/api/v1/orders/{order['id']}/pay")
    assert r.status_code == 401


async def test_notification_replayed_ten_times_pays_once(client, db, settings, buyer):
    _, headers, address_id = buyer
    _, (sku,) = await make_product(db, skus=[(2500, 10)])
    order = await new_order(client, headers, address_id, sku)
    payment = await open_payment(client, headers, order)
    h, body = signed(settings, payment)
    first = await notify(client, h, body)
    assert first.status_code == 200 and first.json() == {"code": "SUCCESS", "message": "OK"}
    rest = await asyncio.gather(*(notify(client, h, body) for _ in range(6)))
    rest += [await notify(client, h, body) for _ in range(3)]
    assert all(r.status_code == 200 for r in rest)
    r = await client.get(f"/api/v1/orders/{order['id']}", headers=headers)
    assert r.json()["status"] == "paid" and r.json()["paid_amount"] == payment["amount"]
    assert await db.fetchval("select count(*) from order_events where type = 'order.paid'") == 1
    assert await db.fetchval("select count(*) from payments where status = 'paid'") == 1
    assert await db.fetchval("select count(*) from refunds") == 0


async def test_forged_notifications_are_rejected_and_change_nothing(client, db, settings, buyer):
    _, headers, address_id = buyer
    _, (sku,) = await make_product(db, skus=[(2500, 10)])
    order = await new_order(client, headers, address_id, sku)
    payment = await open_payment(client, headers, order)
    h, body = signed(settings, payment)
    tampered = json.loads(body)
    tampered["amount"] = 1
    stale_h, stale_body = signed(settings, payment, timestamp=1_000_000_000)
    wrong_h, wrong_body = signed(settings, payment, amount=payment["amount"] - 1)
    unpaid_h, unpaid_body = signed(settings, payment, trade_state="NOTPAY")
    forged_h, forged_body = SandboxProvider("not-the-shop-secret-000000").sign_notification(json.loads(body))
    cases = [
        (h, json.dumps(tampered).encode(), "bad_signature"),
        ({}, body, "unsigned"),
        (stale_h, stale_body, "stale"),
        (wrong_h, wrong_body, "amount_mismatch"),
        (unpaid_h, unpaid_body, "not_paid"),
        (forged_h, forged_body, "bad_signature"),
    ]
    for case_headers, case_body, reason in cases:
        r = await notify(client, case_headers, case_body)
        assert r.status_code == 400 and r.json() == {"code": "FAIL", "message": reason}
    r = await client.get(f"/api/v1/orders/{order['id']}", headers=headers)
    assert r.json()["status"] == "pending_payment"
    assert await db.fetchval("select count(*) from payments where status = 'paid'") == 0
    # Then the genuine one goes through.
    assert (await notify(client, h, body)).status_code == 200
    assert (await client.get(f"/api/v1/orders/{order['id']}", headers=headers)).json()["status"] == "paid"


async def test_simulate_is_sandbox_only_and_own_orders_only(client, db, buyer, make_user):
    _, headers, address_id = buyer
    _, other = await make_user("other")
    _, (sku,) = await make_product(db, skus=[(2500, 10)])
    order = await new_order(client, headers, address_id, sku)
    r = await client.post(f"/api/v1/payments/sandbox/{order['order_no']}/simulate", headers=other)
    assert r.status_code == 404
    r = await client.post(f"/api/v1/payments/sandbox/{order['order_no']}/simulate", headers=headers)
    assert r.status_code == 200 and r.json()["order_status"] == "paid"
    r = await client.post("/api/v1/payments/wechatpay/notify", content=b"{}")
    assert (r.status_code, r.json()["error"]["code"]) == (404, "payment.unknown_provider")


async def test_payment_racing_timeout_ends_paid_or_cancelled_with_refund(
    client, app, db, settings, make_user
):
    """100 orders: each notification races the timeout cancel; never both, stock always right."""
    _, (sku,) = await make_product(db, skus=[(1200, 100)])
    orders = []
    for i in range(100):
        user_id, headers = await make_user(f"u{i}")
        address_id = await make_address(db, user_id)
        order = await new_order(client, headers, address_id, sku)
        orders.append((order, await open_payment(client, headers, order)))
    assert await stock_of(db, sku) == 0
    pool = app.state.pool
    # The first 40 time out before any notification (so both outcomes surely occur); the other 60
    # expire too, and their notifications race the cancellers.
    await db.execute(
        "update orders set pay_deadline = now() - interval '1 second' where id = any($1::bigint[])",
        [order["id"] for order, _ in orders[:40]],
    )
    assert await cancel_expired_orders(pool) == 40
    await db.execute(
        "update orders set pay_deadline = now() - interval '1 second' where status = 'pending_payment'"
    )
    notices = [signed(settings, payment, transaction_id=f"TX{i}") for i, (_, payment) in enumerate(orders)]
    results = await asyncio.gather(
        *(notify(client, h, body) for h, body in notices),
        *(cancel_expired_orders(pool, batch=10) for _ in range(12)),
    )
    assert all(r.status_code == 200 for r in results[:100])
    # Any order the cancellers did not reach yet is cancelled now if unpaid.
    while await cancel_expired_orders(pool):
        pass
    rows = await db.fetch("select id, status from orders")
    paid = {r["id"] for r in rows if r["status"] == "paid"}
    cancelled = {r["id"] for r in rows if r["status"] == "cancelled"}
    assert len(paid) + len(cancelled) == 100
    # Every cancelled order's payment is being refunded by the system, and only those.
    refunds = await db.fetch("select order_id, amount, origin from refunds")
    assert len(cancelled) >= 40
    assert {r["order_id"] for r in refunds} == cancelled
    payable = orders[0][0]["payable_amount"]  # 1200 + shipping
    assert [(r["origin"], r["amount"]) for r in refunds] == [("system", payable)] * len(cancelled)
    assert await stock_of(db, sku) == len(cancelled)
    events = await db.fetchval("select count(*) from order_events where type = 'order.paid_after_cancel'")
    assert events == len(cancelled)
    # The worker sends those refunds once.
    assert await process_refunds(pool, app.state.providers, batch=200) == len(cancelled)
    assert await process_refunds(pool, app.state.providers, batch=200) == 0
    assert await db.fetchval("select count(*) from refunds where status = 'succeeded'") == len(cancelled)
    assert (
        await db.fetchval("select count(*) from orders where status = 'cancelled' and paid_amount <> 0") == 0
    )


async def test_payments_whose_close_keeps_failing_back_off_and_never_block_the_others(client, app, db, buyer):
    # 60 closed payments of a provider this deployment no longer has sit at the head of the queue;
    # a shopper's superseded attempt behind them is still closed at the provider in the next run.
    _, headers, address_id = buyer
    _, (sku,) = await make_product(db)
    order = await new_order(client, headers, address_id, sku)
    await db.execute(
        """insert into payments (order_id, provider, out_trade_no, amount, status, expires_at, closed_at)
           select $1, 'wechatpay', 'GONE' || g, 100, 'closed', now(), now() from generate_series(1, 60) g""",
        order["id"],
    )
    first = await open_payment(client, headers, order)
    await open_payment(client, headers, order)  # supersedes the first: closed here, to close there
    pool, settings, providers = app.state.pool, app.state.settings, app.state.providers
    assert "wechatpay" not in providers
    assert await sync_payment_closes(pool, settings, providers) == 0  # the first 50: all fail
    assert await sync_payment_closes(pool, settings, providers) == 1  # the rest: the shopper's closes
    assert await db.fetchval(
        "select close_synced from payments where out_trade_no = $1", first["out_trade_no"]
    )
    failing = await db.fetch(
        "select close_attempts, close_next_attempt_at > now() as later from payments where provider = 'wechatpay'"
    )
    assert len(failing) == 60 and all(r["close_attempts"] == 1 and r["later"] for r in failing)
    assert await sync_payment_closes(pool, settings, providers) == 0  # backing off: not asked again yet
    assert await db.fetchval("select max(close_attempts) from payments where provider = 'wechatpay'") == 1

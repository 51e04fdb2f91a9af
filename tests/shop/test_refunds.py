"""Refund requests: before and after shipping, partial lines, ceilings under concurrency, worker retries."""

from __future__ import annotations

import asyncio

import pytest

from shop.refunds import finish_refund, process_refunds
from tests.factories import make_address, make_product, stock_of


@pytest.fixture
async def paid_order(client, db, make_user):
    """A paid order of 3 × SKU a (3000 fen) + 1 × SKU b (1000 fen), shipping 800 fen."""
    user_id, headers = await make_user("buyer")
    address_id = await make_address(db, user_id)
    _, (a, b) = await make_product(db, skus=[(1000, 10), (1000, 10)])
    await db.execute("update shipping_rule set free_threshold = null, flat_fee = 800")
    r = await client.post(
        "/api/v1/orders",
        json={"items": [{"sku_id": a, "qty": 3}, {"sku_id": b, "qty": 1}], "address_id": address_id},
        headers=headers,
    )
    order = r.json()
    r = await client.post(f"/api/v1/payments/sandbox/{order['order_no']}/simulate", headers=headers)
    assert r.json()["order_status"] == "paid"
    return order, headers, a, b


async def refund(client, headers, order, body, key=None):
    h = {**headers, **({"Idempotency-Key": key} if key else {})}
    return await client.post(f"/api/v1/orders/{order['id']}/refunds", json=body, headers=h)


async def get_order(client, headers, order):
    return (await client.get(f"/api/v1/orders/{order['id']}", headers=headers)).json()


async def test_full_refund_before_shipping_is_automatic(client, app, db, paid_order):
    order, headers, a, b = paid_order
    assert order["payable_amount"] == 4800
    r = await refund(client, headers, order, {"reason": "不想要了"})
    assert r.status_code == 201, r.text
    body = r.json()
    assert body["status"] == "approved" and body["amount"] == 4800 and body["restock"] is True
    assert sorted((ln["qty"], ln["amount"]) for ln in body["lines"]) == [(1, 1000), (3, 3000)]
    assert await stock_of(db, a) == 10 and await stock_of(db, b) == 10
    assert (await get_order(client, headers, order))["status"] == "refunding"
    assert await process_refunds(app.state.pool, app.state.providers) == 1
    final = await get_order(client, headers, order)
    assert final["status"] == "refunded" and final["refunded_amount"] == 4800
    r = await refund(client, headers, order, {"reason": "again"})
    assert (r.status_code, r.json()["error"]["code"]) == (409, "refund.not_allowed")
    types = [e["type"] for e in await db.fetch("select type from order_events order by id")]
    assert types == [
        "order.created",
        "order.paid",
        "order.refund_requested",
        "order.refund_approved",
        "order.refunded",
    ]


async def test_partial_refunds_never_exceed_what_was_paid(client, app, db, paid_order):
    order, headers, a, _ = paid_order
    line_a = next(ln for ln in order["lines"] if ln["sku_id"] == a)
    r = await refund(
        client, headers, order, {"reason": "one broke", "lines": [{"line_id": line_a["id"], "qty": 1}]}
    )
    assert r.status_code == 201 and r.json()["amount"] == 1000
    assert await stock_of(db, a) == 8
    r = await refund(
        client,
        headers,
        order,
        {"reason": "too much", "lines": [{"line_id": line_a["id"], "qty": 0, "amount": 2001}]},
    )
    assert (r.status_code, r.json()["error"]["code"]) == (409, "refund.exceeds_paid")
    r = await refund(
        client, headers, order, {"reason": "qty", "lines": [{"line_id": line_a["id"], "qty": 3}]}
    )
    assert (r.status_code, r.json()["error"]["code"]) == (409, "refund.exceeds_paid")
    r = await refund(client, headers, order, {"reason": "x", "lines": [{"line_id": 999999, "qty": 1}]})
    assert (r.status_code, r.json()["error"]["code"]) == (404, "order.line_not_found")
    r = await refund(client, headers, order, {"reason": "", "lines": [{"line_id": line_a["id"], "qty": 1}]})
    assert r.status_code == 422
    # 10 concurrent requests for the rest of line a (2000 fen): exactly one gets it.
    results = await asyncio.gather(
        *(
            refund(client, headers, order, {"reason": "rest", "lines": [{"line_id": line_a["id"], "qty": 2}]})
            for _ in range(10)
        )
    )
    assert sorted(r.status_code for r in results) == [201] + [409] * 9
    line = await db.fetchrow(
        "select refunded_qty, refunded_amount, payable_amount from order_lines where id = $1", line_a["id"]
    )
    assert (line["refunded_qty"], line["refunded_amount"]) == (3, 3000) == (3, line["payable_amount"])
    assert await process_refunds(app.state.pool, app.state.providers) == 2
    o = await get_order(client, headers, order)
    assert o["status"] == "paid" and o["refunded_amount"] == 3000
    total = await db.fetchval("select sum(amount) from refunds where status = 'succeeded'")
    assert total <= o["paid_amount"]


async def test_refund_after_shipping_needs_the_merchant(client, app, db, paid_order, admin_headers):
    order, headers, a, b = paid_order
    ship = {"packages": [{"carrier": "顺丰速运", "tracking_no": "SF100"}]}
    assert (
        await client.post(f"/api/v1/admin/orders/{order['id']}/ship", json=ship, headers=admin_headers)
    ).status_code == 200
    line_b = next(ln for ln in order["lines"] if ln["sku_id"] == b)
    r = await refund(
        client, headers, order, {"reason": "坏了", "lines": [{"line_id": line_b["id"], "qty": 1}]}, key="r1"
    )
    assert r.status_code == 201 and r.json()["status"] == "requested"
    replay = await refund(
        client, headers, order, {"reason": "坏了", "lines": [{"line_id": line_b["id"], "qty": 1}]}, key="r1"
    )
    assert replay.content == r.content
    refund_id = r.json()["id"]
    assert await process_refunds(app.state.pool, app.state.providers) == 0  # not approved yet
    r = await client.post(
        f"/api/v1/admin/refunds/{refund_id}/reject", json={"reason": "人为损坏"}, headers=admin_headers
    )
    assert r.status_code == 200 and r.json()["status"] == "rejected"
    r = await client.post(
        f"/api/v1/admin/refunds/{refund_id}/approve", json={"restock": True}, headers=admin_headers
    )
    assert (r.status_code, r.json()["error"]["code"]) == (409, "refund.illegal_transition")
    # Rejection released the line: the shopper may ask again, for everything this time.
    r = await refund(client, headers, order, {"reason": "全部退"})
    assert r.status_code == 201 and r.json()["amount"] == 4000  # shipped: shipping fee is not refunded
    second = r.json()["id"]
    r = await client.get("/api/v1/admin/refunds", params={"status": "requested"}, headers=admin_headers)
    assert [x["id"] for x in r.json()["items"]] == [second]
    r = await client.post(f"/api/v1/admin/refunds/{second}/approve", json={"restock": False}, headers=headers)
    assert r.status_code == 401
    r = await client.post(
        f"/api/v1/admin/refunds/{second}/approve", json={"restock": False}, headers=admin_headers
    )
    assert r.status_code == 200 and r.json()["restock"] is False
    assert await stock_of(db, a) == 7  # goods did not come back
    assert (await get_order(client, headers, order))["status"] == "refunding"
    assert await process_refunds(app.state.pool, app.state.providers) == 1
    o = await get_order(client, headers, order)
    assert o["status"] == "refunded" and o["refunded_amount"] == 4000 and o["paid_amount"] == 4800
    r = await client.get(f"/api/v1/orders/{order['id']}/refunds", headers=headers)
    assert [x["status"] for x in r.json()] == ["rejected", "succeeded"]
    r = await client.get("/api/v1/admin/refunds/999999", headers=admin_headers)
    assert r.status_code == 404
    # Each decision names the admin who made it; a refused one leaves no trace.
    actions = (await client.get(f"/api/v1/admin/refunds/{refund_id}/actions", headers=admin_headers)).json()
    assert [(a["action"], a["admin_username"], a["note"]) for a in actions] == [
        ("reject", "boss", "人为损坏")
    ]
    actions = (await client.get(f"/api/v1/admin/refunds/{second}/actions", headers=admin_headers)).json()
    assert [(a["action"], a["admin_username"], a["note"]) for a in actions] == [("approve", "boss", None)]
    r = await client.get(f"/api/v1/admin/refunds/{second}/actions", headers=headers)
    assert r.status_code == 401
    r = await client.get("/api/v1/admin/refunds/999999/actions", headers=admin_headers)
    assert (r.status_code, r.json()["error"]["code"]) == (404, "refund.not_found")


async def test_refund_of_unpaid_or_foreign_order(client, db, make_user):
    user_id, headers = await make_user("a")
    _, other = await make_user("b")
    address_id = await make_address(db, user_id)
    _, (sku,) = await make_product(db)
    order = (
        await client.post(
            "/api/v1/orders",
            json={"items": [{"sku_id": sku, "qty": 1}], "address_id": address_id},
            headers=headers,
        )
    ).json()
    r = await refund(client, headers, order, {"reason": "x"})
    assert (r.status_code, r.json()["error"]["code"]) == (409, "refund.not_allowed")
    r = await refund(client, other, order, {"reason": "x"})
    assert (r.status_code, r.json()["error"]["code"]) == (404, "order.not_found")
    r = await client.get(f"/api/v1/orders/{order['id']}/refunds", headers=other)
    assert r.status_code == 404


async def test_refund_notification_only_from_the_paying_provider(client, app, db, settings, paid_order):
    from shop.payments.sandbox import SandboxProvider

    order, headers, _, _ = paid_order
    refund_id = (await refund(client, headers, order, {"reason": "x"})).json()["id"]
    refund_no = await db.fetchval(
        "update refunds set status = 'processing' where id = $1 returning refund_no", refund_id
    )
    sandbox = SandboxProvider(settings.sandbox_secret)
    h, body = sandbox.sign_notification({"refund_no": refund_no, "refund_id": "SBXR1", "status": "SUCCESS"})
    # Pretend the money was taken by WeChat Pay: a sandbox-signed notice must not settle it.
    await db.execute("update payments set provider = 'wechatpay' where order_id = $1", order["id"])
    r = await client.post("/api/v1/payments/sandbox/refund-notify", content=body, headers=h)
    assert r.status_code == 400 and r.json()["message"] == "unknown_refund"
    assert await db.fetchval("select status from refunds where id = $1", refund_id) == "processing"
    await db.execute("update payments set provider = 'sandbox' where order_id = $1", order["id"])
    r = await client.post("/api/v1/payments/sandbox/refund-notify", content=body, headers=h)
    assert r.status_code == 200
    assert await db.fetchval("select status from refunds where id = $1", refund_id) == "succeeded"
    assert (await get_order(client, headers, order))["status"] == "refunded"


async def test_two_refunds_of_one_order_finishing_at_the_same_moment_leave_it_refunded(
    client, app, db, paid_order
):
    # The second finish waits for the first's order-row lock; once that commits it must see the
    # first refund as finished (one UPDATE judged it by its older snapshot: `refunding` for good).
    order, headers, _, _ = paid_order
    lines = (await get_order(client, headers, order))["lines"]
    ids = []
    for line in lines:
        r = await refund(
            client, headers, order, {"reason": "坏了", "lines": [{"line_id": line["id"], "qty": line["qty"]}]}
        )
        assert r.status_code == 201 and r.json()["status"] == "approved", r.text
        ids.append(r.json()["id"])
    assert (await get_order(client, headers, order))["status"] == "refunding"
    pool = app.state.pool
    async with pool.acquire() as first, pool.acquire() as second:
        tx1, tx2 = first.transaction(), second.transaction()
        await tx1.start()
        await tx2.start()
        assert await finish_refund(first, ids[0], "p1")
        pid = await second.fetchval("select pg_backend_pid()")
        waiting = asyncio.create_task(finish_refund(second, ids[1], "p2"))
        for _ in range(200):  # until the second finish waits for the order row
            if await db.fetchval("select wait_event_type = 'Lock' from pg_stat_activity where pid = $1", pid):
                break
            await asyncio.sleep(0.01)
        else:
            raise AssertionError("the second finish never waited for the order row")
        await tx1.commit()
        assert await waiting
        await tx2.commit()
    final = await get_order(client, headers, order)
    assert final["status"] == "refunded" and final["refunded_amount"] == order["payable_amount"]

"""The whole purchase journey through the HTTP API, as the mini-program and the merchant drive it."""

from __future__ import annotations

from shop.refunds import process_refunds
from shop.seed import DEMO_ADMIN, seed


async def test_browse_buy_pay_ship_confirm_and_refund(client, app, db, settings):
    await seed(settings)
    # Shopper logs in with the mini-program code (dev provider) and adds an address.
    r = await client.post(
        "/api/v1/auth/login", json={"provider": "dev", "code": "journey-1", "channel": "group"}
    )
    assert r.status_code == 200, r.text
    shopper = {"Authorization": f"Bearer {r.json()['access_token']}"}
    address = {
        "receiver": "李四",
        "phone": "13912345678",
        "province": "浙江省",
        "city": "杭州市",
        "district": "西湖区",
        "detail": "文三路 100 号",
        "is_default": True,
    }
    r = await client.post("/api/v1/me/addresses", json=address, headers=shopper)
    assert r.status_code == 201, r.text
    address_id = r.json()["id"]
    # Browse and pick a SKU.
    r = await client.get("/api/v1/products", params={"sort": "sales", "limit": 5})
    product_id = r.json()["items"][0]["id"]
    detail = (await client.get(f"/api/v1/products/{product_id}")).json()
    sku = next(s for s in detail["skus"] if s["stock"] >= 2)
    stock_before = sku["stock"]
    items = [{"sku_id": sku["id"], "qty": 2}]
    preview = (await client.post("/api/v1/checkout/preview", json={"items": items}, headers=shopper)).json()
    assert preview["items_amount"] == 2 * sku["price"]
    # Order, pay through the sandbox.
    r = await client.post(
        "/api/v1/orders",
        json={"items": items, "address_id": address_id, "remark": "周末送"},
        headers={**shopper, "Idempotency-Key": "journey-order-1"},
    )
    assert r.status_code == 201, r.text
    order = r.json()
    assert order["payable_amount"] == preview["payable_amount"]
    pay = await client.post(f"/api/v1/orders/{order['id']}/pay", headers=shopper)
    assert pay.status_code == 200 and pay.json()["provider"] == "sandbox"
    r = await client.post(f"/api/v1/payments/sandbox/{order['order_no']}/simulate", headers=shopper)
    assert r.json()["order_status"] == "paid"
    # The merchant logs in, finds the order, ships it.
    username, password = DEMO_ADMIN
    r = await client.post("/api/v1/admin/auth/login", json={"username": username, "password": password})
    merchant = {"Authorization": f"Bearer {r.json()['access_token']}"}
    r = await client.get("/api/v1/admin/orders", params={"status": "paid"}, headers=merchant)
    assert [o["id"] for o in r.json()["items"]] == [order["id"]]
    ship = {"packages": [{"carrier": "顺丰速运", "tracking_no": "SF2026112600001"}]}
    r = await client.post(f"/api/v1/admin/orders/{order['id']}/ship", json=ship, headers=merchant)
    assert r.status_code == 200 and r.json()["status"] == "shipped"
    # The shopper confirms receipt, then asks for one unit back; the merchant approves.
    r = await client.post(f"/api/v1/orders/{order['id']}/confirm", headers=shopper)
    assert r.json()["status"] == "completed"
    line_id = order["lines"][0]["id"]
    r = await client.post(
        f"/api/v1/orders/{order['id']}/refunds",
        json={"reason": "尺码不合适", "lines": [{"line_id": line_id, "qty": 1}]},
        headers=shopper,
    )
    assert r.status_code == 201 and r.json()["status"] == "requested"
    refund_id = r.json()["id"]
    r = await client.post(
        f"/api/v1/admin/refunds/{refund_id}/approve", json={"restock": True}, headers=merchant
    )
    assert r.json()["status"] == "approved"
    assert await process_refunds(app.state.pool, app.state.providers) == 1
    final = (await client.get(f"/api/v1/orders/{order['id']}", headers=shopper)).json()
    assert final["status"] == "completed" and final["refunded_amount"] == sku["price"]
    assert await db.fetchval("select stock from skus where id = $1", sku["id"]) == stock_before - 1
    events = [
        r["type"]
        for r in await db.fetch("select type from order_events where order_id = $1 order by id", order["id"])
    ]
    assert events == [
        "order.created",
        "order.paid",
        "order.shipped",
        "order.completed",
        "order.refund_requested",
        "order.refund_approved",
        "order.refunded",
    ]

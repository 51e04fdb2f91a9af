"""Checkout, placing orders, the state machine and the worker's order jobs, through the HTTP API."""

from __future__ import annotations

import asyncio

import pytest

from shop.orders.service import allocate_discount, auto_confirm_orders, cancel_expired_orders
from tests.factories import make_address, make_product, stock_of
from tests.shop.test_coupons import many_users


@pytest.fixture
def shopper(db, make_user):
    async def factory(name: str = "shopper"):
        user_id, headers = await make_user(name)
        address_id = await make_address(db, user_id)
        return user_id, headers, address_id

    return factory


async def place(client, headers, address_id, items, key=None, **extra):
    h = dict(headers)
    if key:
        h["Idempotency-Key"] = key
    return await client.post(
        "/api/v1/orders", json={"items": items, "address_id": address_id, **extra}, headers=h
    )


async def test_preview_prices_from_the_database_with_shipping_rule(client, db, shopper, admin_headers):
    _, headers, _ = await shopper()
    _, (cheap, dear) = await make_product(db, skus=[(1500, 10), (12000, 10)])
    r = await client.post(
        "/api/v1/checkout/preview", json={"items": [{"sku_id": cheap, "qty": 2}]}, headers=headers
    )
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["items_amount"] == 3000 and body["shipping_fee"] == 800 and body["payable_amount"] == 3800
    assert body["lines"][0]["unit_price"] == 1500 and body["lines"][0]["in_stock"] is True
    # At or above the free-shipping threshold (default 99 yuan) shipping is free.
    r = await client.post(
        "/api/v1/checkout/preview", json={"items": [{"sku_id": dear, "qty": 1}]}, headers=headers
    )
    assert r.json()["shipping_fee"] == 0 and r.json()["payable_amount"] == 12000
    # The merchant changes the rule.
    r = await client.put(
        "/api/v1/admin/settings/shipping",
        json={"flat_fee": 500, "free_threshold": None},
        headers=admin_headers,
    )
    assert r.status_code == 200
    r = await client.post(
        "/api/v1/checkout/preview", json={"items": [{"sku_id": dear, "qty": 1}]}, headers=headers
    )
    assert r.json()["shipping_fee"] == 500
    # Nothing was reserved.
    assert await stock_of(db, cheap) == 10


async def test_checkout_errors(client, db, shopper):
    _, headers, address_id = await shopper()
    _, (sku,) = await make_product(db, skus=[(1000, 5)])
    _, (off,) = await make_product(db, status="off_shelf")
    cases = [
        ({"items": [{"sku_id": sku, "qty": 0}]}, 422, "validation_failed"),
        ({"items": []}, 422, "validation_failed"),
        ({"items": [{"sku_id": sku, "qty": 1, "price": 1}]}, 422, "validation_failed"),
        ({"items": [{"sku_id": 999999, "qty": 1}]}, 404, "catalog.sku_not_found"),
        ({"items": [{"sku_id": off, "qty": 1}]}, 409, "order.sku_unavailable"),
    ]
    for body, status, code in cases:
        r = await client.post("/api/v1/checkout/preview", json=body, headers=headers)
        assert (r.status_code, r.json()["error"]["code"]) == (status, code), body
    r = await client.post("/api/v1/checkout/preview", json={"items": [{"sku_id": sku, "qty": 1}]})
    assert r.status_code == 401
    # A client-sent total is never read: it is an unknown field.
    r = await place(client, headers, address_id, [{"sku_id": sku, "qty": 1}], total=1)
    assert r.status_code == 422
    r = await place(client, headers, address_id, [{"sku_id": sku, "qty": 6}])
    assert (r.status_code, r.json()["error"]["code"]) == (409, "stock.insufficient")
    _, _, other_address = await shopper("other")
    r = await place(client, headers, other_address, [{"sku_id": sku, "qty": 1}])
    assert r.status_code == 404
    assert await stock_of(db, sku) == 5
    assert await db.fetchval("select count(*) from orders") == 0


async def test_place_order_snapshots_and_takes_stock(client, db, shopper, settings):
    user_id, headers, address_id = await shopper()
    product_id, (a, b) = await make_product(db, title="纯棉T恤", skus=[(4900, 10), (5900, 10)])
    r = await place(
        client,
        headers,
        address_id,
        [{"sku_id": b, "qty": 1}, {"sku_id": a, "qty": 2}, {"sku_id": a, "qty": 1}],
        remark="请尽快发货",
    )
    assert r.status_code == 201, r.text
    order = r.json()
    assert order["status"] == "pending_payment" and order["kind"] == "normal" and order["user_id"] == user_id
    assert order["items_amount"] == 3 * 4900 + 5900 and order["shipping_fee"] == 0
    assert order["payable_amount"] == order["items_amount"]
    assert [(ln["sku_id"], ln["qty"], ln["unit_price"]) for ln in order["lines"]] == [
        (a, 3, 4900),
        (b, 1, 5900),
    ]
    assert order["lines"][0]["title"] == "纯棉T恤" and order["lines"][0]["specs"] == {"颜色": "c0"}
    assert order["address"]["receiver"] == "张三" and order["address"]["city"] == "深圳市"
    assert order["remark"] == "请尽快发货"
    assert len(order["order_no"]) >= 20 and order["order_no"].isdigit()
    deadline = await db.fetchval("select pay_deadline - created_at from orders where id = $1", order["id"])
    assert deadline.total_seconds() == pytest.approx(settings.pay_deadline_minutes * 60, abs=2)
    assert await stock_of(db, a) == 7 and await stock_of(db, b) == 9
    assert await db.fetchval("select sales from products where id = $1", product_id) == 4
    # A later price change does not touch the snapshot.
    await db.execute("update skus set price = 1 where id = $1", a)
    r = await client.get(f"/api/v1/orders/{order['id']}", headers=headers)
    assert r.json()["lines"][0]["unit_price"] == 4900
    events = await db.fetch("select type from order_events where order_id = $1", order["id"])
    assert [e["type"] for e in events] == ["order.created"]


async def test_fifty_shoppers_race_for_the_last_ten_units(client, db, shopper):
    _, (sku,) = await make_product(db, skus=[(990, 10)])
    shoppers = [await shopper(f"s{i}") for i in range(50)]
    results = await asyncio.gather(
        *(
            place(client, headers, address_id, [{"sku_id": sku, "qty": 1}])
            for _, headers, address_id in shoppers
        )
    )
    statuses = sorted(r.status_code for r in results)
    assert statuses.count(201) == 10 and statuses.count(409) == 40
    assert all(r.json()["error"]["code"] == "stock.insufficient" for r in results if r.status_code == 409)
    assert await stock_of(db, sku) == 0
    assert await db.fetchval("select count(*) from orders") == 10
    assert await db.fetchval("select sum(qty) from order_lines") == 10


async def test_concurrent_multi_line_orders_do_not_deadlock(client, db, shopper):
    _, (a, b, c) = await make_product(db, skus=[(1000, 100), (2000, 100), (3000, 100)])
    shoppers = [await shopper(f"s{i}") for i in range(30)]
    orders = [[a, b, c], [c, b, a], [b, c, a]]
    results = await asyncio.gather(
        *(
            place(client, h, addr, [{"sku_id": s, "qty": 1} for s in orders[i % 3]])
            for i, (_, h, addr) in enumerate(shoppers)
        )
    )
    assert [r.status_code for r in results] == [201] * 30
    assert [await stock_of(db, s) for s in (a, b, c)] == [70, 70, 70]


async def test_one_idempotency_key_twenty_concurrent_requests(client, db, shopper):
    _, headers, address_id = await shopper()
    _, (sku,) = await make_product(db, skus=[(1000, 100)])
    items = [{"sku_id": sku, "qty": 2}]
    results = await asyncio.gather(
        *(place(client, headers, address_id, items, key="k-123") for _ in range(20))
    )
    assert {r.status_code for r in results} == {201}
    assert len({r.content for r in results}) == 1
    assert sum(r.headers.get("idempotent-replayed") == "true" for r in results) == 19
    assert await db.fetchval("select count(*) from orders") == 1
    assert await stock_of(db, sku) == 98
    # Same key, different body.
    r = await place(client, headers, address_id, [{"sku_id": sku, "qty": 3}], key="k-123")
    assert (r.status_code, r.json()["error"]["code"]) == (422, "idempotency.mismatch")
    # The same key belongs to each shopper separately.
    _, other_headers, other_address = await shopper("other")
    r = await place(client, other_headers, other_address, items, key="k-123")
    assert r.status_code == 201 and r.json()["user_id"] != results[0].json()["user_id"]
    r = await place(client, headers, address_id, items, key="bad key with spaces")
    assert (r.status_code, r.json()["error"]["code"]) == (422, "idempotency.invalid_key")


async def test_cancel_confirm_and_visibility(client, db, shopper):
    _, headers, address_id = await shopper()
    _, other_headers, _ = await shopper("other")
    _, (sku,) = await make_product(db, skus=[(1000, 10)])
    order = (await place(client, headers, address_id, [{"sku_id": sku, "qty": 4}])).json()
    assert await stock_of(db, sku) == 6
    # Another shopper sees nothing and can do nothing.
    for method, path in [("get", ""), ("post", "/cancel"), ("post", "/confirm"), ("post", "/pay")]:
        r = await getattr(client, method)(f"/api/v1/orders/{order['id']}{path}", headers=other_headers)
        assert (r.status_code, r.json()["error"]["code"]) == (404, "order.not_found"), path
    r = await client.post(f"/api/v1/orders/{order['id']}/confirm", headers=headers)
    assert (r.status_code, r.json()["error"]["code"]) == (409, "order.illegal_transition")
    r = await client.post(f"/api/v1/orders/{order['id']}/cancel", headers=headers)
    assert r.status_code == 200 and r.json()["status"] == "cancelled"
    assert await stock_of(db, sku) == 10
    r = await client.post(f"/api/v1/orders/{order['id']}/cancel", headers=headers)
    assert (r.status_code, r.json()["error"]["code"]) == (409, "order.illegal_transition")
    assert await stock_of(db, sku) == 10
    types = [e["type"] for e in await db.fetch("select type from order_events order by id")]
    assert types == ["order.created", "order.cancelled"]


async def test_concurrent_cancels_return_units_once(client, db, shopper):
    _, headers, address_id = await shopper()
    _, (sku,) = await make_product(db, skus=[(1000, 10)])
    order = (await place(client, headers, address_id, [{"sku_id": sku, "qty": 3}])).json()
    results = await asyncio.gather(
        *(client.post(f"/api/v1/orders/{order['id']}/cancel", headers=headers) for _ in range(10))
    )
    assert sorted(r.status_code for r in results) == [200] + [409] * 9
    assert await stock_of(db, sku) == 10


async def test_list_own_orders_with_status_filter_and_cursor(client, db, shopper):
    _, headers, address_id = await shopper()
    _, other_headers, other_address = await shopper("other")
    _, (sku,) = await make_product(db, skus=[(1000, 100)])
    ids = [
        (await place(client, headers, address_id, [{"sku_id": sku, "qty": 1}])).json()["id"] for _ in range(5)
    ]
    await place(client, other_headers, other_address, [{"sku_id": sku, "qty": 1}])
    await client.post(f"/api/v1/orders/{ids[0]}/cancel", headers=headers)
    seen, cursor = [], None
    while True:
        r = await client.get(
            "/api/v1/orders", params={"limit": 2, **({"cursor": cursor} if cursor else {})}, headers=headers
        )
        assert r.status_code == 200
        seen += [o["id"] for o in r.json()["items"]]
        cursor = r.json()["next_cursor"]
        if not cursor:
            break
    assert seen == sorted(ids, reverse=True)
    r = await client.get("/api/v1/orders", params={"status": "cancelled"}, headers=headers)
    assert [o["id"] for o in r.json()["items"]] == [ids[0]]
    r = await client.get("/api/v1/orders", params={"status": "lost"}, headers=headers)
    assert r.status_code == 422
    r = await client.get("/api/v1/orders", params={"cursor": "%%%"}, headers=headers)
    assert (r.status_code, r.json()["error"]["code"]) == (422, "invalid_cursor")


async def test_timeout_cancels_once_and_returns_units(client, app, db, shopper):
    _, headers, address_id = await shopper()
    _, (sku,) = await make_product(db, skus=[(1000, 10)])
    expired = (await place(client, headers, address_id, [{"sku_id": sku, "qty": 2}])).json()
    fresh = (await place(client, headers, address_id, [{"sku_id": sku, "qty": 3}])).json()
    await db.execute(
        "update orders set pay_deadline = now() - interval '1 second' where id = $1", expired["id"]
    )
    pool = app.state.pool
    counts = await asyncio.gather(*(cancel_expired_orders(pool) for _ in range(4)))
    assert sum(counts) == 1
    assert await cancel_expired_orders(pool) == 0
    r = await client.get(f"/api/v1/orders/{expired['id']}", headers=headers)
    assert r.json()["status"] == "cancelled" and r.json()["cancel_reason"] == "payment timeout"
    r = await client.get(f"/api/v1/orders/{fresh['id']}", headers=headers)
    assert r.json()["status"] == "pending_payment"
    assert await stock_of(db, sku) == 7
    r = await client.post(f"/api/v1/orders/{expired['id']}/pay", headers=headers)
    assert (r.status_code, r.json()["error"]["code"]) == (409, "order.illegal_transition")


async def pay(client, headers, order):
    r = await client.post(f"/api/v1/payments/sandbox/{order['order_no']}/simulate", headers=headers)
    assert r.status_code == 200, r.text
    return r.json()


async def test_merchant_ships_completes_and_searches(client, app, db, shopper, admin_headers):
    _, headers, address_id = await shopper()
    _, (sku,) = await make_product(db, skus=[(1000, 10), (2000, 10)][:1])
    order = (await place(client, headers, address_id, [{"sku_id": sku, "qty": 1}])).json()
    ship = {"packages": [{"carrier": "顺丰速运", "tracking_no": "SF1234567890"}]}
    r = await client.post(f"/api/v1/admin/orders/{order['id']}/ship", json=ship, headers=admin_headers)
    assert (r.status_code, r.json()["error"]["code"]) == (409, "order.illegal_transition")
    assert (await pay(client, headers, order))["order_status"] == "paid"
    r = await client.post(f"/api/v1/admin/orders/{order['id']}/ship", json=ship, headers=headers)
    assert r.status_code == 401
    r = await client.post(
        f"/api/v1/admin/orders/{order['id']}/ship", json={"packages": []}, headers=admin_headers
    )
    assert r.status_code == 422
    two = {
        "packages": [
            ship["packages"][0],
            {"carrier": "中通快递", "tracking_no": "ZT998877", "line_ids": [order["lines"][0]["id"]]},
        ]
    }
    r = await client.post(f"/api/v1/admin/orders/{order['id']}/ship", json=two, headers=admin_headers)
    assert r.status_code == 200, r.text
    shipped = r.json()
    assert shipped["status"] == "shipped" and len(shipped["shipments"]) == 2
    assert shipped["auto_confirm_at"] is not None
    r = await client.get(f"/api/v1/orders/{order['id']}", headers=headers)
    assert [s["tracking_no"] for s in r.json()["shipments"]] == ["SF1234567890", "ZT998877"]
    r = await client.get("/api/v1/admin/orders", params={"q": order["order_no"][:14]}, headers=admin_headers)
    assert [o["id"] for o in r.json()["items"]] == [order["id"]]
    r = await client.get(
        "/api/v1/admin/orders", params={"q": "13800138000", "status": "shipped"}, headers=admin_headers
    )
    assert [o["id"] for o in r.json()["items"]] == [order["id"]]
    r = await client.get(f"/api/v1/admin/orders/{order['id']}", headers=admin_headers)
    assert r.status_code == 200 and r.json()["paid_amount"] == order["payable_amount"]
    r = await client.get("/api/v1/admin/orders/999999", headers=admin_headers)
    assert r.status_code == 404
    r = await client.post(f"/api/v1/admin/orders/{order['id']}/complete", headers=admin_headers)
    assert r.status_code == 200 and r.json()["status"] == "completed"
    r = await client.post(f"/api/v1/orders/{order['id']}/confirm", headers=headers)
    assert r.status_code == 409
    types = [e["type"] for e in await db.fetch("select type from order_events order by id")]
    assert types == ["order.created", "order.paid", "order.shipped", "order.completed"]


async def test_shopper_confirms_and_auto_confirm(client, app, db, shopper, admin_headers):
    _, headers, address_id = await shopper()
    _, (sku,) = await make_product(db, skus=[(1000, 10)])
    a = (await place(client, headers, address_id, [{"sku_id": sku, "qty": 1}])).json()
    b = (await place(client, headers, address_id, [{"sku_id": sku, "qty": 1}])).json()
    for i, order in enumerate((a, b)):
        await pay(client, headers, order)
        ship = {"packages": [{"carrier": "EMS", "tracking_no": f"EMS00{i}"}]}
        assert (
            await client.post(f"/api/v1/admin/orders/{order['id']}/ship", json=ship, headers=admin_headers)
        ).status_code == 200
    r = await client.post(f"/api/v1/orders/{a['id']}/confirm", headers=headers)
    assert r.status_code == 200 and r.json()["status"] == "completed"
    await db.execute("update orders set auto_confirm_at = now() - interval '1 second' where id = $1", b["id"])
    assert await auto_confirm_orders(app.state.pool) == 1
    assert await auto_confirm_orders(app.state.pool) == 0
    r = await client.get(f"/api/v1/orders/{b['id']}", headers=headers)
    assert r.json()["status"] == "completed"


def test_allocate_discount_puts_remainder_on_last_line():
    assert allocate_discount([1000, 2000, 3000], 1000) == [166, 333, 501]
    assert sum(allocate_discount([1, 1, 1], 2)) == 2
    assert allocate_discount([500], 9999) == [500]
    assert allocate_discount([0, 0], 10) == [0, 0]


async def test_checkouts_racing_cancels_and_timeouts_never_deadlock(client, app, db, shopper):
    """Stock goes out (checkout) and back (shopper cancel, timeout) on shared SKUs of two products at once."""
    _, (a, b) = await make_product(db, title="P", skus=[(1000, 500), (1100, 500)])
    _, (c,) = await make_product(db, title="Q", skus=[(1200, 500)])
    combos = [[a, c], [c, b], [b, a, c], [c, a], [a, b]]
    buyers = [await shopper(f"s{i}") for i in range(20)]

    async def buy(i: int):
        _, headers, address_id = buyers[i % len(buyers)]
        return await place(
            client, headers, address_id, [{"sku_id": s, "qty": 1} for s in combos[i % len(combos)]]
        )

    first = await asyncio.gather(*(buy(i) for i in range(40)))
    assert {r.status_code for r in first} == {201}
    orders = [r.json() for r in first]
    # Half of them expire; a quarter get cancelled by their shoppers; meanwhile 40 more checkouts.
    await db.execute(
        "update orders set pay_deadline = now() - interval '1 second' where id = any($1::bigint[])",
        [o["id"] for o in orders[:20]],
    )
    by_user = {b[0]: b[1] for b in buyers}
    results = await asyncio.gather(
        *(buy(i) for i in range(40, 80)),
        *(
            client.post(f"/api/v1/orders/{o['id']}/cancel", headers=by_user[o["user_id"]])
            for o in orders[20:30]
        ),
        *(cancel_expired_orders(app.state.pool, batch=5) for _ in range(4)),
    )
    assert {r.status_code for r in results[:50]} == {201, 200}
    while await cancel_expired_orders(app.state.pool):
        pass
    live = await db.fetch(
        """select l.sku_id, sum(l.qty) as qty from order_lines l join orders o on o.id = l.order_id
           where o.status <> 'cancelled' group by l.sku_id"""
    )
    sold = {r["sku_id"]: r["qty"] for r in live}
    assert await db.fetchval("select count(*) from orders where status = 'cancelled'") == 30
    for sku in (a, b, c):
        assert await stock_of(db, sku) == 500 - sold.get(sku, 0)


async def test_old_idempotency_keys_are_purged(client, app, db, make_user):
    from types import SimpleNamespace

    from shop.orders.jobs import purge_idempotency_keys

    user_id, _ = await make_user()
    await db.execute(
        """insert into idempotency_keys (user_id, scope, key, request_hash, response_status, response_body, created_at)
           select $1, 'orders.place', 'k' || i, '\\x00', 201, '{}'::bytea,
                  now() - case when i <= 1500 then interval '25 hours' else interval '1 hour' end
           from generate_series(1, 1600) as i""",
        user_id,
    )
    assert await purge_idempotency_keys(SimpleNamespace(pool=app.state.pool)) == 1500
    assert await db.fetchval("select count(*) from idempotency_keys") == 100


async def test_a_cart_too_large_for_one_order_is_422_not_a_crash(client, db, make_user):
    user_id, headers = await make_user()
    address_id = await make_address(db, user_id)
    _, (sku,) = await make_product(db, skus=[(1_000_000_000, 10)])  # 10 million yuan a unit
    items = [{"sku_id": sku, "qty": 3}]
    for url, body in [
        ("/api/v1/checkout/preview", {"items": items}),
        ("/api/v1/orders", {"items": items, "address_id": address_id}),
    ]:
        r = await client.post(url, json=body, headers=headers)
        assert (r.status_code, r.json()["error"]["code"]) == (422, "order.amount_too_large"), r.text
    assert await db.fetchval("select count(*) from orders") == 0
    assert await db.fetchval("select stock from skus where id = $1", sku) == 10
    r = await client.post(
        "/api/v1/orders",
        json={"items": [{"sku_id": sku, "qty": 2}], "address_id": address_id},
        headers=headers,
    )
    assert r.status_code == 201 and r.json()["payable_amount"] >= 2_000_000_000


async def test_price_edits_during_a_rush_of_checkouts_and_cancels_never_deadlock(
    client, db, settings, admin_headers
):
    # Checkout and cancel lock the SKU rows, then the product (its sales); a SKU edit takes the
    # same order. In the opposite order they deadlock, and PostgreSQL aborts one side (a 500).
    _, (sku_a, sku_b) = await make_product(db, skus=[(1000, 500), (1200, 500)])
    shoppers = await many_users(db, settings, 40)
    addresses = [await make_address(db, user_id) for user_id, _ in shoppers]

    async def buy_and_cancel(i: int) -> list[int]:
        _, headers = shoppers[i]
        items = [{"sku_id": sku_a, "qty": 1}, {"sku_id": sku_b, "qty": 1}]
        r = await client.post(
            "/api/v1/orders", json={"items": items, "address_id": addresses[i]}, headers=headers
        )
        codes = [r.status_code]
        if r.status_code == 201:
            r = await client.post(f"/api/v1/orders/{r.json()['id']}/cancel", headers=headers)
            codes.append(r.status_code)
        return codes

    async def edit(i: int) -> list[int]:
        sku = (sku_a, sku_b)[i % 2]
        r = await client.patch(f"/api/v1/admin/skus/{sku}", json={"price": 1000 + i}, headers=admin_headers)
        return [r.status_code]

    results = await asyncio.gather(*(buy_and_cancel(i) for i in range(40)), *(edit(i) for i in range(40)))
    codes = [c for rs in results for c in rs]
    assert 500 not in codes and set(codes) <= {200, 201}, sorted(set(codes))
    assert await stock_of(db, sku_a) == 500 and await stock_of(db, sku_b) == 500

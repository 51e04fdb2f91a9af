"""Coupons at checkout: pricing, scope and threshold, the lock with the order, use on payment, return on cancel."""

from __future__ import annotations

import asyncio

from shop.coupons.service import expire_coupons
from shop.events import dispatch_order_events
from shop.orders.service import allocate_discount, cancel_expired_orders
from shop.refunds import process_refunds
from tests.factories import make_address, make_product, stock_of
from tests.shop.test_coupons import ADMIN, claim, code_of, expire_coupon, make_template


async def shopper_with_coupon(client, db, make_user, admin_headers, **template):
    user_id, headers = await make_user()
    address_id = await make_address(db, user_id)
    t = await make_template(client, admin_headers, **template)
    r = await claim(client, headers, t["id"])
    assert r.status_code == 201, r.text
    return user_id, headers, address_id, r.json()


async def order(client, headers, address_id, items, coupon_id=None):
    body = {"items": items, "address_id": address_id}
    if coupon_id is not None:
        body["coupon_id"] = coupon_id
    return await client.post("/api/v1/orders", json=body, headers=headers)


async def coupon_status(client, headers, coupon_id) -> str:
    return (await client.get(f"/api/v1/coupons/{coupon_id}", headers=headers)).json()["status"]


def test_allocate_discount_never_exceeds_a_line():
    assert allocate_discount([3000, 7000], 1000) == [300, 700]
    for amounts, discount in [([1, 1, 1, 1], 3), ([3, 3, 1], 6), ([100, 1], 100), ([5], 5)]:
        shares = allocate_discount(amounts, discount)
        assert sum(shares) == discount and all(0 <= s <= a for s, a in zip(shares, amounts, strict=True))


async def test_order_with_coupon_splits_the_discount_and_locks_the_coupon(
    client, db, make_user, admin_headers
):
    _, headers, address_id, coupon = await shopper_with_coupon(client, db, make_user, admin_headers)
    _, (a, b) = await make_product(db, skus=[(3000, 10), (7000, 10)])
    items = [{"sku_id": a, "qty": 1}, {"sku_id": b, "qty": 1}]
    # The preview lists it with the price it gives, and prices with it when chosen.
    r = await client.post("/api/v1/checkout/preview", json={"items": items}, headers=headers)
    assert r.json()["discounts"] == [
        {"coupon_id": coupon["id"], "name": "满100减20", "discount_amount": 2000, "payable_amount": 8000}
    ]
    r = await client.post(
        "/api/v1/checkout/preview", json={"items": items, "coupon_id": coupon["id"]}, headers=headers
    )
    assert (r.json()["discount_amount"], r.json()["payable_amount"]) == (2000, 8000)

    r = await order(client, headers, address_id, items, coupon["id"])
    assert r.status_code == 201, r.text
    placed = r.json()
    assert (placed["discount_amount"], placed["payable_amount"], placed["coupon_id"]) == (
        2000,
        8000,
        coupon["id"],
    )
    assert [ln["discount_amount"] for ln in placed["lines"]] == [600, 1400]
    assert [ln["payable_amount"] for ln in placed["lines"]] == [2400, 5600]
    assert await coupon_status(client, headers, coupon["id"]) == "locked"
    # One coupon, one order.
    r = await order(client, headers, address_id, items, coupon["id"])
    assert (r.status_code, code_of(r)) == (409, "coupon.unavailable")
    assert await stock_of(db, a) == 9
    r = await client.get("/api/v1/coupons", params={"status": "locked"}, headers=headers)
    assert [c["order_id"] for c in r.json()["items"]] == [placed["id"]]


async def test_20_concurrent_checkouts_with_one_coupon_only_one_wins(client, db, make_user, admin_headers):
    """macrozheng/mall #1003: the coupon's state was checked, then written, by each checkout."""
    await db.execute("update shipping_rule set flat_fee = 0")
    _, headers, address_id, coupon = await shopper_with_coupon(
        client, db, make_user, admin_headers, kind="no_threshold", threshold=0, amount=5000
    )
    skus = [(await make_product(db, skus=[(1000 + i, 10)]))[1][0] for i in range(20)]
    results = await asyncio.gather(
        *(order(client, headers, address_id, [{"sku_id": sku, "qty": 1}], coupon["id"]) for sku in skus)
    )
    statuses = [r.status_code for r in results]
    assert statuses.count(201) == 1 and statuses.count(409) == 19, [
        r.text for r in results if r.status_code >= 500
    ]
    assert {code_of(r) for r in results if r.status_code == 409} == {"coupon.unavailable"}
    winner = next(r.json() for r in results if r.status_code == 201)
    # 5000 off a ~10-yuan item: capped so the shopper still pays 1 fen.
    assert winner["payable_amount"] == 1 and winner["discount_amount"] == winner["items_amount"] - 1
    assert await db.fetchval("select count(*) from orders") == 1
    assert await db.fetchval("select count(*) from orders where coupon_id is not null") == 1
    assert await db.fetchval("select min(payable_amount) from orders") >= 1


async def test_cancel_returns_the_coupon_exactly_once(client, app, db, make_user, admin_headers):
    _, headers, address_id, coupon = await shopper_with_coupon(client, db, make_user, admin_headers)
    _, (sku,) = await make_product(db, skus=[(12000, 10)])
    placed = (await order(client, headers, address_id, [{"sku_id": sku, "qty": 1}], coupon["id"])).json()
    r = await client.post(f"/api/v1/orders/{placed['id']}/cancel", headers=headers)
    assert r.status_code == 200
    assert await coupon_status(client, headers, coupon["id"]) == "available"
    r = await client.post(f"/api/v1/orders/{placed['id']}/cancel", headers=headers)
    assert (r.status_code, code_of(r)) == (409, "order.illegal_transition")
    # Usable again; this time the order times out, and the coupon comes back once more.
    second = (await order(client, headers, address_id, [{"sku_id": sku, "qty": 1}], coupon["id"])).json()
    assert second["coupon_id"] == coupon["id"]
    await db.execute(
        "update orders set pay_deadline = now() - interval '1 second' where id = $1", second["id"]
    )
    assert await asyncio.gather(
        cancel_expired_orders(app.state.pool), cancel_expired_orders(app.state.pool)
    ) in (
        [1, 0],
        [0, 1],
    )
    assert await coupon_status(client, headers, coupon["id"]) == "available"
    assert await db.fetchval("select count(*) from coupons where status = 'available'") == 1
    # Cancelled after its validity ended: it does not come back as available.
    third = (await order(client, headers, address_id, [{"sku_id": sku, "qty": 1}], coupon["id"])).json()
    await db.execute(
        "update coupons set valid_from = now() - interval '2 days', valid_until = now() where id = $1",
        coupon["id"],
    )
    await client.post(f"/api/v1/orders/{third['id']}/cancel", headers=headers)
    assert await db.fetchval("select status from coupons where id = $1", coupon["id"]) == "expired"


async def test_expired_coupon_is_rejected_and_marked(client, app, db, make_user, admin_headers):
    _, headers, address_id, coupon = await shopper_with_coupon(client, db, make_user, admin_headers)
    _, (sku,) = await make_product(db, skus=[(12000, 10)])
    await expire_coupon(db, coupon["id"])
    r = await order(client, headers, address_id, [{"sku_id": sku, "qty": 1}], coupon["id"])
    assert (r.status_code, code_of(r)) == (409, "coupon.expired")
    assert await stock_of(db, sku) == 10 and await db.fetchval("select count(*) from orders") == 0
    assert await coupon_status(client, headers, coupon["id"]) == "expired"
    assert await expire_coupons(app.state.pool) == 1
    assert await db.fetchval("select status from coupons where id = $1", coupon["id"]) == "expired"
    assert await expire_coupons(app.state.pool) == 0


async def test_paid_order_uses_the_coupon(client, app, db, make_user, admin_headers):
    _, headers, address_id, coupon = await shopper_with_coupon(client, db, make_user, admin_headers)
    _, (sku,) = await make_product(db, skus=[(12000, 10)])
    placed = (await order(client, headers, address_id, [{"sku_id": sku, "qty": 1}], coupon["id"])).json()
    r = await client.post(f"/api/v1/payments/sandbox/{placed['order_no']}/simulate", headers=headers)
    assert r.status_code == 200 and r.json()["order_status"] == "paid", r.text
    # Shown as used at once, written as used by the order.paid handler.
    assert await coupon_status(client, headers, coupon["id"]) == "used"
    while await dispatch_order_events(app.state.pool, None):
        pass
    row = await db.fetchrow("select status, used_order_id from coupons where id = $1", coupon["id"])
    assert (row["status"], row["used_order_id"]) == ("used", placed["id"])
    r = await client.get(f"{ADMIN}/{coupon['template_id']}/stats", headers=admin_headers)
    stats = r.json()
    assert (stats["used"], stats["orders"], stats["gmv"], stats["discount_total"]) == (1, 1, 10000, 2000)


async def test_scope_threshold_and_ownership(client, db, make_user, admin_headers):
    user_id, headers = await make_user()
    address_id = await make_address(db, user_id)
    _, other = await make_user("other")
    top = await db.fetchval("insert into categories (name) values ('服饰') returning id")
    child = await db.fetchval(
        "insert into categories (name, parent_id) values ('男装', $1) returning id", top
    )
    elsewhere = await db.fetchval("insert into categories (name) values ('食品') returning id")
    shirt, (shirt_sku,) = await make_product(db, skus=[(6000, 10)])
    await db.execute("update products set category_id = $2 where id = $1", shirt, child)
    snack, (snack_sku,) = await make_product(db, skus=[(5000, 10)])
    await db.execute("update products set category_id = $2 where id = $1", snack, elsewhere)
    templates = {
        "clothes": dict(scope="categories", scope_ids=[top], kind="no_threshold", threshold=0, amount=500),
        "not_snacks": dict(
            scope="exclude_products", scope_ids=[snack], kind="threshold", threshold=5000, amount=800
        ),
        "snacks": dict(
            scope="products",
            scope_ids=[snack],
            kind="percent",
            amount=None,
            threshold=0,
            percent_off=20,
            max_discount=600,
        ),
        "big": dict(kind="threshold", threshold=50000, amount=5000),
    }
    coupons = {}
    for name, fields in templates.items():
        t = await make_template(client, admin_headers, **fields)
        coupons[name] = (await claim(client, headers, t["id"])).json()["id"]
    items = [{"sku_id": shirt_sku, "qty": 1}, {"sku_id": snack_sku, "qty": 1}]
    r = await client.post("/api/v1/coupons/for-cart", json={"items": items}, headers=headers)
    assert r.status_code == 200
    usable = [(c["coupon"]["id"], c["discount_amount"]) for c in r.json()["usable"]]
    # Best first: 800 off the shirt; 20% of the snack capped at 600; 500 off clothes (top category covers its child).
    assert usable == [(coupons["not_snacks"], 800), (coupons["snacks"], 600), (coupons["clothes"], 500)]
    assert [(c["coupon"]["id"], c["reason"]) for c in r.json()["unusable"]] == [(coupons["big"], "threshold")]
    only_snack = [{"sku_id": snack_sku, "qty": 1}]
    r = await order(client, headers, address_id, only_snack, coupons["clothes"])
    assert (r.status_code, code_of(r)) == (409, "coupon.not_applicable")
    r = await order(client, headers, address_id, items, coupons["big"])
    assert (r.status_code, code_of(r)) == (409, "coupon.threshold_not_met")
    r = await order(client, other, address_id, items, coupons["clothes"])
    assert r.status_code == 404  # the other shopper's address and coupon are both invisible
    other_address = await make_address(db, (await db.fetchval("select max(id) from users")))
    r = await order(client, other, other_address, items, coupons["clothes"])
    assert (r.status_code, code_of(r)) == (404, "coupon.not_found")
    r = await order(client, headers, address_id, items, coupons["snacks"])
    assert r.status_code == 201
    assert [(ln["sku_id"], ln["discount_amount"]) for ln in r.json()["lines"]] == [
        (shirt_sku, 0),
        (snack_sku, 600),
    ]
    r = await client.post("/api/v1/coupons/for-cart", json={"items": []}, headers=headers)
    assert r.status_code == 422
    assert (await client.post("/api/v1/coupons/for-cart", json={"items": items})).status_code == 401


async def test_a_line_a_coupon_paid_whole_comes_back_with_the_refund(
    client, app, db, make_user, admin_headers
):
    # The coupon covers the only item; the shopper pays the shipping alone. Refunding before
    # shipping pays the shipping back and returns the unit (the line itself was paid 0 fen).
    await db.execute("update shipping_rule set free_threshold = null, flat_fee = 800")
    _, headers, address_id, coupon = await shopper_with_coupon(
        client, db, make_user, admin_headers, name="无门槛10元", kind="no_threshold", threshold=0, amount=1000
    )
    _, (sku,) = await make_product(db, skus=[(1000, 5)])
    r = await order(client, headers, address_id, [{"sku_id": sku, "qty": 1}], coupon["id"])
    assert r.status_code == 201, r.text
    placed = r.json()
    assert (placed["payable_amount"], placed["lines"][0]["payable_amount"]) == (800, 0)
    r = await client.post(f"/api/v1/payments/sandbox/{placed['order_no']}/simulate", headers=headers)
    assert r.json()["order_status"] == "paid"
    assert await stock_of(db, sku) == 4
    r = await client.post(
        f"/api/v1/orders/{placed['id']}/refunds", json={"reason": "不要了"}, headers=headers
    )
    assert r.status_code == 201, r.text
    assert (r.json()["status"], r.json()["amount"]) == ("approved", 800)
    assert [(ln["qty"], ln["amount"]) for ln in r.json()["lines"]] == [(1, 0)]
    assert await stock_of(db, sku) == 5  # the unit is back
    assert await process_refunds(app.state.pool, app.state.providers) == 1
    final = (await client.get(f"/api/v1/orders/{placed['id']}", headers=headers)).json()
    assert final["status"] == "refunded" and final["refunded_amount"] == 800
    r = await client.post(f"/api/v1/orders/{placed['id']}/refunds", json={"reason": "again"}, headers=headers)
    assert (r.status_code, code_of(r)) == (409, "refund.not_allowed")

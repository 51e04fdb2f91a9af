"""`shop seed`: a believable demo store, created once."""

from __future__ import annotations

import asyncio

from shop.passwords import verify_password
from shop.seed import DEMO_ADMIN, seed

COUNTS = """select (select count(*) from categories) as categories, (select count(*) from products) as products,
                   (select count(*) from skus) as skus, (select count(*) from stock_ledger) as ledger,
                   (select count(*) from admins) as admins"""


async def test_seed_is_idempotent_and_browsable(settings, db, client, make_user):
    first = await seed(settings)
    assert first == {
        "admin_created": True,
        "products_created": first["products_created"],
        "coupons_created": 1,
    }
    assert first["products_created"] >= 12
    counts = dict(await db.fetchrow(COUNTS))

    again = await seed(settings)
    assert again == {"admin_created": False, "products_created": 0, "coupons_created": 0}
    # The demo coupon is live in Redis and claimable by a shopper.
    template_id = await db.fetchval("select id from coupon_templates where status = 'active'")
    _, headers = await make_user()
    r = await client.post(f"/api/v1/coupons/templates/{template_id}/claim", headers=headers)
    assert r.status_code == 201, r.text
    assert dict(await db.fetchrow(COUNTS)) == counts

    username, password = DEMO_ADMIN
    stored = await db.fetchval("select password_hash from admins where username = $1", username)
    assert verify_password(password, stored)
    # Every SKU's stock came in through the ledger.
    assert (
        await db.fetchval(
            "select count(*) from skus s where stock <> (select coalesce(sum(delta), 0) from stock_ledger where sku_id = s.id)"
        )
        == 0
    )

    tree = (await client.get("/api/v1/categories")).json()
    assert len(tree) >= 3 and all(top["children"] for top in tree)

    ids, cursor = [], None
    while True:
        r = await client.get(
            "/api/v1/products", params={"sort": "sales", "limit": 5, **({"cursor": cursor} if cursor else {})}
        )
        assert r.status_code == 200
        ids += [p["id"] for p in r.json()["items"]]
        cursor = r.json()["next_cursor"]
        if cursor is None:
            break
    assert len(ids) == counts["products"] >= 12

    detail = (await client.get(f"/api/v1/products/{ids[0]}")).json()
    assert detail["image_urls"][0].startswith("https://")
    assert all(s["price"] > 0 and s["stock"] > 0 for s in detail["skus"])
    multi = [
        d
        for d in [(await client.get(f"/api/v1/products/{pid}")).json() for pid in ids]
        if len(d["spec_options"]) >= 2
    ]
    assert len(multi) >= 6  # colour × size and the like
    assert all(
        len(d["skus"]) == len(d["spec_options"][0]["values"]) * len(d["spec_options"][1]["values"])
        for d in multi
    )

    r = await client.get("/api/v1/products", params={"q": "蓝牙耳机"})
    assert [p["title"] for p in r.json()["items"]] == ["无线蓝牙耳机 Pro"]
    r = await client.get("/api/v1/products", params={"category_id": tree[0]["id"]})
    assert len(r.json()["items"]) >= 4


async def test_seed_keeps_an_existing_admin_password(settings, db):
    await db.execute("insert into admins (username, password_hash) values ($1, 'kept')", DEMO_ADMIN[0])
    result = await seed(settings)
    assert result["admin_created"] is False
    assert await db.fetchval("select password_hash from admins where username = $1", DEMO_ADMIN[0]) == "kept"


async def test_concurrent_seeds_create_one_catalog(settings, db):
    results = await asyncio.gather(seed(settings), seed(settings))
    assert sorted(r["products_created"] for r in results)[0] == 0
    assert await db.fetchval("select count(*) from products") == max(r["products_created"] for r in results)
    assert await db.fetchval("select count(*) from admins") == 1

"""Merchant catalog API: categories, products, SKUs, shelving and the stock ledger."""

from __future__ import annotations

import asyncio

import pytest

A = "/api/v1/admin"


async def make_category(client, headers, name="数码", parent_id=None, **extra) -> dict:
    r = await client.post(
        f"{A}/categories", json={"name": name, "parent_id": parent_id, **extra}, headers=headers
    )
    assert r.status_code == 201, r.text
    return r.json()


def sku(code: str, price: int = 9900, stock: int = 10, **extra) -> dict:
    return {"code": code, "price": price, "stock": stock, **extra}


async def make_product(client, headers, category_id, title="无线蓝牙耳机 Pro", skus=None, **extra) -> dict:
    body = {"category_id": category_id, "title": title, "skus": skus if skus is not None else [], **extra}
    r = await client.post(f"{A}/products", json=body, headers=headers)
    assert r.status_code == 201, r.text
    return r.json()


# ---- auth ----


@pytest.mark.parametrize(
    ("method", "path"),
    [
        ("get", "/categories"),
        ("post", "/categories"),
        ("delete", "/categories/1"),
        ("get", "/products"),
        ("post", "/products/1/shelve"),
        ("patch", "/skus/1"),
        ("post", "/skus/1/stock-adjustments"),
    ],
)
async def test_admin_catalog_requires_merchant_token(client, make_user, method, path):
    r = await client.request(method.upper(), A + path)
    assert r.status_code == 401
    assert r.json()["error"]["code"] == "auth.required"
    _, shopper = await make_user()
    r = await client.request(method.upper(), A + path, headers=shopper)
    assert r.status_code == 401
    assert r.json()["error"]["code"] == "auth.invalid_token"


# ---- categories ----


async def test_category_tree_is_two_levels(client, admin_headers):
    top = await make_category(client, admin_headers, "数码电器", sort_order=2)
    other = await make_category(client, admin_headers, "食品", sort_order=1)
    child = await make_category(client, admin_headers, "耳机音响", parent_id=top["id"])
    assert child["parent_id"] == top["id"] and child["children"] == []

    r = await client.post(
        f"{A}/categories", json={"name": "入耳式", "parent_id": child["id"]}, headers=admin_headers
    )
    assert r.status_code == 409
    assert r.json()["error"]["code"] == "catalog.category_too_deep"

    r = await client.post(f"{A}/categories", json={"name": "x", "parent_id": 999999}, headers=admin_headers)
    assert r.status_code == 422
    assert r.json()["error"]["code"] == "catalog.parent_not_found"

    r = await client.get(f"{A}/categories", headers=admin_headers)
    assert r.status_code == 200
    tree = r.json()
    assert [c["name"] for c in tree] == ["食品", "数码电器"]  # sort_order, smaller first
    assert tree[1]["children"][0]["id"] == child["id"]
    assert other["children"] == []


async def test_category_validation(client, admin_headers):
    for body in ({"name": ""}, {"name": "   "}, {"name": "x" * 33}, {"name": "ok", "icon": "x"}, {}):
        r = await client.post(f"{A}/categories", json=body, headers=admin_headers)
        assert r.status_code == 422, body
        assert r.json()["error"]["code"] == "validation_failed"


async def test_category_update_and_move(client, admin_headers):
    a = await make_category(client, admin_headers, "服饰")
    b = await make_category(client, admin_headers, "鞋包")
    child = await make_category(client, admin_headers, "女装", parent_id=a["id"])

    # A top-level category with children cannot become a child.
    r = await client.patch(f"{A}/categories/{a['id']}", json={"parent_id": b["id"]}, headers=admin_headers)
    assert r.status_code == 409
    assert r.json()["error"]["code"] == "catalog.category_too_deep"
    # Nor can anything go under a sub-category.
    r = await client.patch(
        f"{A}/categories/{b['id']}", json={"parent_id": child["id"]}, headers=admin_headers
    )
    assert r.status_code == 409
    r = await client.patch(f"{A}/categories/{b['id']}", json={"parent_id": b["id"]}, headers=admin_headers)
    assert r.status_code == 422
    assert r.json()["error"]["code"] == "catalog.parent_invalid"
    r = await client.patch(f"{A}/categories/{b['id']}", json={"parent_id": 999999}, headers=admin_headers)
    assert r.status_code == 422
    assert r.json()["error"]["code"] == "catalog.parent_not_found"

    # Move the child under b, rename it, then promote it to the top level.
    r = await client.patch(
        f"{A}/categories/{child['id']}", json={"parent_id": b["id"], "name": " 女鞋 "}, headers=admin_headers
    )
    assert r.status_code == 200, r.text
    assert r.json()["parent_id"] == b["id"] and r.json()["name"] == "女鞋"
    r = await client.patch(f"{A}/categories/{child['id']}", json={"parent_id": None}, headers=admin_headers)
    assert r.status_code == 200
    assert r.json()["parent_id"] is None and r.json()["name"] == "女鞋"

    r = await client.patch(f"{A}/categories/999999", json={"name": "x"}, headers=admin_headers)
    assert r.status_code == 404
    assert r.json()["error"]["code"] == "catalog.category_not_found"
    r = await client.patch(f"{A}/categories/{a['id']}", json={"sort": 1}, headers=admin_headers)
    assert r.status_code == 422


async def test_category_delete_only_when_empty(client, admin_headers, db):
    top = await make_category(client, admin_headers, "数码")
    child = await make_category(client, admin_headers, "配件", parent_id=top["id"])
    await make_product(client, admin_headers, child["id"])

    r = await client.delete(f"{A}/categories/{top['id']}", headers=admin_headers)
    assert r.status_code == 409
    assert r.json()["error"]["code"] == "catalog.category_not_empty"
    r = await client.delete(f"{A}/categories/{child['id']}", headers=admin_headers)
    assert r.status_code == 409
    assert r.json()["error"]["code"] == "catalog.category_not_empty"

    empty = await make_category(client, admin_headers, "空分类")
    r = await client.delete(f"{A}/categories/{empty['id']}", headers=admin_headers)
    assert r.status_code == 204
    assert await db.fetchval("select count(*) from categories where id = $1", empty["id"]) == 0
    r = await client.delete(f"{A}/categories/{empty['id']}", headers=admin_headers)
    assert r.status_code == 404
    assert r.json()["error"]["code"] == "catalog.category_not_found"


async def test_concurrent_child_and_move_keep_two_levels(client, admin_headers, db):
    """Adding a child to A while moving A under B: whichever wins, no three-level chain exists."""
    for _ in range(5):
        a = await make_category(client, admin_headers, "A")
        b = await make_category(client, admin_headers, "B")
        await asyncio.gather(
            client.post(f"{A}/categories", json={"name": "C", "parent_id": a["id"]}, headers=admin_headers),
            client.patch(f"{A}/categories/{a['id']}", json={"parent_id": b["id"]}, headers=admin_headers),
        )
        deep = await db.fetchval(
            """select count(*) from categories c join categories p on p.id = c.parent_id
               where p.parent_id is not null"""
        )
        assert deep == 0


# ---- products ----


async def test_create_product_with_skus(client, admin_headers, db):
    cat = await make_category(client, admin_headers)
    p = await make_product(
        client,
        admin_headers,
        cat["id"],
        subtitle="主动降噪",
        description="长续航",
        image_urls=["https://img.example.com/a.jpg"],
        skus=[
            sku("EAR-BLK", 29900, 5, specs={"color": "black"}, original_price=39900),
            sku("EAR-WHT", 27900, 0, specs={"color": "white"}),
        ],
    )
    assert p["status"] == "off_shelf"
    assert p["min_price"] == 27900
    assert p["image_urls"] == ["https://img.example.com/a.jpg"]
    assert [(s["code"], s["stock"], s["specs"]) for s in p["skus"]] == [
        ("EAR-BLK", 5, {"color": "black"}),
        ("EAR-WHT", 0, {"color": "white"}),
    ]
    # Initial stock enters through the ledger; a SKU starting at zero has no row.
    rows = await db.fetch("select sku_id, delta, reason, stock_after from stock_ledger order by id")
    assert [tuple(r) for r in rows] == [(p["skus"][0]["id"], 5, "initial", 5)]

    r = await client.get(f"{A}/products/{p['id']}", headers=admin_headers)
    assert r.status_code == 200
    assert r.json() == p


async def test_create_product_refusals(client, admin_headers, db):
    cat = await make_category(client, admin_headers)
    r = await client.post(f"{A}/products", json={"category_id": 999999, "title": "x"}, headers=admin_headers)
    assert r.status_code == 422
    assert r.json()["error"]["code"] == "catalog.category_not_found"

    cases = [
        {"category_id": cat["id"], "title": ""},
        {"category_id": cat["id"], "title": "x", "status": "on_shelf"},
        {"category_id": cat["id"], "title": "x", "image_urls": ["http://insecure.example.com/a.jpg"]},
        {"category_id": cat["id"], "title": "x", "skus": [sku("A", price=0)]},
        {"category_id": cat["id"], "title": "x", "skus": [sku("A", stock=-1)]},
        {"category_id": cat["id"], "title": "x", "skus": [sku("bad code")]},
        {"category_id": cat["id"], "title": "x", "skus": [sku("A", 100, original_price=99)]},
    ]
    for body in cases:
        r = await client.post(f"{A}/products", json=body, headers=admin_headers)
        assert r.status_code == 422, body
    # Two SKUs with one code: the whole product is refused, nothing is left behind.
    r = await client.post(
        f"{A}/products",
        json={"category_id": cat["id"], "title": "x", "skus": [sku("DUP"), sku("DUP", specs={"c": "2"})]},
        headers=admin_headers,
    )
    assert r.status_code == 409
    assert r.json()["error"]["code"] == "catalog.sku_code_taken"
    assert await db.fetchval("select count(*) from products") == 0
    assert await db.fetchval("select count(*) from stock_ledger") == 0


async def test_get_and_update_product(client, admin_headers):
    cat = await make_category(client, admin_headers)
    other = await make_category(client, admin_headers, "其他")
    p = await make_product(client, admin_headers, cat["id"], sort_order=3)

    r = await client.patch(
        f"{A}/products/{p['id']}",
        json={"title": "头戴式耳机", "category_id": other["id"], "image_urls": []},
        headers=admin_headers,
    )
    assert r.status_code == 200, r.text
    body = r.json()
    assert (body["title"], body["category_id"], body["sort_order"]) == ("头戴式耳机", other["id"], 3)

    r = await client.patch(f"{A}/products/{p['id']}", json={"category_id": 999999}, headers=admin_headers)
    assert r.status_code == 422
    assert r.json()["error"]["code"] == "catalog.category_not_found"
    r = await client.patch(f"{A}/products/{p['id']}", json={"status": "on_shelf"}, headers=admin_headers)
    assert r.status_code == 422
    r = await client.patch(f"{A}/products/999999", json={"title": "x"}, headers=admin_headers)
    assert r.status_code == 404
    assert r.json()["error"]["code"] == "catalog.product_not_found"
    r = await client.get(f"{A}/products/999999", headers=admin_headers)
    assert r.status_code == 404


async def test_shelve_and_unshelve(client, admin_headers):
    cat = await make_category(client, admin_headers)
    p = await make_product(client, admin_headers, cat["id"])

    r = await client.post(f"{A}/products/{p['id']}/shelve", headers=admin_headers)
    assert r.status_code == 409
    assert r.json()["error"]["code"] == "catalog.no_sku"

    # An inactive SKU does not count.
    r = await client.post(
        f"{A}/products/{p['id']}/skus", json=sku("S1", is_active=False), headers=admin_headers
    )
    assert r.status_code == 201
    sku_id = r.json()["id"]
    r = await client.post(f"{A}/products/{p['id']}/shelve", headers=admin_headers)
    assert r.status_code == 409

    r = await client.patch(f"{A}/skus/{sku_id}", json={"is_active": True}, headers=admin_headers)
    assert r.status_code == 200
    r = await client.post(f"{A}/products/{p['id']}/shelve", headers=admin_headers)
    assert r.status_code == 200
    assert r.json()["status"] == "on_shelf"
    assert (await client.get(f"/api/v1/products/{p['id']}")).status_code == 200

    r = await client.post(f"{A}/products/{p['id']}/unshelve", headers=admin_headers)
    assert r.status_code == 200
    assert r.json()["status"] == "off_shelf"
    assert (await client.get(f"/api/v1/products/{p['id']}")).status_code == 404

    for action in ("shelve", "unshelve"):
        r = await client.post(f"{A}/products/999999/{action}", headers=admin_headers)
        assert r.status_code == 404
        assert r.json()["error"]["code"] == "catalog.product_not_found"


async def test_admin_product_list_filters_and_pages(client, admin_headers):
    top = await make_category(client, admin_headers, "数码")
    child = await make_category(client, admin_headers, "耳机", parent_id=top["id"])
    other = await make_category(client, admin_headers, "食品")
    ids = []
    for i in range(5):
        p = await make_product(
            client, admin_headers, child["id"], f"蓝牙耳机 {i}", skus=[sku(f"E{i}", stock=i + 1)]
        )
        ids.append(p["id"])
    snack = await make_product(client, admin_headers, other["id"], "牛肉干", skus=[sku("N1")])
    await client.post(f"{A}/products/{ids[0]}/shelve", headers=admin_headers)

    seen, cursor = [], None
    while True:
        params = {"limit": 2, **({"cursor": cursor} if cursor else {})}
        r = await client.get(f"{A}/products", params=params, headers=admin_headers)
        assert r.status_code == 200
        seen += [item["id"] for item in r.json()["items"]]
        cursor = r.json()["next_cursor"]
        if cursor is None:
            break
    assert seen == sorted([*ids, snack["id"]], reverse=True)

    r = await client.get(f"{A}/products", params={"category_id": top["id"]}, headers=admin_headers)
    assert sorted(i["id"] for i in r.json()["items"]) == ids
    r = await client.get(f"{A}/products", params={"status": "on_shelf"}, headers=admin_headers)
    (item,) = r.json()["items"]
    assert (item["id"], item["status"], item["stock"], item["sku_count"]) == (ids[0], "on_shelf", 1, 1)
    r = await client.get(f"{A}/products", params={"q": "牛肉"}, headers=admin_headers)
    assert [i["id"] for i in r.json()["items"]] == [snack["id"]]
    r = await client.get(f"{A}/products", params={"status": "deleted"}, headers=admin_headers)
    assert r.status_code == 422
    r = await client.get(f"{A}/products", params={"cursor": "not-a-cursor"}, headers=admin_headers)
    assert r.status_code == 422
    assert r.json()["error"]["code"] == "invalid_cursor"
    r = await client.get(f"{A}/products", params={"limit": 0}, headers=admin_headers)
    assert r.status_code == 422


# ---- SKUs ----


async def test_sku_create_update_and_min_price(client, admin_headers, db):
    cat = await make_category(client, admin_headers)
    p = await make_product(client, admin_headers, cat["id"], skus=[sku("A1", 5000, specs={"size": "S"})])

    r = await client.post(
        f"{A}/products/{p['id']}/skus", json=sku("A2", 4000, 3, specs={"size": "M"}), headers=admin_headers
    )
    assert r.status_code == 201, r.text
    a2 = r.json()
    assert (a2["stock"], a2["sales"], a2["is_active"], a2["original_price"]) == (3, 0, True, None)
    assert await db.fetchval("select min_price from products where id = $1", p["id"]) == 4000

    r = await client.patch(
        f"{A}/skus/{a2['id']}", json={"price": 6000, "original_price": 8000}, headers=admin_headers
    )
    assert r.status_code == 200
    assert (r.json()["price"], r.json()["original_price"], r.json()["stock"]) == (6000, 8000, 3)
    assert await db.fetchval("select min_price from products where id = $1", p["id"]) == 5000
    r = await client.patch(f"{A}/skus/{a2['id']}", json={"original_price": None}, headers=admin_headers)
    assert r.status_code == 200 and r.json()["original_price"] is None

    r = await client.get(f"{A}/products/{p['id']}/skus", headers=admin_headers)
    assert r.status_code == 200
    assert [s["code"] for s in r.json()] == ["A1", "A2"]


async def test_sku_refusals(client, admin_headers):
    cat = await make_category(client, admin_headers)
    p = await make_product(client, admin_headers, cat["id"], skus=[sku("A1", 5000, specs={"size": "S"})])
    a1 = p["skus"][0]
    url = f"{A}/products/{p['id']}/skus"

    r = await client.post(url, json=sku("A1", specs={"size": "M"}), headers=admin_headers)
    assert r.status_code == 409
    assert r.json()["error"]["code"] == "catalog.sku_code_taken"
    r = await client.post(url, json=sku("A9", specs={"size": "S"}), headers=admin_headers)
    assert r.status_code == 409
    assert r.json()["error"]["code"] == "catalog.sku_specs_taken"
    r = await client.post(f"{A}/products/999999/skus", json=sku("Z"), headers=admin_headers)
    assert r.status_code == 404
    assert r.json()["error"]["code"] == "catalog.product_not_found"
    r = await client.get(f"{A}/products/999999/skus", headers=admin_headers)
    assert r.status_code == 404

    # Stock is never written directly: not at all through a SKU update.
    r = await client.patch(f"{A}/skus/{a1['id']}", json={"stock": 1000}, headers=admin_headers)
    assert r.status_code == 422
    r = await client.patch(f"{A}/skus/{a1['id']}", json={"original_price": 4999}, headers=admin_headers)
    assert r.status_code == 422
    assert r.json()["error"]["details"][0]["field"] == "original_price"
    r = await client.patch(
        f"{A}/skus/{a1['id']}",
        json={"specs": {"k": "v"} | {str(i): "v" for i in range(5)}},
        headers=admin_headers,
    )
    assert r.status_code == 422
    r = await client.patch(f"{A}/skus/999999", json={"price": 1}, headers=admin_headers)
    assert r.status_code == 404
    assert r.json()["error"]["code"] == "catalog.sku_not_found"

    other = await make_product(client, admin_headers, cat["id"], skus=[sku("B1")])
    r = await client.patch(f"{A}/skus/{other['skus'][0]['id']}", json={"code": "A1"}, headers=admin_headers)
    assert r.status_code == 409
    assert r.json()["error"]["code"] == "catalog.sku_code_taken"


async def test_last_active_sku_of_shelved_product_stays_active(client, admin_headers, db):
    cat = await make_category(client, admin_headers)
    p = await make_product(client, admin_headers, cat["id"], skus=[sku("A1")])
    await client.post(f"{A}/products/{p['id']}/shelve", headers=admin_headers)
    r = await client.patch(f"{A}/skus/{p['skus'][0]['id']}", json={"is_active": False}, headers=admin_headers)
    assert r.status_code == 409
    assert r.json()["error"]["code"] == "catalog.no_sku"
    assert await db.fetchval("select is_active from skus where id = $1", p["skus"][0]["id"]) is True

    await client.post(f"{A}/products/{p['id']}/unshelve", headers=admin_headers)
    r = await client.patch(f"{A}/skus/{p['skus'][0]['id']}", json={"is_active": False}, headers=admin_headers)
    assert r.status_code == 200
    assert await db.fetchval("select min_price from products where id = $1", p["id"]) is None


# ---- stock ----


async def test_stock_adjustments_and_ledger(client, admin_headers, db):
    cat = await make_category(client, admin_headers)
    p = await make_product(client, admin_headers, cat["id"], skus=[sku("A1", stock=10)])
    sku_id = p["skus"][0]["id"]
    url = f"{A}/skus/{sku_id}/stock-adjustments"

    r = await client.post(url, json={"delta": 5, "reason": "到货补货"}, headers=admin_headers)
    assert r.status_code == 201, r.text
    entry = r.json()
    assert (entry["sku_id"], entry["delta"], entry["stock_after"], entry["reason"]) == (
        sku_id,
        5,
        15,
        "到货补货",
    )
    assert entry["admin_id"] is not None

    r = await client.post(url, json={"delta": -16, "reason": "盘点"}, headers=admin_headers)
    assert r.status_code == 409
    assert r.json()["error"]["code"] == "catalog.insufficient_stock"
    r = await client.post(url, json={"delta": -15, "reason": "盘点清零"}, headers=admin_headers)
    assert r.status_code == 201 and r.json()["stock_after"] == 0
    assert await db.fetchval("select stock from skus where id = $1", sku_id) == 0

    for body in (
        {"delta": 0, "reason": "x"},
        {"delta": 1},
        {"delta": 1, "reason": " "},
        {"delta": 1, "reason": "x", "stock": 3},
    ):
        r = await client.post(url, json=body, headers=admin_headers)
        assert r.status_code == 422, body
    r = await client.post(
        f"{A}/skus/999999/stock-adjustments", json={"delta": 1, "reason": "x"}, headers=admin_headers
    )
    assert r.status_code == 404
    assert r.json()["error"]["code"] == "catalog.sku_not_found"

    # The ledger, newest first, in pages; it sums to the stock.
    r = await client.get(url, params={"limit": 2}, headers=admin_headers)
    assert r.status_code == 200
    first = r.json()
    assert [e["delta"] for e in first["items"]] == [-15, 5]
    r = await client.get(url, params={"limit": 2, "cursor": first["next_cursor"]}, headers=admin_headers)
    assert [(e["delta"], e["reason"]) for e in r.json()["items"]] == [(10, "initial")]
    assert r.json()["next_cursor"] is None
    assert await db.fetchval("select sum(delta) from stock_ledger where sku_id = $1", sku_id) == 0
    r = await client.get(f"{A}/skus/999999/stock-adjustments", headers=admin_headers)
    assert r.status_code == 404
    r = await client.get(url, params={"cursor": first["next_cursor"][:-2] + "!!"}, headers=admin_headers)
    assert r.status_code == 422


async def test_concurrent_stock_adjustments_never_go_negative(client, admin_headers, db):
    cat = await make_category(client, admin_headers)
    p = await make_product(client, admin_headers, cat["id"], skus=[sku("HOT", stock=20)])
    sku_id = p["skus"][0]["id"]
    url = f"{A}/skus/{sku_id}/stock-adjustments"

    responses = await asyncio.gather(
        *(
            client.post(url, json={"delta": -1, "reason": "抢购出库"}, headers=admin_headers)
            for _ in range(50)
        )
    )
    codes = sorted(r.status_code for r in responses)
    assert codes.count(201) == 20 and codes.count(409) == 30
    assert {r.json()["error"]["code"] for r in responses if r.status_code == 409} == {
        "catalog.insufficient_stock"
    }
    assert sorted(r.json()["stock_after"] for r in responses if r.status_code == 201) == list(range(20))
    assert await db.fetchval("select stock from skus where id = $1", sku_id) == 0
    assert (
        await db.fetchval("select count(*) from stock_ledger where sku_id = $1 and delta = -1", sku_id) == 20
    )

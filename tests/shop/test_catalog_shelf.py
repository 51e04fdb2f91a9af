"""Shopper catalog API: categories, listing with sorts and cursors, search, product detail."""

from __future__ import annotations

import base64
import itertools
import json

import pytest

from shop.catalog import queries
from shop.catalog.service import _FIRST_PAGE_KEYS

_codes = itertools.count(1)

A = "/api/v1/admin"


async def make_category(client, headers, name, parent_id=None, **extra) -> int:
    r = await client.post(
        f"{A}/categories", json={"name": name, "parent_id": parent_id, **extra}, headers=headers
    )
    assert r.status_code == 201, r.text
    return r.json()["id"]


async def make_product(client, headers, category_id, title, prices=(9900,), shelve=True, **extra) -> int:
    skus = [
        {"code": f"S{next(_codes)}", "price": price, "stock": 5, "specs": {"n": str(i)}}
        for i, price in enumerate(prices)
    ]
    r = await client.post(
        f"{A}/products",
        json={"category_id": category_id, "title": title, "skus": skus, **extra},
        headers=headers,
    )
    assert r.status_code == 201, r.text
    product_id = r.json()["id"]
    if shelve:
        assert (await client.post(f"{A}/products/{product_id}/shelve", headers=headers)).status_code == 200
    return product_id


async def walk(client, params: dict, limit: int = 2) -> list[int]:
    """Every product id of a listing, following next_cursor page by page."""
    ids, cursor = [], None
    while True:
        r = await client.get(
            "/api/v1/products", params={**params, "limit": limit, **({"cursor": cursor} if cursor else {})}
        )
        assert r.status_code == 200, r.text
        page = r.json()
        assert len(page["items"]) <= limit
        ids += [item["id"] for item in page["items"]]
        cursor = page["next_cursor"]
        if cursor is None:
            return ids


@pytest.fixture
async def shelf(client, admin_headers, db):
    """Two top-level categories (one with two children), six on-shelf products, one off-shelf."""
    digital = await make_category(client, admin_headers, "数码")
    audio = await make_category(client, admin_headers, "耳机", parent_id=digital)
    phone = await make_category(client, admin_headers, "手机配件", parent_id=digital)
    food = await make_category(client, admin_headers, "食品")
    hidden = await make_category(client, admin_headers, "隐藏", is_visible=False)
    await make_category(client, admin_headers, "隐藏子类", parent_id=hidden)
    p = {
        "earbuds": await make_product(
            client,
            admin_headers,
            audio,
            "无线蓝牙耳机 Pro",
            (29900, 25900),
            subtitle="主动降噪",
            sort_order=2,
        ),
        "headset": await make_product(client, admin_headers, audio, "头戴式耳机", (59900,), sort_order=1),
        "charger": await make_product(client, admin_headers, phone, "65W快充充电器", (12900,)),
        "case": await make_product(client, admin_headers, phone, "磁吸手机壳", (5900,)),
        "jerky": await make_product(client, admin_headers, food, "手撕牛肉干", (5900,)),
        "nuts": await make_product(client, admin_headers, food, "每日坚果", (7990,)),
        "draft": await make_product(client, admin_headers, food, "蓝牙耳机 草稿", (100,), shelve=False),
    }
    sales = {"earbuds": 50, "headset": 7, "charger": 50, "case": 300, "jerky": 0, "nuts": 12}
    for name, sold in sales.items():
        await db.execute("update products set sales = $2 where id = $1", p[name], sold)
    return {"products": p, "digital": digital, "audio": audio, "phone": phone, "food": food, "hidden": hidden}


# ---- categories ----


async def test_shopper_category_tree_shows_visible_only(client, shelf):
    r = await client.get("/api/v1/categories")
    assert r.status_code == 200
    tree = r.json()
    assert [(c["name"], [k["name"] for k in c["children"]]) for c in tree] == [
        ("数码", ["耳机", "手机配件"]),
        ("食品", []),
    ]
    assert set(tree[0]) == {"id", "parent_id", "name", "children"}


# ---- listing and sorts ----


async def test_listing_sorts_are_complete_and_stable_across_pages(client, shelf, db):
    p = shelf["products"]
    on_shelf = [v for k, v in p.items() if k != "draft"]
    rows = await db.fetch(
        "select id, sales, min_price, created_at, sort_order from products where id = any($1::bigint[])",
        on_shelf,
    )
    by = {r["id"]: r for r in rows}

    expected = {
        "newest": sorted(on_shelf, key=lambda i: (by[i]["created_at"], i), reverse=True),
        "sales": sorted(on_shelf, key=lambda i: (by[i]["sales"], i), reverse=True),
        "price_asc": sorted(on_shelf, key=lambda i: (by[i]["min_price"], i)),
        "price_desc": sorted(on_shelf, key=lambda i: (by[i]["min_price"], i), reverse=True),
        "default": sorted(on_shelf, key=lambda i: (by[i]["sort_order"], -i)),
    }
    for sort, ids in expected.items():
        assert await walk(client, {"sort": sort}) == ids, sort
        assert await walk(client, {"sort": sort}, limit=100) == ids, sort
    # Ties on the sort key (two products with 50 sales, two at 59.00) are broken by id.
    assert expected["sales"][:3] == [p["case"], p["charger"], p["earbuds"]]
    assert p["draft"] not in await walk(client, {})


async def test_listing_card_fields(client, shelf):
    r = await client.get("/api/v1/products", params={"sort": "price_asc", "limit": 1})
    assert r.status_code == 200
    (card,) = r.json()["items"]
    assert set(card) == {"id", "category_id", "title", "subtitle", "image_url", "min_price", "sales"}
    r = await client.get("/api/v1/products", params={"q": "蓝牙"})
    (earbuds,) = r.json()["items"]
    assert (earbuds["title"], earbuds["min_price"], earbuds["subtitle"]) == (
        "无线蓝牙耳机 Pro",
        25900,
        "主动降噪",
    )


async def test_listing_by_category_includes_children(client, shelf):
    p = shelf["products"]
    assert set(await walk(client, {"category_id": shelf["digital"]})) == {
        p["earbuds"],
        p["headset"],
        p["charger"],
        p["case"],
    }
    assert set(await walk(client, {"category_id": shelf["audio"]})) == {p["earbuds"], p["headset"]}
    assert set(await walk(client, {"category_id": shelf["food"]})) == {p["jerky"], p["nuts"]}
    assert await walk(client, {"category_id": 999999}) == []
    assert await walk(client, {"category_id": shelf["audio"], "q": "头戴"}) == [p["headset"]]


def cursor_of(*parts) -> str:
    return base64.urlsafe_b64encode(json.dumps(parts).encode()).decode().rstrip("=")


@pytest.mark.parametrize(
    "params",
    [
        {"cursor": "%%%"},
        {"cursor": "bm90IGpzb24"},  # "not json"
        {"cursor": cursor_of("sales", 1)},
        {"cursor": cursor_of("sales", "many", 1)},
        {"cursor": cursor_of("sales", 10, 2**70)},
        {"cursor": cursor_of("newest", "yesterday", 1)},
        {"cursor": cursor_of("newest", "2024-01-01T00:00:00", 1)},  # no time zone
        {"sort": "sales", "cursor": cursor_of("price_asc", 100, 1)},  # another sort's cursor
    ],
)
async def test_listing_refuses_bad_cursors(client, shelf, params):
    r = await client.get("/api/v1/products", params=params)
    assert r.status_code == 422
    assert r.json()["error"]["code"] == "invalid_cursor"


async def test_listing_validates_parameters(client, shelf):
    for params in ({"sort": "cheapest"}, {"limit": 0}, {"limit": 101}, {"category_id": "x"}, {"q": "x" * 51}):
        r = await client.get("/api/v1/products", params=params)
        assert r.status_code == 422, params
        assert r.json()["error"]["code"] == "validation_failed"


async def test_a_real_cursor_resumes_after_its_row(client, shelf):
    r = await client.get("/api/v1/products", params={"sort": "newest", "limit": 3})
    page = r.json()
    r = await client.get(
        "/api/v1/products", params={"sort": "newest", "limit": 3, "cursor": page["next_cursor"]}
    )
    assert r.status_code == 200
    second = r.json()
    assert {i["id"] for i in page["items"]}.isdisjoint({i["id"] for i in second["items"]})
    assert len(page["items"]) + len(second["items"]) == 6
    assert second["next_cursor"] is None


# ---- search ----


@pytest.mark.parametrize(
    "q",
    [
        "蓝牙",
        "耳机",
        "蓝牙耳机",
        "pro",
        "PRO",
        "无线蓝牙耳机 Pro",
        "牙耳",
        "蓝",
        "降噪",
        "耳机 pro",
        " 蓝牙 ",
    ],
)
async def test_search_finds_chinese_substrings(client, shelf, q):
    r = await client.get("/api/v1/products", params={"q": q})
    assert r.status_code == 200
    ids = [i["id"] for i in r.json()["items"]]
    assert shelf["products"]["earbuds"] in ids, q
    # The off-shelf draft has "蓝牙耳机" in its title too, and stays invisible.
    assert shelf["products"]["draft"] not in ids


@pytest.mark.parametrize("q", ["蓝耳", "耳机蓝牙", "蓝牙 max", "proo", "充电宝", "x"])
async def test_search_misses_non_matches(client, shelf, q):
    r = await client.get("/api/v1/products", params={"q": q})
    assert r.status_code == 200
    assert shelf["products"]["earbuds"] not in [i["id"] for i in r.json()["items"]], q


async def test_search_rechecks_what_bigrams_cannot_tell(client, admin_headers, shelf):
    # Every bigram of "机蓝牙" is in "机蓝 蓝牙", but the phrase itself is not.
    cat = shelf["food"]
    scattered = await make_product(client, admin_headers, cat, "机蓝 蓝牙")
    whole = await make_product(client, admin_headers, cat, "耳机蓝牙套装")
    r = await client.get("/api/v1/products", params={"q": "机蓝牙"})
    ids = [i["id"] for i in r.json()["items"]]
    assert whole in ids and scattered not in ids
    # Several words: each must occur, in any order.
    r = await client.get("/api/v1/products", params={"q": "蓝牙 机蓝"})
    assert {i["id"] for i in r.json()["items"]} == {scattered, whole}
    r = await client.get("/api/v1/products", params={"q": "套装 机蓝"})
    assert [i["id"] for i in r.json()["items"]] == [whole]


async def test_search_follows_title_edits(client, admin_headers, shelf):
    pid = shelf["products"]["nuts"]
    r = await client.patch(
        f"{A}/products/{pid}", json={"title": "混合坚果礼盒", "subtitle": "年货"}, headers=admin_headers
    )
    assert r.status_code == 200
    assert [
        i["id"] for i in (await client.get("/api/v1/products", params={"q": "礼盒"})).json()["items"]
    ] == [pid]
    assert [
        i["id"] for i in (await client.get("/api/v1/products", params={"q": "年货"})).json()["items"]
    ] == [pid]
    assert (await client.get("/api/v1/products", params={"q": "每日"})).json()["items"] == []


async def test_search_is_index_backed(db):
    """The search predicate is answered from the GIN index over bigrams, not by scanning."""
    cat = await db.fetchval("insert into categories (name) values ('bulk') returning id")
    await db.execute(
        """insert into products (category_id, title, subtitle, status, min_price)
           select $1, '商品' || i || case when i % 500 = 0 then ' 无线蓝牙耳机' else ' 纯棉短袖' end,
                  '', 'on_shelf', 100 + i
           from generate_series(1, 3000) i""",
        cat,
    )
    await db.execute("analyze products")
    statements = [
        (queries._SHELF_SQL[("newest", True)], [None, *_FIRST_PAGE_KEYS["newest"], 21, "蓝牙耳机"]),
        (queries._SHELF_SQL[("price_asc", True)], [None, 0, 0, 21, "蓝牙耳机"]),
        (queries._ADMIN_LIST_SQL[True], [None, None, 2**63 - 1, 21, "蓝牙耳机"]),
    ]
    async with db.transaction():
        await db.execute("set local enable_seqscan = off")
        for sql, args in statements:
            plan = "\n".join(r[0] for r in await db.fetch("explain " + sql, *args))
            assert "products_search_idx" in plan, plan
    rows = await db.fetch(
        queries._SHELF_SQL[("newest", True)], None, *_FIRST_PAGE_KEYS["newest"], 21, "蓝牙耳机"
    )
    assert len(rows) == 6


# ---- detail ----


async def test_product_detail_with_skus_and_stock(client, admin_headers, shelf):
    cat = shelf["food"]
    r = await client.post(
        f"{A}/products",
        json={
            "category_id": cat,
            "title": "纯棉T恤",
            "image_urls": ["https://img.example.com/t1.jpg", "https://img.example.com/t2.jpg"],
            "description": "220g 重磅纯棉",
            "skus": [
                {
                    "code": "T-W-M",
                    "specs": {"color": "white", "size": "M"},
                    "price": 7900,
                    "original_price": 9900,
                    "stock": 3,
                },
                {"code": "T-W-L", "specs": {"color": "white", "size": "L"}, "price": 7900, "stock": 0},
                {"code": "T-B-M", "specs": {"color": "black", "size": "M"}, "price": 8900, "stock": 8},
                {
                    "code": "T-B-XL",
                    "specs": {"color": "black", "size": "XL"},
                    "price": 8900,
                    "stock": 8,
                    "is_active": False,
                },
            ],
        },
        headers=admin_headers,
    )
    pid = r.json()["id"]
    await client.post(f"{A}/products/{pid}/shelve", headers=admin_headers)

    r = await client.get(f"/api/v1/products/{pid}")
    assert r.status_code == 200
    detail = r.json()
    assert detail["title"] == "纯棉T恤" and detail["min_price"] == 7900
    assert detail["image_urls"] == ["https://img.example.com/t1.jpg", "https://img.example.com/t2.jpg"]
    assert detail["spec_options"] == [
        {"name": "color", "values": ["white", "black"]},
        {"name": "size", "values": ["M", "L"]},
    ]
    assert [(s["specs"], s["price"], s["original_price"], s["stock"]) for s in detail["skus"]] == [
        ({"color": "white", "size": "M"}, 7900, 9900, 3),
        ({"color": "white", "size": "L"}, 7900, None, 0),
        ({"color": "black", "size": "M"}, 8900, None, 8),
    ]
    assert "code" not in detail["skus"][0] and "status" not in detail


async def test_off_shelf_and_missing_products_are_404(client, shelf):
    for pid in (shelf["products"]["draft"], 999999):
        r = await client.get(f"/api/v1/products/{pid}")
        assert r.status_code == 404
        assert r.json()["error"]["code"] == "catalog.product_not_found"


async def test_fetch_skus_for_sale(db, client, admin_headers, shelf):
    p = shelf["products"]
    skus = await db.fetch(
        "select id from skus where product_id = any($1::bigint[]) order by id", [p["earbuds"], p["draft"]]
    )
    ids = [r["id"] for r in skus]
    async with db.transaction():
        rows = await queries.fetch_skus_for_sale(db, [*reversed(ids), 999999], lock=True)
    assert [r["sku_id"] for r in rows] == ids
    first = rows[0]
    assert (first["product_id"], first["title"], first["product_status"], first["price"]) == (
        p["earbuds"],
        "无线蓝牙耳机 Pro",
        "on_shelf",
        29900,
    )
    assert rows[-1]["product_status"] == "off_shelf"

    await queries.record_sales(db, ids[0], 3)
    assert await db.fetchval("select sales from skus where id = $1", ids[0]) == 3
    assert await db.fetchval("select sales from products where id = $1", p["earbuds"]) == 53

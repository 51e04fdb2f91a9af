"""`shop seed`: a believable demo store (categories, products with multi-spec SKUs, one admin).

Idempotent: the demo catalog is created once, recognised by its first SKU code, under an
advisory lock so two concurrent seeds cannot both create it; the admin is created only if missing.
"""

from __future__ import annotations

import itertools
from typing import NamedTuple

import asyncpg

from shop.catalog import service
from shop.catalog.schemas import CategoryCreate, ProductCreate, SkuCreate
from shop.db import connect
from shop.passwords import hash_password
from shop.settings import Settings

DEMO_ADMIN = ("admin", "admin12345")
SEED_LOCK_ID = 7_420_032
MARKER_SKU_CODE = "DEMO-EAR01-1"  # the first SKU the demo catalog creates


def image(slug: str, n: int = 1) -> list[str]:
    return [f"https://picsum.photos/seed/shop-{slug}-{i}/800/800" for i in range(1, n + 1)]


class DemoProduct(NamedTuple):
    code: str
    title: str
    subtitle: str
    description: str
    specs: dict[str, list[str]]  # one SKU per combination of values
    price: int  # fen, for the first value of the last spec
    original_price: int | None
    step: int  # fen added per later value of the last spec (bigger pack, special edition)
    stock: int  # per SKU
    sold: int  # demo sales history, so the "sales" sort means something


P = DemoProduct
# fmt: off
CATALOG: list[tuple[str, list[tuple[str, list[DemoProduct]]]]] = [
    ("数码电器", [
        ("耳机音响", [
            P("EAR01", "无线蓝牙耳机 Pro", "主动降噪 · 40小时续航", "入耳式设计，支持主动降噪与通透模式，蓝牙5.3稳定连接。", {"颜色": ["黑色", "白色"]}, 29900, 39900, 0, 120, 860),
            P("SPK01", "便携蓝牙音箱", "IPX7防水 · 户外露营", "360°环绕声场，12小时续航，支持双音箱串联。", {"颜色": ["薄荷绿", "雾霾蓝", "石墨黑"]}, 15900, 19900, 0, 60, 312),
            P("HP01", "头戴式降噪耳机", "Hi-Res认证 · 舒适佩戴", "40mm大动圈单元，自适应降噪，折叠收纳便于出行。", {"颜色": ["曜石黑", "云母白"], "版本": ["标准版", "典藏版"]}, 89900, 109900, 20000, 35, 97),
        ]),
        ("手机配件", [
            P("CHG01", "65W氮化镓快充充电器", "三口快充 · 折叠插脚", "兼容PD/QC协议，一个充电器搞定手机、平板和笔记本。", {"颜色": ["白色", "黑色"], "接口": ["2C1A", "3C"]}, 12900, 16900, 1000, 200, 1543),
            P("CASE01", "磁吸手机壳", "液态硅胶 · 亲肤手感", "内置磁吸圈，支持无线充电，四角加厚防摔。", {"颜色": ["午夜黑", "樱花粉", "远峰蓝"], "型号": ["iPhone 15", "iPhone 15 Pro"]}, 5900, 7900, 0, 80, 2210),
        ]),
    ]),
    ("服饰鞋包", [
        ("女装", [
            P("DRS01", "法式碎花连衣裙", "收腰显瘦 · 夏季新款", "雪纺面料轻盈透气，V领设计修饰脸型。", {"颜色": ["蓝色碎花", "黄色碎花"], "尺码": ["S", "M", "L"]}, 19900, 29900, 0, 40, 488),
            P("KNT01", "慵懒风针织开衫", "软糯亲肤 · 百搭外套", "含羊毛混纺，宽松版型，春秋季节必备。", {"颜色": ["燕麦色", "雾霾紫"], "尺码": ["均码"]}, 16900, None, 0, 55, 190),
        ]),
        ("男装", [
            P("TEE01", "纯棉圆领短袖T恤", "新疆长绒棉 · 不易变形", "220g重磅纯棉，领口罗纹加固，洗后不变形。", {"颜色": ["白色", "黑色", "灰色"], "尺码": ["M", "L", "XL", "XXL"]}, 7900, 9900, 0, 150, 3021),
            P("JKT01", "防风防泼水冲锋衣", "三合一 · 可拆卸内胆", "户外登山通勤两用，抓绒内胆可单穿。", {"颜色": ["藏青", "军绿"], "尺码": ["L", "XL", "XXL"]}, 49900, 69900, 0, 25, 156),
        ]),
        ("运动鞋", [
            P("RUN01", "轻量缓震跑步鞋", "回弹中底 · 透气网面", "专业跑鞋科技，适合日常慢跑与健身训练。", {"颜色": ["白灰", "黑红"], "尺码": ["40", "41", "42", "43"]}, 39900, 49900, 0, 30, 674),
        ]),
    ]),
    ("食品生鲜", [
        ("休闲零食", [
            P("NUT01", "每日坚果混合装", "7种坚果果干 · 独立小包", "巴旦木、腰果、榛子、蓝莓干等科学配比，每天一包。", {"规格": ["15包", "30包"]}, 5990, 7990, 5000, 300, 5120),
            P("JER01", "手撕风干牛肉干", "内蒙古草原牛 · 高蛋白", "精选牛后腿肉，风干工艺，嚼劲十足。", {"口味": ["原味", "香辣", "孜然"], "规格": ["250g", "500g"]}, 6800, 8800, 5800, 90, 1388),
        ]),
        ("茶饮冲调", [
            P("TEA01", "明前西湖龙井", "2024新茶 · 核心产区", "豆香浓郁，汤色嫩绿明亮，礼盒装送礼自饮皆宜。", {"规格": ["100g罐装", "250g礼盒"]}, 16800, 19800, 22000, 45, 233),
            P("COF01", "冻干咖啡粉", "3秒速溶 · 0蔗糖", "超低温冻干锁住风味，冷水热水皆可冲泡。", {"口味": ["经典美式", "榛果风味"], "规格": ["12颗", "24颗"]}, 4990, 6990, 4500, 180, 2756),
        ]),
    ]),
]
# fmt: on


def demo_skus(product: DemoProduct) -> list[SkuCreate]:
    """One SKU per combination of spec values; each later value of the last spec adds `step` fen."""
    names = list(product.specs)
    skus = []
    for combo in itertools.product(*(list(enumerate(product.specs[n])) for n in names)):
        extra = product.step * combo[-1][0]
        skus.append(
            SkuCreate(
                code=f"DEMO-{product.code}-" + "-".join(str(i + 1) for i, _ in combo),
                specs={name: value for name, (_, value) in zip(names, combo, strict=True)},
                price=product.price + extra,
                original_price=None if product.original_price is None else product.original_price + extra,
                stock=product.stock,
            )
        )
    return skus


async def add_demo_product(conn: asyncpg.Connection, category_id: int, demo: DemoProduct) -> None:
    product = await service.create_product(
        conn,
        ProductCreate(
            category_id=category_id,
            title=demo.title,
            subtitle=demo.subtitle,
            description=demo.description,
            image_urls=image(demo.code.lower(), 3),
            skus=demo_skus(demo),
        ),
        admin_id=None,
    )
    # Spread the demo sales history over the SKUs; the totals agree with the product's.
    count = len(product.skus)
    for i, sku in enumerate(product.skus):
        await conn.execute(
            "update skus set sales = $2 where id = $1",
            sku.id,
            demo.sold // count + int(i < demo.sold % count),
        )
    await conn.execute("update products set sales = $2 where id = $1", product.id, demo.sold)
    await service.shelve_product(conn, product.id)


async def ensure_admin(conn: asyncpg.Connection, username: str, password: str) -> bool:
    """Create the admin if the username is free; an existing account (and its password) is kept."""
    created = await conn.fetchval(
        """insert into admins (username, password_hash) values ($1, $2)
           on conflict (username) do nothing returning true""",
        username,
        hash_password(password),
    )
    return bool(created)


async def seed_catalog(conn: asyncpg.Connection) -> int:
    """Create the demo catalog unless it is there already; returns the number of products created."""
    async with conn.transaction():
        await conn.execute("select pg_advisory_xact_lock($1)", SEED_LOCK_ID)
        if await conn.fetchval("select exists (select 1 from skus where code = $1)", MARKER_SKU_CODE):
            return 0
        created = 0
        for top_order, (top_name, children) in enumerate(CATALOG):
            top = await service.create_category(conn, CategoryCreate(name=top_name, sort_order=top_order))
            for child_order, (child_name, products) in enumerate(children):
                child = await service.create_category(
                    conn, CategoryCreate(name=child_name, parent_id=top.id, sort_order=child_order)
                )
                for demo in products:
                    await add_demo_product(conn, child.id, demo)
                    created += 1
    return created


async def seed(settings: Settings, verbose: bool = False) -> dict[str, int | bool]:
    """Create the demo admin, catalog and a claimable coupon where missing (safe to run again)."""
    from shop.coupons.service import seed_demo_coupons
    from shop.keys import Keys
    from shop.redis import Scripts, create_redis

    conn = await connect(settings)
    redis = create_redis(settings.redis_url)
    try:
        admin_created = await ensure_admin(conn, *DEMO_ADMIN)
        products_created = await seed_catalog(conn)
        coupons_created = await seed_demo_coupons(conn, redis, Scripts(redis), Keys(settings.redis_prefix))
    finally:
        await redis.aclose()
        await conn.close()
    if verbose:
        user, password = DEMO_ADMIN
        print(
            f"admin {user!r} created (password {password!r})"
            if admin_created
            else f"admin {user!r} already present"
        )
        print(
            f"demo catalog: {products_created} products created"
            if products_created
            else "demo catalog: already present"
        )
        print("demo coupon: created" if coupons_created else "demo coupon: already present")
    return {
        "admin_created": admin_created,
        "products_created": products_created,
        "coupons_created": coupons_created,
    }

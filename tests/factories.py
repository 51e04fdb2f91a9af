"""Test data straight into PostgreSQL (fast), for tests whose subject is not the catalog itself."""

from __future__ import annotations

import itertools

import asyncpg

_codes = itertools.count(1)


async def make_product(
    db: asyncpg.Connection,
    *,
    title: str = "无线蓝牙耳机",
    skus: list[tuple[int, int]] = ((9900, 100),),
    status: str = "on_shelf",
) -> tuple[int, list[int]]:
    """A product with SKUs given as (price_fen, stock); returns (product_id, [sku_id, …])."""
    category_id = await db.fetchval("select id from categories where parent_id is null order by id limit 1")
    if category_id is None:
        category_id = await db.fetchval("insert into categories (name) values ('数码') returning id")
    product_id = await db.fetchval(
        """insert into products (category_id, title, image_urls, status, min_price)
           values ($1, $2, array['https://img.example/p.jpg'], 'off_shelf', $3) returning id""",
        category_id,
        title,
        min(price for price, _ in skus),
    )
    sku_ids = []
    for i, (price, stock) in enumerate(skus):
        sku_ids.append(
            await db.fetchval(
                """insert into skus (product_id, code, specs, price, stock) values ($1, $2, $3, $4, $5)
                   returning id""",
                product_id,
                f"T{next(_codes)}",
                {"颜色": f"c{i}"},
                price,
                stock,
            )
        )
    await db.execute("update products set status = $2 where id = $1", product_id, status)
    return product_id, sku_ids


async def make_address(db: asyncpg.Connection, user_id: int) -> int:
    return await db.fetchval(
        """insert into addresses (user_id, receiver, phone, province, city, district, detail, is_default)
           values ($1, '张三', '13800138000', '广东省', '深圳市', '南山区', '科技园 1 号', true) returning id""",
        user_id,
    )


async def stock_of(db: asyncpg.Connection, sku_id: int) -> int:
    return await db.fetchval("select stock from skus where id = $1", sku_id)

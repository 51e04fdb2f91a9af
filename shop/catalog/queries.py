"""Catalog SQL and the data functions over it (each takes `conn`; callers own the transaction).

For the orders module:
- `fetch_skus_for_sale(conn, sku_ids, lock=False)` prices order lines from database rows.
- `adjust_stock(conn, sku_id, delta, reason, ref=...)` takes or returns stock with a ledger row.
- `record_sales(conn, sku_id, quantity)` counts units sold on the SKU and its product.
"""

from __future__ import annotations

from collections.abc import Sequence
from datetime import datetime

import asyncpg

# ---- categories ----


async def fetch_categories(conn: asyncpg.Connection, *, visible_only: bool) -> list[asyncpg.Record]:
    return await conn.fetch(
        """select id, parent_id, name, sort_order, is_visible from categories
           where is_visible or not $1 order by sort_order, id""",
        visible_only,
    )


async def lock_categories(conn: asyncpg.Connection, ids: Sequence[int]) -> dict[int, asyncpg.Record]:
    """Lock categories in id order (the fixed order keeps two moves from deadlocking)."""
    rows = await conn.fetch(
        """select id, parent_id, name, sort_order, is_visible from categories
           where id = any($1::bigint[]) order by id for update""",
        list(ids),
    )
    return {r["id"]: r for r in rows}


async def lock_category_shared(conn: asyncpg.Connection, category_id: int) -> asyncpg.Record | None:
    """Hold a parent still (no move, no delete) while a child is added under it."""
    return await conn.fetchrow("select id, parent_id from categories where id = $1 for share", category_id)


async def has_child_categories(conn: asyncpg.Connection, category_id: int) -> bool:
    return await conn.fetchval("select exists (select 1 from categories where parent_id = $1)", category_id)


async def insert_category(
    conn: asyncpg.Connection, *, parent_id: int | None, name: str, sort_order: int, is_visible: bool
) -> asyncpg.Record:
    return await conn.fetchrow(
        """insert into categories (parent_id, name, sort_order, is_visible) values ($1, $2, $3, $4)
           returning id, parent_id, name, sort_order, is_visible""",
        parent_id,
        name,
        sort_order,
        is_visible,
    )


async def update_category(
    conn: asyncpg.Connection,
    category_id: int,
    *,
    parent_id: int | None,
    name: str,
    sort_order: int,
    is_visible: bool,
) -> asyncpg.Record:
    return await conn.fetchrow(
        """update categories set parent_id = $2, name = $3, sort_order = $4, is_visible = $5, updated_at = now()
           where id = $1 returning id, parent_id, name, sort_order, is_visible""",
        category_id,
        parent_id,
        name,
        sort_order,
        is_visible,
    )


async def delete_category(conn: asyncpg.Connection, category_id: int) -> bool:
    """Foreign keys from child categories and products refuse the delete of a non-empty category."""
    return await conn.fetchval("delete from categories where id = $1 returning true", category_id) is not None


# ---- products ----

PRODUCT_COLUMNS = """p.id, p.category_id, p.title, p.subtitle, p.description, p.image_urls, p.status,
    p.sort_order, p.spec_names, p.sales, p.min_price, p.created_at, p.updated_at"""


async def insert_product(
    conn: asyncpg.Connection,
    *,
    category_id: int,
    title: str,
    subtitle: str,
    description: str,
    image_urls: list[str],
    sort_order: int,
) -> int:
    return await conn.fetchval(
        """insert into products (category_id, title, subtitle, description, image_urls, sort_order)
           values ($1, $2, $3, $4, $5, $6) returning id""",
        category_id,
        title,
        subtitle,
        description,
        image_urls,
        sort_order,
    )


async def fetch_product(conn: asyncpg.Connection, product_id: int) -> asyncpg.Record | None:
    return await conn.fetchrow(f"select {PRODUCT_COLUMNS} from products p where p.id = $1", product_id)


async def lock_product(conn: asyncpg.Connection, product_id: int) -> asyncpg.Record | None:
    """Every change to a product's SKUs, price or status locks the product row first."""
    return await conn.fetchrow(
        f"select {PRODUCT_COLUMNS} from products p where p.id = $1 for update", product_id
    )


async def update_product(
    conn: asyncpg.Connection,
    product_id: int,
    *,
    category_id: int,
    title: str,
    subtitle: str,
    description: str,
    image_urls: list[str],
    sort_order: int,
) -> None:
    await conn.execute(
        """update products set category_id = $2, title = $3, subtitle = $4, description = $5,
               image_urls = $6, sort_order = $7, updated_at = now()
           where id = $1""",
        product_id,
        category_id,
        title,
        subtitle,
        description,
        image_urls,
        sort_order,
    )


async def set_product_status(conn: asyncpg.Connection, product_id: int, status: str) -> None:
    await conn.execute(
        "update products set status = $2, updated_at = now() where id = $1 and status <> $2",
        product_id,
        status,
    )


async def refresh_min_price(conn: asyncpg.Connection, product_id: int) -> int | None:
    """Recompute the product's lowest active SKU price (what the price sorts use)."""
    return await conn.fetchval(
        """update products set min_price = (
               select min(price) from skus where product_id = $1 and is_active),
               updated_at = now()
           where id = $1 returning min_price""",
        product_id,
    )


async def add_spec_names(conn: asyncpg.Connection, product_id: int, names: Sequence[str]) -> None:
    """Append spec names the product has not used before, keeping the merchant's order."""
    await conn.execute(
        """update products set spec_names = spec_names || array(
               select name from unnest($2::text[]) with ordinality as u (name, i)
               where name <> all (spec_names) order by i)
           where id = $1 and not spec_names @> $2::text[]""",
        product_id,
        list(names),
    )


def _search_sql(query: str) -> str:
    """The index-backed keyword filter over `p`, the query text being `$<n>`.

    The GIN index narrows to products holding every bigram of the query; the strpos re-check
    then demands each query word really occurs (bigrams alone may be scattered).
    """
    return f"""p.search_grams @> catalog_query_grams({query})
        and not exists (
            select 1 from regexp_split_to_table(lower({query}), '\\s+') as word
            where word <> '' and strpos(lower(p.title || ' ' || p.subtitle), word) = 0)"""


_IN_CATEGORY = (
    "($1::bigint is null or p.category_id in (select id from categories where id = $1 or parent_id = $1))"
)

# Shopper sorts: (order by, keyset condition "after the cursor row", key column, key type).
# $2 is the cursor's sort key and $3 its product id; the first page passes sentinels that
# precede every row, so each sort needs just one statement and its index serves the keyset.
SHELF_SORTS: dict[str, tuple[str, str, str]] = {
    "default": (
        "p.sort_order, p.id desc",
        "(p.sort_order > $2::bigint or (p.sort_order = $2::bigint and p.id < $3))",
        "sort_order",
    ),
    "newest": ("p.created_at desc, p.id desc", "(p.created_at, p.id) < ($2::timestamptz, $3)", "created_at"),
    "sales": ("p.sales desc, p.id desc", "(p.sales, p.id) < ($2::bigint, $3)", "sales"),
    "price_asc": ("p.min_price, p.id", "(p.min_price, p.id) > ($2::bigint, $3)", "min_price"),
    "price_desc": ("p.min_price desc, p.id desc", "(p.min_price, p.id) < ($2::bigint, $3)", "min_price"),
}


def _shelf_sql(order_by: str, after: str, searching: bool) -> str:
    search = f"and {_search_sql('$5::text')}" if searching else ""
    return f"""select p.id, p.category_id, p.title, p.subtitle, coalesce(p.image_urls[1], '') as image_url,
               p.min_price, p.sales, p.sort_order, p.created_at
        from products p
        where p.status = 'on_shelf' and {_IN_CATEGORY} and {after} {search}
        order by {order_by} limit $4"""


# Built once from the constant fragments above: no request value ever becomes SQL text.
_SHELF_SQL = {
    (sort, searching): _shelf_sql(order_by, after, searching)
    for sort, (order_by, after, _key) in SHELF_SORTS.items()
    for searching in (False, True)
}


async def list_shelf_products(
    conn: asyncpg.Connection,
    *,
    sort: str,
    category_id: int | None,
    after_key: int | datetime,
    after_id: int,
    keyword: str | None,
    limit: int,
) -> list[asyncpg.Record]:
    args: list = [category_id, after_key, after_id, limit]
    if keyword is not None:
        args.append(keyword)
    return await conn.fetch(_SHELF_SQL[(sort, keyword is not None)], *args)


def _admin_list_sql(searching: bool) -> str:
    search = f"and {_search_sql('$5::text')}" if searching else ""
    return f"""select p.id, p.category_id, p.title, p.subtitle, coalesce(p.image_urls[1], '') as image_url,
               p.status, p.sort_order, p.sales, p.min_price, p.created_at, p.updated_at,
               k.stock, k.sku_count
        from products p
        cross join lateral (
            select coalesce(sum(s.stock), 0)::bigint as stock, count(*) as sku_count
            from skus s where s.product_id = p.id) k
        where {_IN_CATEGORY} and ($2::text is null or p.status = $2) and p.id < $3 {search}
        order by p.id desc limit $4"""


_ADMIN_LIST_SQL = {searching: _admin_list_sql(searching) for searching in (False, True)}


async def list_admin_products(
    conn: asyncpg.Connection,
    *,
    category_id: int | None,
    status: str | None,
    before_id: int,
    keyword: str | None,
    limit: int,
) -> list[asyncpg.Record]:
    args: list = [category_id, status, before_id, limit]
    if keyword is not None:
        args.append(keyword)
    return await conn.fetch(_ADMIN_LIST_SQL[keyword is not None], *args)


async def fetch_shelf_product(conn: asyncpg.Connection, product_id: int) -> asyncpg.Record | None:
    return await conn.fetchrow(
        f"select {PRODUCT_COLUMNS} from products p where p.id = $1 and p.status = 'on_shelf'", product_id
    )


# ---- SKUs ----

SKU_COLUMNS = """id, product_id, code, specs, price, original_price, stock, sales, is_active,
    created_at, updated_at"""


async def fetch_skus_of_product(
    conn: asyncpg.Connection, product_id: int, *, active_only: bool = False
) -> list[asyncpg.Record]:
    return await conn.fetch(
        f"select {SKU_COLUMNS} from skus where product_id = $1 and (is_active or not $2) order by id",
        product_id,
        active_only,
    )


async def fetch_sku(conn: asyncpg.Connection, sku_id: int) -> asyncpg.Record | None:
    return await conn.fetchrow(f"select {SKU_COLUMNS} from skus where id = $1", sku_id)


async def lock_sku(conn: asyncpg.Connection, sku_id: int) -> asyncpg.Record | None:
    return await conn.fetchrow(f"select {SKU_COLUMNS} from skus where id = $1 for update", sku_id)


async def insert_sku(
    conn: asyncpg.Connection,
    *,
    product_id: int,
    code: str,
    specs: dict[str, str],
    price: int,
    original_price: int | None,
    is_active: bool,
) -> int:
    """Insert with zero stock: initial stock goes in through `adjust_stock` so the ledger has it."""
    return await conn.fetchval(
        """insert into skus (product_id, code, specs, price, original_price, is_active)
           values ($1, $2, $3, $4, $5, $6) returning id""",
        product_id,
        code,
        specs,
        price,
        original_price,
        is_active,
    )


async def update_sku(
    conn: asyncpg.Connection,
    sku_id: int,
    *,
    code: str,
    specs: dict[str, str],
    price: int,
    original_price: int | None,
    is_active: bool,
) -> None:
    await conn.execute(
        """update skus set code = $2, specs = $3, price = $4, original_price = $5, is_active = $6,
               updated_at = now()
           where id = $1""",
        sku_id,
        code,
        specs,
        price,
        original_price,
        is_active,
    )


async def adjust_stock(
    conn: asyncpg.Connection,
    sku_id: int,
    delta: int,
    reason: str,
    *,
    admin_id: int | None = None,
    ref: str | None = None,
) -> asyncpg.Record | None:
    """Change stock by `delta` and write the ledger row, in one statement; None when it would go negative.

    The conditional UPDATE is the whole decision, so concurrent adjustments can never oversell.
    None also means "no such SKU": callers that need to tell the two apart look the SKU up after.
    """
    return await conn.fetchrow(
        """with changed as (
               update skus set stock = stock + $2, updated_at = now()
               where id = $1 and stock + $2 >= 0
               returning id, stock)
           insert into stock_ledger (sku_id, delta, reason, stock_after, admin_id, ref)
           select id, $2, $3, stock, $4, $5 from changed
           returning id, sku_id, delta, reason, stock_after, admin_id, ref, created_at""",
        sku_id,
        delta,
        reason,
        admin_id,
        ref,
    )


async def list_stock_ledger(
    conn: asyncpg.Connection, sku_id: int, *, before_id: int, limit: int
) -> list[asyncpg.Record]:
    return await conn.fetch(
        """select id, sku_id, delta, reason, stock_after, admin_id, ref, created_at from stock_ledger
           where sku_id = $1 and id < $2 order by id desc limit $3""",
        sku_id,
        before_id,
        limit,
    )


async def record_sales(conn: asyncpg.Connection, sku_id: int, quantity: int) -> None:
    """Count `quantity` units sold (negative for a refund) on the SKU and on its product."""
    await conn.execute(
        """with s as (update skus set sales = sales + $2 where id = $1 returning product_id)
           update products set sales = sales + $2 from s where products.id = s.product_id""",
        sku_id,
        quantity,
    )


_SALE_COLUMNS = """s.id as sku_id, s.code, s.specs, s.price, s.original_price, s.stock, s.is_active,
    p.id as product_id, p.title, p.status as product_status, p.category_id,
    coalesce(p.image_urls[1], '') as image_url"""


async def fetch_skus_for_sale(
    conn: asyncpg.Connection, sku_ids: Sequence[int], *, lock: bool = False
) -> list[asyncpg.Record]:
    """SKUs with their product, by id, ordered by SKU id: the rows an order line is priced from.

    Rows: sku_id, code, specs, price, original_price (fen), stock, is_active, product_id, title,
    product_status ('on_shelf'/'off_shelf'), category_id, image_url. Missing ids are simply
    absent. The caller decides what is sellable (`is_active and product_status == 'on_shelf'`).
    With `lock=True` (inside the caller's transaction) the SKU rows are locked FOR UPDATE in id
    order, the one fixed order every stock writer uses.
    """
    sql = f"""select {_SALE_COLUMNS} from skus s join products p on p.id = s.product_id
              where s.id = any($1::bigint[]) order by s.id"""
    if lock:
        sql += " for update of s"
    return await conn.fetch(sql, list(sku_ids))

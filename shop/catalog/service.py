"""Catalog service functions: each owns its transaction and turns constraint refusals into codes."""

from __future__ import annotations

from collections.abc import Iterable
from datetime import UTC, datetime

import asyncpg
from msgspec import UNSET

from shop.catalog import queries
from shop.catalog.schemas import (
    AdminCategory,
    AdminProduct,
    AdminProductPage,
    AdminProductSummary,
    AdminSku,
    CategoryCreate,
    CategoryUpdate,
    ProductCard,
    ProductCardPage,
    ProductCreate,
    ProductDetail,
    ProductUpdate,
    ShelfCategory,
    ShelfSku,
    SkuCreate,
    SkuUpdate,
    SpecOption,
    StockLedgerEntry,
    StockLedgerPage,
)
from shop.errors import Conflict, NotFound, ValidationFailed
from shop.pagination import BIGINT_MAX, BIGINT_MIN, decode_cursor, encode_cursor, invalid_cursor
from shop.pagination import cursor_bigint as _bigint

# Where each shopper sort's first page starts: a key before every real row.
_FIRST_PAGE_KEYS: dict[str, tuple[int | datetime, int]] = {
    "default": (BIGINT_MIN, BIGINT_MAX),
    "newest": (datetime.max.replace(tzinfo=UTC), BIGINT_MAX),
    "sales": (BIGINT_MAX, BIGINT_MAX),
    "price_asc": (0, 0),
    "price_desc": (BIGINT_MAX, BIGINT_MAX),
}


# ---- cursors ----


def _shelf_cursor(cursor: str | None, sort: str) -> tuple[int | datetime, int]:
    """A shopper list cursor is (sort, sort key, product id); one from another sort is refused."""
    parts = decode_cursor(cursor, 3)
    if parts is None:
        return _FIRST_PAGE_KEYS[sort]
    name, key, product_id = parts
    if name != sort:
        raise invalid_cursor()
    if sort == "newest":
        try:
            when = datetime.fromisoformat(key) if isinstance(key, str) else None
        except ValueError:
            when = None
        if when is None or when.tzinfo is None:
            raise invalid_cursor()
        return when, _bigint(product_id)
    return _bigint(key), _bigint(product_id)


def _id_cursor(cursor: str | None, kind: str) -> int:
    """Id-ordered lists (newest first): the cursor names its list and the last id seen."""
    parts = decode_cursor(cursor, 2)
    if parts is None:
        return BIGINT_MAX
    if parts[0] != kind:
        raise invalid_cursor()
    return _bigint(parts[1])


def _keyword(q: str | None) -> str | None:
    """A blank search is no search (it would match everything through an empty gram set)."""
    if q is None or not q.strip():
        return None
    return q.strip()


# ---- categories ----


def _tree(rows: Iterable[asyncpg.Record], node: type) -> list:
    """Nest the (already sorted) rows two levels deep; children of a missing parent are dropped."""
    fields = node.__struct_fields__
    nodes = {r["id"]: node(**{k: r[k] for k in fields if k != "children"}) for r in rows}
    roots = []
    for n in nodes.values():
        if n.parent_id is None:
            roots.append(n)
        elif n.parent_id in nodes:
            nodes[n.parent_id].children.append(n)
    return roots


async def list_category_tree(conn: asyncpg.Connection) -> list[AdminCategory]:
    return _tree(await queries.fetch_categories(conn, visible_only=False), AdminCategory)


async def list_shelf_categories(conn: asyncpg.Connection) -> list[ShelfCategory]:
    """Visible categories; a hidden top-level category hides its children too."""
    return _tree(await queries.fetch_categories(conn, visible_only=True), ShelfCategory)


def _category(row: asyncpg.Record) -> AdminCategory:
    return AdminCategory(
        id=row["id"],
        parent_id=row["parent_id"],
        name=row["name"],
        sort_order=row["sort_order"],
        is_visible=row["is_visible"],
    )


def _too_deep() -> Conflict:
    return Conflict(
        "Categories are two levels deep: a sub-category cannot have children",
        code="catalog.category_too_deep",
    )


async def create_category(conn: asyncpg.Connection, data: CategoryCreate) -> AdminCategory:
    async with conn.transaction():
        if data.parent_id is not None:
            parent = await queries.lock_category_shared(conn, data.parent_id)
            if parent is None:
                raise ValidationFailed("No such parent category", code="catalog.parent_not_found")
            if parent["parent_id"] is not None:
                raise _too_deep()
        row = await queries.insert_category(
            conn,
            parent_id=data.parent_id,
            name=data.name.strip(),
            sort_order=data.sort_order,
            is_visible=data.is_visible,
        )
    return _category(row)


async def update_category(conn: asyncpg.Connection, category_id: int, data: CategoryUpdate) -> AdminCategory:
    async with conn.transaction():
        new_parent = data.parent_id if data.parent_id is not UNSET else None
        ids = [category_id] if new_parent is None else [category_id, new_parent]
        locked = await queries.lock_categories(conn, ids)
        current = locked.get(category_id)
        if current is None:
            raise NotFound("No such category", code="catalog.category_not_found")
        parent_id = current["parent_id"] if data.parent_id is UNSET else data.parent_id
        if parent_id is not None and parent_id != current["parent_id"]:
            if parent_id == category_id:
                raise ValidationFailed("A category cannot be its own parent", code="catalog.parent_invalid")
            parent = locked.get(parent_id)
            if parent is None:
                raise ValidationFailed("No such parent category", code="catalog.parent_not_found")
            # Both rows are locked, and adding a child takes a share lock on its parent, so
            # neither check below can be invalidated before this transaction commits.
            if parent["parent_id"] is not None or await queries.has_child_categories(conn, category_id):
                raise _too_deep()
        row = await queries.update_category(
            conn,
            category_id,
            parent_id=parent_id,
            name=current["name"] if data.name is UNSET else data.name.strip(),
            sort_order=current["sort_order"] if data.sort_order is UNSET else data.sort_order,
            is_visible=current["is_visible"] if data.is_visible is UNSET else data.is_visible,
        )
    return _category(row)


async def delete_category(conn: asyncpg.Connection, category_id: int) -> None:
    try:
        async with conn.transaction():
            deleted = await queries.delete_category(conn, category_id)
    except asyncpg.ForeignKeyViolationError as exc:
        raise Conflict(
            "The category still has sub-categories or products", code="catalog.category_not_empty"
        ) from exc
    if not deleted:
        raise NotFound("No such category", code="catalog.category_not_found")


# ---- products and SKUs (merchant) ----


def _sku(row: asyncpg.Record) -> AdminSku:
    return AdminSku(**{k: row[k] for k in AdminSku.__struct_fields__})


def _check_prices(price: int, original_price: int | None) -> None:
    if original_price is not None and original_price < price:
        raise ValidationFailed(
            "original_price must not be below price",
            code="validation_failed",
            details=[{"field": "original_price", "message": "must be >= price"}],
        )


def _catalog_conflict(exc: asyncpg.IntegrityConstraintViolationError) -> Exception:
    """The unique and foreign keys behind the catalog's refusals, as domain errors."""
    constraint = getattr(exc, "constraint_name", None)
    if constraint == "skus_code_key":
        return Conflict("This SKU code is already used", code="catalog.sku_code_taken")
    if constraint == "skus_product_specs_key":
        return Conflict("Another SKU of this product has the same specs", code="catalog.sku_specs_taken")
    if constraint == "products_on_shelf_has_price":
        return Conflict("Unshelve the product before deactivating its last active SKU", code="catalog.no_sku")
    if constraint == "products_category_id_fkey":
        return ValidationFailed("No such category", code="catalog.category_not_found")
    return exc


async def _add_sku(conn: asyncpg.Connection, product_id: int, data: SkuCreate, admin_id: int | None) -> int:
    _check_prices(data.price, data.original_price)
    sku_id = await queries.insert_sku(
        conn,
        product_id=product_id,
        code=data.code,
        specs=data.specs,
        price=data.price,
        original_price=data.original_price,
        is_active=data.is_active,
    )
    await queries.add_spec_names(conn, product_id, list(data.specs))
    if data.stock > 0:
        await queries.adjust_stock(conn, sku_id, data.stock, "initial", admin_id=admin_id)
    return sku_id


async def get_admin_product(conn: asyncpg.Connection, product_id: int) -> AdminProduct:
    row = await queries.fetch_product(conn, product_id)
    if row is None:
        raise NotFound("No such product", code="catalog.product_not_found")
    skus = await queries.fetch_skus_of_product(conn, product_id)
    return AdminProduct(
        **{k: row[k] for k in AdminProduct.__struct_fields__ if k != "skus"}, skus=[_sku(s) for s in skus]
    )


async def create_product(conn: asyncpg.Connection, data: ProductCreate, admin_id: int | None) -> AdminProduct:
    """A new product starts off the shelf; its SKUs (if given) and their stock come in with it."""
    try:
        async with conn.transaction():
            product_id = await queries.insert_product(
                conn,
                category_id=data.category_id,
                title=data.title.strip(),
                subtitle=data.subtitle.strip(),
                description=data.description,
                image_urls=data.image_urls,
                sort_order=data.sort_order,
            )
            for sku in data.skus:
                await _add_sku(conn, product_id, sku, admin_id)
            await queries.refresh_min_price(conn, product_id)
    except asyncpg.IntegrityConstraintViolationError as exc:
        raise _catalog_conflict(exc) from exc
    return await get_admin_product(conn, product_id)


async def update_product(conn: asyncpg.Connection, product_id: int, data: ProductUpdate) -> AdminProduct:
    try:
        async with conn.transaction():
            current = await queries.lock_product(conn, product_id)
            if current is None:
                raise NotFound("No such product", code="catalog.product_not_found")
            merged = {
                field: current[field] if getattr(data, field) is UNSET else getattr(data, field)
                for field in ProductUpdate.__struct_fields__
            }
            merged["title"] = merged["title"].strip()
            merged["subtitle"] = merged["subtitle"].strip()
            await queries.update_product(conn, product_id, **merged)
    except asyncpg.IntegrityConstraintViolationError as exc:
        raise _catalog_conflict(exc) from exc
    return await get_admin_product(conn, product_id)


async def shelve_product(conn: asyncpg.Connection, product_id: int) -> AdminProduct:
    async with conn.transaction():
        product = await queries.lock_product(conn, product_id)
        if product is None:
            raise NotFound("No such product", code="catalog.product_not_found")
        # min_price is null exactly when no SKU is active; SKU changes hold the same row lock.
        if product["min_price"] is None:
            raise Conflict("A product needs an active SKU to go on the shelf", code="catalog.no_sku")
        await queries.set_product_status(conn, product_id, "on_shelf")
    return await get_admin_product(conn, product_id)


async def unshelve_product(conn: asyncpg.Connection, product_id: int) -> AdminProduct:
    async with conn.transaction():
        if await queries.lock_product(conn, product_id) is None:
            raise NotFound("No such product", code="catalog.product_not_found")
        await queries.set_product_status(conn, product_id, "off_shelf")
    return await get_admin_product(conn, product_id)


async def list_admin_products(
    conn: asyncpg.Connection,
    *,
    status: str | None,
    category_id: int | None,
    q: str | None,
    cursor: str | None,
    limit: int,
) -> AdminProductPage:
    rows = await queries.list_admin_products(
        conn,
        category_id=category_id,
        status=status,
        before_id=_id_cursor(cursor, "admin_products"),
        keyword=_keyword(q),
        limit=limit + 1,
    )
    items = [
        AdminProductSummary(**{k: r[k] for k in AdminProductSummary.__struct_fields__}) for r in rows[:limit]
    ]
    next_cursor = encode_cursor("admin_products", items[-1].id) if len(rows) > limit else None
    return AdminProductPage(items=items, next_cursor=next_cursor)


async def list_skus(conn: asyncpg.Connection, product_id: int) -> list[AdminSku]:
    if await queries.fetch_product(conn, product_id) is None:
        raise NotFound("No such product", code="catalog.product_not_found")
    return [_sku(r) for r in await queries.fetch_skus_of_product(conn, product_id)]


async def create_sku(
    conn: asyncpg.Connection, product_id: int, data: SkuCreate, admin_id: int | None
) -> AdminSku:
    try:
        async with conn.transaction():
            if await queries.lock_product(conn, product_id) is None:
                raise NotFound("No such product", code="catalog.product_not_found")
            sku_id = await _add_sku(conn, product_id, data, admin_id)
            await queries.refresh_min_price(conn, product_id)
    except asyncpg.IntegrityConstraintViolationError as exc:
        raise _catalog_conflict(exc) from exc
    return _sku(await queries.fetch_sku(conn, sku_id))


async def update_sku(conn: asyncpg.Connection, sku_id: int, data: SkuUpdate) -> AdminSku:
    """Change a SKU's code, specs, prices or activity; never its stock."""
    found = await queries.fetch_sku(conn, sku_id)
    if found is None:
        raise NotFound("No such SKU", code="catalog.sku_not_found")
    try:
        async with conn.transaction():
            # The SKU row first, then the product: the order checkout, cancel and every stock writer
            # take them in (stock, then the product's sales), so an edit never deadlocks with them.
            current = await queries.lock_sku(conn, sku_id)
            await queries.lock_product(conn, found["product_id"])
            merged = {
                field: current[field] if getattr(data, field) is UNSET else getattr(data, field)
                for field in SkuUpdate.__struct_fields__
            }
            _check_prices(merged["price"], merged["original_price"])
            await queries.update_sku(conn, sku_id, **merged)
            await queries.add_spec_names(conn, found["product_id"], list(merged["specs"]))
            # An on-shelf product left without an active SKU fails products_on_shelf_has_price.
            await queries.refresh_min_price(conn, found["product_id"])
    except asyncpg.IntegrityConstraintViolationError as exc:
        raise _catalog_conflict(exc) from exc
    return _sku(await queries.fetch_sku(conn, sku_id))


async def adjust_sku_stock(
    conn: asyncpg.Connection, sku_id: int, delta: int, reason: str, admin_id: int | None
) -> StockLedgerEntry:
    if delta == 0:
        raise ValidationFailed(
            "delta must not be zero",
            details=[{"field": "delta", "message": "must not be zero"}],
        )
    try:
        async with conn.transaction():
            entry = await queries.adjust_stock(conn, sku_id, delta, reason.strip(), admin_id=admin_id)
    except asyncpg.NumericValueOutOfRangeError as exc:
        raise Conflict(
            "Stock would exceed the largest storable amount", code="catalog.stock_overflow"
        ) from exc
    if entry is None:
        # The UPDATE refused; this read only picks the message.
        if await queries.fetch_sku(conn, sku_id) is None:
            raise NotFound("No such SKU", code="catalog.sku_not_found")
        raise Conflict("Not enough stock for this adjustment", code="catalog.insufficient_stock")
    return StockLedgerEntry(**dict(entry))


async def list_stock_ledger(
    conn: asyncpg.Connection, sku_id: int, *, cursor: str | None, limit: int
) -> StockLedgerPage:
    before_id = _id_cursor(cursor, "stock_ledger")
    if await queries.fetch_sku(conn, sku_id) is None:
        raise NotFound("No such SKU", code="catalog.sku_not_found")
    rows = await queries.list_stock_ledger(conn, sku_id, before_id=before_id, limit=limit + 1)
    items = [StockLedgerEntry(**dict(r)) for r in rows[:limit]]
    next_cursor = encode_cursor("stock_ledger", items[-1].id) if len(rows) > limit else None
    return StockLedgerPage(items=items, next_cursor=next_cursor)


# ---- shopper views ----


async def list_shelf_products(
    conn: asyncpg.Connection,
    *,
    category_id: int | None,
    sort: str,
    q: str | None,
    cursor: str | None,
    limit: int,
) -> ProductCardPage:
    """On-shelf products, a top-level category including its sub-categories, in a stable keyset order."""
    after_key, after_id = _shelf_cursor(cursor, sort)
    rows = await queries.list_shelf_products(
        conn,
        sort=sort,
        category_id=category_id,
        after_key=after_key,
        after_id=after_id,
        keyword=_keyword(q),
        limit=limit + 1,
    )
    items = [ProductCard(**{k: r[k] for k in ProductCard.__struct_fields__}) for r in rows[:limit]]
    next_cursor = None
    if len(rows) > limit:
        last = rows[limit - 1]
        key = last[queries.SHELF_SORTS[sort][2]]
        next_cursor = encode_cursor(sort, key.isoformat() if isinstance(key, datetime) else key, last["id"])
    return ProductCardPage(items=items, next_cursor=next_cursor)


def _spec_options(spec_names: list[str], skus: Iterable[asyncpg.Record]) -> list[SpecOption]:
    """Each spec name (in the merchant's order) with its values in the order SKUs show them."""
    options: dict[str, list[str]] = {name: [] for name in spec_names}
    for sku in skus:
        for name, value in sku["specs"].items():
            values = options.setdefault(name, [])
            if value not in values:
                values.append(value)
    return [SpecOption(name=name, values=values) for name, values in options.items() if values]


async def get_shelf_product(conn: asyncpg.Connection, product_id: int) -> ProductDetail:
    """An on-shelf product with its active SKUs; an off-shelf one does not exist for shoppers."""
    row = await queries.fetch_shelf_product(conn, product_id)
    if row is None:
        raise NotFound("No such product", code="catalog.product_not_found")
    skus = await queries.fetch_skus_of_product(conn, product_id, active_only=True)
    return ProductDetail(
        **{k: row[k] for k in ("id", "category_id", "title", "subtitle", "description", "image_urls")},
        min_price=row["min_price"],
        sales=row["sales"],
        spec_options=_spec_options(row["spec_names"], skus),
        skus=[ShelfSku(**{k: s[k] for k in ShelfSku.__struct_fields__}) for s in skus],
    )

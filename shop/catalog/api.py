"""Catalog routes: the merchant's categories, products, SKUs and stock; the shopper's shelf."""

from __future__ import annotations

from typing import Annotated

import asyncpg
from litestar import Controller, delete, get, patch, post
from litestar.params import Parameter

from shop.auth_tokens import AuthAdmin, admin_guard
from shop.catalog import service
from shop.catalog.schemas import (
    AdminCategory,
    AdminProduct,
    AdminProductPage,
    AdminSku,
    CategoryCreate,
    CategoryUpdate,
    ProductCardPage,
    ProductCreate,
    ProductDetail,
    ProductStatus,
    ProductUpdate,
    ShelfCategory,
    ShelfSort,
    SkuCreate,
    SkuUpdate,
    StockAdjustment,
    StockLedgerEntry,
    StockLedgerPage,
)
from shop.pagination import DEFAULT_LIMIT, IdFilter, Limit

Keyword = Annotated[str | None, Parameter(max_length=50)]


class AdminCategoryController(Controller):
    path = "/api/v1/admin/categories"
    guards = [admin_guard]
    tags = ["admin: catalog"]

    @get("/")
    async def list_categories(self, conn: asyncpg.Connection) -> list[AdminCategory]:
        """The whole category tree, hidden categories included."""
        return await service.list_category_tree(conn)

    @post("/")
    async def create_category(self, conn: asyncpg.Connection, data: CategoryCreate) -> AdminCategory:
        """A top-level category, or a sub-category of a top-level one."""
        return await service.create_category(conn, data)

    @patch("/{category_id:int}")
    async def update_category(
        self, conn: asyncpg.Connection, category_id: int, data: CategoryUpdate
    ) -> AdminCategory:
        """Rename, reorder, hide, or move a category (two levels at most)."""
        return await service.update_category(conn, category_id, data)

    @delete("/{category_id:int}")
    async def delete_category(self, conn: asyncpg.Connection, category_id: int) -> None:
        """Delete an empty category: no sub-categories and no products."""
        await service.delete_category(conn, category_id)


class AdminProductController(Controller):
    path = "/api/v1/admin/products"
    guards = [admin_guard]
    tags = ["admin: catalog"]

    @get("/")
    async def list_products(
        self,
        conn: asyncpg.Connection,
        status: ProductStatus | None = None,
        category_id: IdFilter = None,
        q: Keyword = None,
        cursor: str | None = None,
        limit: Limit = DEFAULT_LIMIT,
    ) -> AdminProductPage:
        """Products in every status, newest first, filtered by status, category and keyword."""
        return await service.list_admin_products(
            conn, status=status, category_id=category_id, q=q, cursor=cursor, limit=limit
        )

    @post("/")
    async def create_product(
        self, conn: asyncpg.Connection, admin: AuthAdmin, data: ProductCreate
    ) -> AdminProduct:
        """A new product, off the shelf, optionally with its SKUs."""
        return await service.create_product(conn, data, admin.id)

    @get("/{product_id:int}")
    async def get_product(self, conn: asyncpg.Connection, product_id: int) -> AdminProduct:
        return await service.get_admin_product(conn, product_id)

    @patch("/{product_id:int}")
    async def update_product(
        self, conn: asyncpg.Connection, product_id: int, data: ProductUpdate
    ) -> AdminProduct:
        return await service.update_product(conn, product_id, data)

    @post("/{product_id:int}/shelve", status_code=200)
    async def shelve_product(self, conn: asyncpg.Connection, product_id: int) -> AdminProduct:
        """Put the product on sale (it needs an active SKU)."""
        return await service.shelve_product(conn, product_id)

    @post("/{product_id:int}/unshelve", status_code=200)
    async def unshelve_product(self, conn: asyncpg.Connection, product_id: int) -> AdminProduct:
        """Take the product off sale: shoppers no longer see it."""
        return await service.unshelve_product(conn, product_id)

    @get("/{product_id:int}/skus")
    async def list_skus(self, conn: asyncpg.Connection, product_id: int) -> list[AdminSku]:
        return await service.list_skus(conn, product_id)

    @post("/{product_id:int}/skus")
    async def create_sku(
        self, conn: asyncpg.Connection, admin: AuthAdmin, product_id: int, data: SkuCreate
    ) -> AdminSku:
        """A new SKU; its initial stock is written to the stock ledger."""
        return await service.create_sku(conn, product_id, data, admin.id)


class AdminSkuController(Controller):
    path = "/api/v1/admin/skus"
    guards = [admin_guard]
    tags = ["admin: catalog"]

    @patch("/{sku_id:int}")
    async def update_sku(self, conn: asyncpg.Connection, sku_id: int, data: SkuUpdate) -> AdminSku:
        """Code, specs, prices, activity; stock changes only through stock adjustments."""
        return await service.update_sku(conn, sku_id, data)

    @post("/{sku_id:int}/stock-adjustments")
    async def adjust_stock(
        self, conn: asyncpg.Connection, admin: AuthAdmin, sku_id: int, data: StockAdjustment
    ) -> StockLedgerEntry:
        """Add or remove stock with a reason; refused (409) if stock would go below zero."""
        return await service.adjust_sku_stock(conn, sku_id, data.delta, data.reason, admin.id)

    @get("/{sku_id:int}/stock-adjustments")
    async def list_stock_adjustments(
        self,
        conn: asyncpg.Connection,
        sku_id: int,
        cursor: str | None = None,
        limit: Limit = DEFAULT_LIMIT,
    ) -> StockLedgerPage:
        """The SKU's stock ledger, newest first."""
        return await service.list_stock_ledger(conn, sku_id, cursor=cursor, limit=limit)


class ShelfController(Controller):
    path = "/api/v1"
    tags = ["catalog"]

    @get("/categories")
    async def list_categories(self, conn: asyncpg.Connection) -> list[ShelfCategory]:
        """The visible category tree."""
        return await service.list_shelf_categories(conn)

    @get("/products")
    async def list_products(
        self,
        conn: asyncpg.Connection,
        category_id: IdFilter = None,
        sort: ShelfSort = "default",
        q: Keyword = None,
        cursor: str | None = None,
        limit: Limit = DEFAULT_LIMIT,
    ) -> ProductCardPage:
        """On-shelf products; a top-level category includes its sub-categories' products."""
        return await service.list_shelf_products(
            conn, category_id=category_id, sort=sort, q=q, cursor=cursor, limit=limit
        )

    @get("/products/{product_id:int}")
    async def get_product(self, conn: asyncpg.Connection, product_id: int) -> ProductDetail:
        """An on-shelf product with its active SKUs, prices and remaining stock."""
        return await service.get_shelf_product(conn, product_id)


ROUTES = [AdminCategoryController, AdminProductController, AdminSkuController, ShelfController]

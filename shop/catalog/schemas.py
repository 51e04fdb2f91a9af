"""Catalog request and response Structs: categories, products, SKUs, stock ledger."""

from __future__ import annotations

from datetime import datetime
from typing import Annotated, Literal

import msgspec
from msgspec import UNSET, Meta, UnsetType

from shop.schemas import Schema

# Printable text with at least one non-space character (`\Z`: `$` would allow a trailing newline).
TEXT = r"^[^\x00-\x1f\x7f]*[^\s\x00-\x1f\x7f][^\x00-\x1f\x7f]*\Z"
Fen = Annotated[int, Meta(gt=0, le=10_000_000_00, description="amount in fen (1/100 yuan)")]
Name = Annotated[str, Meta(min_length=1, max_length=32, pattern=TEXT)]
Title = Annotated[str, Meta(min_length=1, max_length=120, pattern=TEXT)]
Subtitle = Annotated[str, Meta(max_length=200, pattern=r"^[^\x00-\x1f\x7f]*\Z")]
Description = Annotated[str, Meta(max_length=20000)]
ImageUrl = Annotated[str, Meta(pattern=r"^https://[^\s\x00-\x1f\x7f]{1,1000}\Z", max_length=1008)]
ImageUrls = Annotated[list[ImageUrl], Meta(max_length=20)]
SortOrder = Annotated[int, Meta(ge=-1_000_000, le=1_000_000, description="smaller comes first")]
SkuCode = Annotated[str, Meta(pattern=r"^[A-Za-z0-9_.-]{1,64}\Z")]
SpecName = Annotated[str, Meta(min_length=1, max_length=20, pattern=TEXT)]
SpecValue = Annotated[str, Meta(min_length=1, max_length=40, pattern=TEXT)]
Specs = Annotated[
    dict[SpecName, SpecValue],
    Meta(max_length=5, description='spec values, e.g. {"color": "红色", "size": "M"}'),
]
Stock = Annotated[int, Meta(ge=0, le=10_000_000)]
ProductStatus = Literal["on_shelf", "off_shelf"]
ShelfSort = Literal["default", "newest", "sales", "price_asc", "price_desc"]


# ---- categories ----


class CategoryCreate(Schema):
    name: Name
    parent_id: int | None = None
    sort_order: SortOrder = 0
    is_visible: bool = True


class CategoryUpdate(Schema):
    name: Name | UnsetType = UNSET
    parent_id: int | UnsetType | None = UNSET
    sort_order: SortOrder | UnsetType = UNSET
    is_visible: bool | UnsetType = UNSET


class AdminCategory(Schema):
    id: int
    parent_id: int | None
    name: str
    sort_order: int
    is_visible: bool
    children: list[AdminCategory] = msgspec.field(default_factory=list)


class ShelfCategory(Schema):
    id: int
    parent_id: int | None
    name: str
    children: list[ShelfCategory] = msgspec.field(default_factory=list)


# ---- SKUs and stock ----


class SkuCreate(Schema):
    code: SkuCode
    price: Fen
    specs: Specs = msgspec.field(default_factory=dict)
    original_price: Fen | None = None
    stock: Stock = 0
    is_active: bool = True


class SkuUpdate(Schema):
    """Stock is not here on purpose: it changes only through stock adjustments."""

    code: SkuCode | UnsetType = UNSET
    specs: Specs | UnsetType = UNSET
    price: Fen | UnsetType = UNSET
    original_price: Fen | UnsetType | None = UNSET
    is_active: bool | UnsetType = UNSET


class AdminSku(Schema):
    id: int
    product_id: int
    code: str
    specs: dict[str, str]
    price: int
    original_price: int | None
    stock: int
    sales: int
    is_active: bool
    created_at: datetime
    updated_at: datetime


class StockAdjustment(Schema):
    delta: Annotated[int, Meta(ge=-1_000_000, le=1_000_000, description="non-zero change of stock")]
    reason: Annotated[str, Meta(min_length=1, max_length=200, pattern=TEXT)]


class StockLedgerEntry(Schema):
    id: int
    sku_id: int
    delta: int
    reason: str
    stock_after: int
    admin_id: int | None
    ref: str | None
    created_at: datetime


class StockLedgerPage(Schema):
    items: list[StockLedgerEntry]
    next_cursor: str | None = None


# ---- products ----


class ProductCreate(Schema):
    category_id: int
    title: Title
    subtitle: Subtitle = ""
    description: Description = ""
    image_urls: ImageUrls = msgspec.field(default_factory=list)
    sort_order: SortOrder = 0
    skus: Annotated[list[SkuCreate], Meta(max_length=100)] = msgspec.field(default_factory=list)


class ProductUpdate(Schema):
    """Status is not here: shelve and unshelve have their own endpoints."""

    category_id: int | UnsetType = UNSET
    title: Title | UnsetType = UNSET
    subtitle: Subtitle | UnsetType = UNSET
    description: Description | UnsetType = UNSET
    image_urls: ImageUrls | UnsetType = UNSET
    sort_order: SortOrder | UnsetType = UNSET


class AdminProduct(Schema):
    id: int
    category_id: int
    title: str
    subtitle: str
    description: str
    image_urls: list[str]
    status: ProductStatus
    sort_order: int
    spec_names: list[str]
    sales: int
    min_price: int | None
    created_at: datetime
    updated_at: datetime
    skus: list[AdminSku]


class AdminProductSummary(Schema):
    id: int
    category_id: int
    title: str
    subtitle: str
    image_url: str
    status: ProductStatus
    sort_order: int
    sales: int
    min_price: int | None
    stock: int
    sku_count: int
    created_at: datetime
    updated_at: datetime


class AdminProductPage(Schema):
    items: list[AdminProductSummary]
    next_cursor: str | None = None


# ---- shopper views ----


class ProductCard(Schema):
    id: int
    category_id: int
    title: str
    subtitle: str
    image_url: str
    min_price: int
    sales: int


class ProductCardPage(Schema):
    items: list[ProductCard]
    next_cursor: str | None = None


class ShelfSku(Schema):
    id: int
    specs: dict[str, str]
    price: int
    original_price: int | None
    stock: int


class SpecOption(Schema):
    name: str
    values: list[str]


class ProductDetail(Schema):
    id: int
    category_id: int
    title: str
    subtitle: str
    description: str
    image_urls: list[str]
    min_price: int
    sales: int
    spec_options: list[SpecOption]
    skus: list[ShelfSku]

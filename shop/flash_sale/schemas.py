"""Request and response shapes of flash sales: the merchant's events, the shopper's list and purchase."""

from __future__ import annotations

from datetime import datetime
from typing import Annotated, Literal

import msgspec

from shop.orders.schemas import Id
from shop.schemas import Schema

FlashStatus = Literal["draft", "published", "stopped", "settled"]
# What a shopper sees: before the start, inside the window, or over.
Phase = Literal["upcoming", "live", "ended"]

Fen = Annotated[int, msgspec.Meta(ge=1, le=100_000_000)]


class FlashItemIn(Schema):
    sku_id: Id
    flash_price: Fen
    quota: Annotated[int, msgspec.Meta(ge=1, le=1_000_000)]
    per_user_limit: Annotated[int, msgspec.Meta(ge=1, le=999)] = 1


class FlashSaleIn(Schema):
    """Everything a merchant sets on an event; an edit (PUT) sends the whole form again."""

    name: Annotated[str, msgspec.Meta(min_length=1, max_length=64)]
    starts_at: datetime
    ends_at: datetime
    items: Annotated[list[FlashItemIn], msgspec.Meta(min_length=1, max_length=50)]
    live_stream: Annotated[str, msgspec.Meta(max_length=128)] = ""
    pay_deadline_minutes: Annotated[int, msgspec.Meta(ge=1, le=1440)] = 5
    # Purchase attempts per second, per shopper and per client IP.
    user_rate_limit: Annotated[int, msgspec.Meta(ge=1, le=100_000)] = 5
    ip_rate_limit: Annotated[int, msgspec.Meta(ge=1, le=10_000_000)] = 200


class FlashItemOut(Schema):
    id: int
    sku_id: int
    product_id: int
    title: str
    image_url: str
    original_price: int
    flash_price: int
    quota: int
    per_user_limit: int
    # Live figures from Redis (None when Redis does not hold the event: draft, or being restored).
    remaining: int | None = None


class FlashSaleOut(Schema):
    id: int
    name: str
    live_stream: str
    starts_at: datetime
    ends_at: datetime
    pay_deadline_minutes: int
    user_rate_limit: int
    ip_rate_limit: int
    status: FlashStatus
    published_at: datetime | None
    stopped_at: datetime | None
    settled_at: datetime | None
    created_at: datetime
    items: list[FlashItemOut] = []


class FlashSalePage(Schema):
    items: list[FlashSaleOut]
    next_cursor: str | None = None


class ShopperItemOut(Schema):
    id: int
    sku_id: int
    product_id: int
    title: str
    image_url: str
    original_price: int
    flash_price: int
    per_user_limit: int
    quota: int
    remaining: int | None


class ShopperFlashSaleOut(Schema):
    id: int
    name: str
    live_stream: str
    starts_at: datetime
    ends_at: datetime
    phase: Phase
    items: list[ShopperItemOut]


class ShopperFlashSales(Schema):
    items: list[ShopperFlashSaleOut]


class FlashTokenOut(Schema):
    token: str
    expires_at: datetime


class FlashBuyIn(Schema):
    qty: Annotated[int, msgspec.Meta(ge=1, le=999)]
    address_id: Id
    # The event's purchase token (GET …/token), issued only once the sale is live.
    token: Annotated[str, msgspec.Meta(min_length=1, max_length=200)]


class FlashItemStats(Schema):
    item_id: int
    sku_id: int
    quota: int
    sold: int  # units in orders not given back (PostgreSQL)
    remaining: int | None  # what Redis may still sell
    paid_units: int
    returned_to_stock: int | None


class FlashSaleStats(Schema):
    flash_sale_id: int
    status: FlashStatus
    sold: int
    remaining: int | None
    orders: int
    paid_orders: int
    gmv: int  # paid amount of paid (and later) orders, fen
    buyers: int
    items: list[FlashItemStats]

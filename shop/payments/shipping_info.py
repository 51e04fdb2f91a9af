"""Report shipments of WeChat Pay orders to WeChat (发货信息录入), which holds the merchant's funds until then.

An `order.shipped` handler on the order-events outbox: a failed upload raises, so the outbox
retries the event with backoff; other providers' orders are left alone.
"""

from __future__ import annotations

import logging
from typing import Any

import asyncpg

from shop.events import OrderEvent, on_order_event
from shop.wechat_mp import MiniProgramClient

log = logging.getLogger("shop.payments.shipping_info")

# Carrier names as merchants type them -> WeChat's delivery_id; anything else is passed as typed.
DELIVERY_IDS = {
    "顺丰速运": "SF",
    "顺丰": "SF",
    "中通快递": "ZTO",
    "中通": "ZTO",
    "圆通速递": "YTO",
    "圆通": "YTO",
    "韵达快递": "YD",
    "韵达": "YD",
    "申通快递": "STO",
    "申通": "STO",
    "京东物流": "JD",
    "京东快递": "JD",
    "EMS": "EMS",
    "中国邮政EMS": "EMS",
    "极兔速递": "JTSD",
    "极兔": "JTSD",
}
ITEM_DESC_MAX = 120  # WeChat's limit on item_desc
MAX_PACKAGES = 10  # WeChat takes at most 10 parcels in one split upload


def express_company(carrier: str) -> str:
    name = carrier.strip()
    return DELIVERY_IDS.get(name, DELIVERY_IDS.get(name.upper(), name))


def item_desc(titles: list[tuple[str, int]]) -> str:
    """'标题 ×2；标题2' cut to WeChat's 120 characters."""
    text = "；".join(f"{title} ×{qty}" if qty > 1 else title for title, qty in titles)
    return text if len(text) <= ITEM_DESC_MAX else text[: ITEM_DESC_MAX - 1] + "…"


async def shipping_upload(conn: asyncpg.Connection, order_id: int) -> dict[str, Any] | None:
    """What upload_shipping_info needs for a WeChat Pay order; None for other orders."""
    paid = await conn.fetchrow(
        """select p.transaction_id, p.payer_openid from orders o
           join payments p on p.order_id = o.id and p.provider = 'wechatpay' and p.status = 'paid'
           where o.id = $1 and o.payment_provider = 'wechatpay'
           order by p.paid_at limit 1""",
        order_id,
    )
    if paid is None:
        return None
    lines = await conn.fetch(
        "select id, title, qty from order_lines where order_id = $1 order by id", order_id
    )
    shipments = await conn.fetch(
        "select carrier, tracking_no, line_ids from shipments where order_id = $1 order by id", order_id
    )
    if len(shipments) > MAX_PACKAGES:
        log.warning(
            "order has more parcels than WeChat takes; uploading the first %s",
            MAX_PACKAGES,
            extra={"fields": {"order_id": order_id, "parcels": len(shipments)}},
        )
    packages = []
    for shipment in shipments[:MAX_PACKAGES]:
        # A package without line ids carries the whole order.
        chosen = [ln for ln in lines if ln["id"] in shipment["line_ids"]] or list(lines)
        packages.append(
            {
                "express_company": express_company(shipment["carrier"]),
                "tracking_no": shipment["tracking_no"],
                "item_desc": item_desc([(ln["title"], ln["qty"]) for ln in chosen]),
            }
        )
    return {
        "transaction_id": paid["transaction_id"],
        "payer_openid": paid["payer_openid"],
        "shipments": packages,
    }


@on_order_event("order.shipped", "wechat.upload_shipping_info")
async def upload_shipping_info(conn: asyncpg.Connection, event: OrderEvent, ctx: Any) -> None:
    """Upload a WeChat Pay order's parcels; raises (MiniProgramError, …) so the outbox retries."""
    upload = await shipping_upload(conn, event.order_id)
    if upload is None or not upload["shipments"]:
        return
    several = len(upload["shipments"]) > 1
    provider = ctx.providers.get("wechatpay")
    # Reuse the WeChat Pay provider's connection pool when this process has one.
    async with MiniProgramClient(
        ctx.settings, ctx.redis, ctx.keys, http=getattr(provider, "http", None)
    ) as client:
        await client.upload_shipping_info(
            upload["transaction_id"],
            upload["payer_openid"],
            upload["shipments"],
            delivery_mode=2 if several else 1,
            is_all_delivered=True if several else None,
        )
    log.info(
        "shipping info uploaded",
        extra={"fields": {"order_id": event.order_id, "parcels": len(upload["shipments"])}},
    )

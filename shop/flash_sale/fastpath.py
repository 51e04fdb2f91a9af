"""The flash-sale buy call as a fast route (shop/fastroute.py): the same core as
`FlashSaleController.buy`, `service.buy_call`, without Litestar's per-request machinery."""

from __future__ import annotations

import re

import msgspec

from shop.fastroute import Answer, Call, FastRoute, created
from shop.flash_sale import service
from shop.flash_sale.schemas import FlashBuyIn

_BODY = msgspec.json.Decoder(FlashBuyIn)


async def buy(call: Call) -> Answer:
    sale_id, item_id = call.params
    data = await call.body(_BODY)  # the body before the token: Litestar's order (its kwargs first)
    user = call.shopper()
    answer = await service.buy_call(call.state, sale_id, item_id, user.id, data, call.client_ip(), call.key())
    if answer.body is not None:
        return Answer(answer.status, answer.body)
    return created(answer.order, answer.replayed)


BUY = FastRoute(
    "POST",
    re.compile(r"/api/v1/flash-sales/(\d{1,18})/items/(\d{1,18})/orders/?"),
    "/api/v1/flash-sales/{sale_id:int}/items/{item_id:int}/orders",
    buy,
)

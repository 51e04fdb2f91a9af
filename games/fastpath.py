"""The wheel's draw as a fast route (shop/fastroute.py): the same core as `WheelController.draw`,
`play.draw_out`, without Litestar's per-request machinery."""

from __future__ import annotations

import re

import msgspec

from games.play import draw_out
from games.schemas import DrawIn
from shop.fastroute import Answer, Call, FastRoute, created

_BODY = msgspec.json.Decoder(DrawIn)
_NO_BODY = DrawIn()


async def wheel_draw(call: Call) -> Answer:
    (game_id,) = call.params
    data = await call.body(_BODY, empty=_NO_BODY)  # the body before the token, as Litestar
    user = call.shopper()
    out, replayed = await draw_out(
        call.state, game_id=game_id, game_type="wheel", user_id=user.id,
        idempotency_key=call.key(), pay_with_points=data.pay_with_points,
    )  # fmt: skip
    return created(out, replayed)


WHEEL_DRAW = FastRoute(
    "POST", re.compile(r"/api/v1/games/(\d{1,18})/draw/?"), "/api/v1/games/{game_id:int}/draw", wheel_draw
)

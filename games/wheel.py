"""大转盘 (lottery wheel / nine-grid): one draw per call, the answer says where the wheel stops."""

from __future__ import annotations

from litestar import Controller, Request, Response, post

from games.play import IdempotencyKey, draw_response
from games.schemas import DrawIn, DrawOut
from shop.auth_tokens import AuthUser


class WheelController(Controller):
    path = "/api/v1/games"
    tags = ["games"]

    @post("/{game_id:int}/draw")
    async def draw(
        self,
        request: Request,
        game_id: int,
        user: AuthUser,
        data: DrawIn | None = None,
        idempotency_key: IdempotencyKey = None,
    ) -> Response[DrawOut]:
        """Spin once. The server alone decides; a 201 means the draw is stored.

        Served as a fast route (shop/fastroute.py) unless `SHOP_FAST_ROUTES=false`.
        """
        data = data or DrawIn()
        return await draw_response(
            request, game_id=game_id, game_type="wheel", user_id=user.id,
            idempotency_key=idempotency_key, pay_with_points=data.pay_with_points,
        )  # fmt: skip

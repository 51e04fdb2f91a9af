"""砸金蛋 (egg smash): the shopper picks an egg for the animation; the engine decides what is inside."""

from __future__ import annotations

from litestar import Controller, Request, Response, post

from games.play import IdempotencyKey, draw_response
from games.schemas import DrawOut, SmashIn
from shop.auth_tokens import AuthUser
from shop.db import provide_conn
from shop.errors import ValidationFailed


class EggController(Controller):
    path = "/api/v1/games"
    tags = ["games"]

    @post("/{game_id:int}/smash")
    async def smash(
        self,
        request: Request,
        game_id: int,
        user: AuthUser,
        data: SmashIn,
        idempotency_key: IdempotencyKey = None,
    ) -> Response[DrawOut]:
        """Smash one egg. The index only picks the animation: the result is the engine's draw."""
        eggs = await (await provide_conn(request)).fetchval(
            "select egg_count from games where id = $1 and type = 'egg'", game_id
        )
        if eggs is not None and data.egg >= eggs:
            raise ValidationFailed(
                f"egg must be below {eggs}", details=[{"field": "egg", "message": f"must be below {eggs}"}]
            )
        return await draw_response(
            request, game_id=game_id, game_type="egg", user_id=user.id,
            idempotency_key=idempotency_key, pay_with_points=data.pay_with_points, egg=data.egg,
        )  # fmt: skip

"""What every game's play endpoint shares: run one engine draw for the request and shape the prize."""

from __future__ import annotations

from typing import Any

from litestar import Request, Response

from games import engine
from games.schemas import DrawOut
from shop.errors import ShopError
from shop.hotpath import hotpath_of
from shop.idempotency import IdempotencyKey, check_key  # noqa: F401  (re-exported for the game routes)


async def play(
    state: Any,
    *,
    game_id: int,
    game_type: str,
    user_id: int,
    idempotency_key: str | None,
    pay_with_points: bool,
    kind: str = "draw",
) -> engine.Drawn:
    """One draw through the engine (the Idempotency-Key already checked: `check_key`)."""
    try:
        return await engine.draw(
            hotpath_of(state),
            state.scripts,
            state.redis_keys,
            state.settings,
            game_id=game_id,
            game_type=game_type,
            user_id=user_id,
            idempotency_key=idempotency_key,
            pay_with_points=pay_with_points,
            kind=kind,
        )
    except ShopError as exc:
        if exc.code == "game.not_ready":
            # Redis knows nothing of it: only a live game is "being restored".
            async with state.pool.acquire() as conn:
                await engine.explain_missing(conn, game_id, game_type)
        raise


async def draw_out(
    state: Any,
    *,
    game_id: int,
    game_type: str,
    user_id: int,
    idempotency_key: str | None,
    pay_with_points: bool,
    egg: int | None = None,
) -> tuple[DrawOut, bool]:
    """A wheel spin or an egg smash: the engine's draw as the answer the mini-program animates,
    and whether it is a replay (shared by the Litestar routes and the wheel's fast route)."""
    drawn = await play(
        state, game_id=game_id, game_type=game_type, user_id=user_id,
        idempotency_key=idempotency_key, pay_with_points=pay_with_points,
    )  # fmt: skip
    prizes = await engine.prizes_of_version(state, game_id, drawn.version)
    out = DrawOut(
        draw_no=drawn.draw_no,
        game_id=game_id,
        prize=prizes[drawn.position],
        slot_index=drawn.position,
        paid=drawn.paid,
        pity=drawn.pity,
        egg=egg,
    )
    return out, drawn.replayed


async def draw_response(
    request: Request,
    *,
    game_id: int,
    game_type: str,
    user_id: int,
    idempotency_key: str | None,
    pay_with_points: bool,
    egg: int | None = None,
) -> Response[DrawOut]:
    out, replayed = await draw_out(
        request.app.state, game_id=game_id, game_type=game_type, user_id=user_id,
        idempotency_key=check_key(idempotency_key), pay_with_points=pay_with_points, egg=egg,
    )  # fmt: skip
    return Response(out, status_code=201, headers={"Idempotent-Replayed": "true"} if replayed else None)

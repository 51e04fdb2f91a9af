"""Merchant side of games: configuration (prizes, weights, stock, chance rules), status, odds, stats."""

from __future__ import annotations

from typing import Any

import asyncpg
import redis.asyncio as aioredis
from litestar import Controller, Request, get, post, put

from games import delivery, engine
from games.schemas import (
    ChanceGrantIn,
    ChanceGrantOut,
    GameIn,
    GameOut,
    GamePage,
    GameStats,
    Odds,
    OddsOut,
    PrizeOut,
    PrizeStats,
    PrizeStockIn,
)
from shop.auth_tokens import AuthAdmin, admin_guard
from shop.errors import Conflict, NotFound, ValidationFailed
from shop.keys import Keys
from shop.pagination import DEFAULT_LIMIT, Limit, decode_id_cursor, encode_cursor
from shop.settings import Settings

PRIZE_COLUMNS = ["name", "kind", "coupon_template_id", "points", "sku_id", "weight", "stock", "per_user_cap"]
GAME_COLUMNS = [
    "type",
    "name",
    "starts_at",
    "ends_at",
    "free_per_day",
    "total_per_user",
    "cost_points",
    "chances_per_paid_order",
    "chances_per_invite",
    "extra_per_day_cap",
    "out_of_stock",
    "pity_after",
    "pity_position",
    "egg_count",
    "card_ttl_minutes",
    "claim_days",
]
KIND_FIELDS = {"coupon": "coupon_template_id", "points": "points", "goods": "sku_id", "thanks": None}


async def check_game(conn: asyncpg.Connection, data: GameIn) -> None:
    """Rules msgspec constraints cannot express, and the prizes' references."""
    problems: list[tuple[str, str]] = []
    for name in ("starts_at", "ends_at"):
        if getattr(data, name).tzinfo is None:
            problems.append((name, "must include a time zone"))
    if not problems and data.starts_at >= data.ends_at:
        problems.append(("ends_at", "must be after starts_at"))
    for i, prize in enumerate(data.prizes):
        wanted = KIND_FIELDS[prize.kind]
        for field in ("coupon_template_id", "points", "sku_id"):
            if (getattr(prize, field) is not None) != (field == wanted):
                problems.append(
                    (
                        f"prizes[{i}].{field}",
                        f"{'required' if field == wanted else 'not allowed'} for {prize.kind}",
                    )
                )
        if prize.kind == "goods" and prize.stock is None:
            # Its units are set aside from the SKU's stock when the game goes live.
            problems.append((f"prizes[{i}].stock", "required for goods"))
    templates = [p.coupon_template_id for p in data.prizes if p.coupon_template_id]
    skus = [p.sku_id for p in data.prizes if p.sku_id]
    known_templates = {
        r["id"]
        for r in await conn.fetch("select id from coupon_templates where id = any($1::bigint[])", templates)
    }
    known_skus = {r["id"] for r in await conn.fetch("select id from skus where id = any($1::bigint[])", skus)}
    for i, prize in enumerate(data.prizes):
        if prize.coupon_template_id and prize.coupon_template_id not in known_templates:
            problems.append((f"prizes[{i}].coupon_template_id", "no such coupon template"))
        if prize.sku_id and prize.sku_id not in known_skus:
            problems.append((f"prizes[{i}].sku_id", "no such SKU"))
    if data.out_of_stock == "thanks" and not any(p.kind == "thanks" for p in data.prizes):
        problems.append(("prizes", "the 'thanks' out-of-stock policy needs a 'thanks for playing' prize"))
    if (data.pity_after is None) != (data.pity_position is None):
        problems.append(("pity_position", "pity_after and pity_position go together"))
    elif data.pity_position is not None:
        if data.pity_position >= len(data.prizes) or data.prizes[data.pity_position].kind == "thanks":
            problems.append(("pity_position", "must be the position of a real prize"))
    if problems:
        raise ValidationFailed(
            "; ".join(f"{f}: {m}" for f, m in problems),
            details=[{"field": f, "message": m} for f, m in problems],
        )


async def _insert_prizes(conn: asyncpg.Connection, game_id: int, data: GameIn) -> None:
    await conn.executemany(
        f"""insert into game_prizes (game_id, position, {", ".join(PRIZE_COLUMNS)})
            values ($1, $2, {", ".join(f"${i}" for i in range(3, len(PRIZE_COLUMNS) + 3))})""",
        [(game_id, i, *(getattr(p, c) for c in PRIZE_COLUMNS)) for i, p in enumerate(data.prizes)],
    )


async def game_out(
    conn: asyncpg.Connection, redis: aioredis.Redis, keys: Keys, rows: list[Any]
) -> list[GameOut]:
    prizes = await engine.fetch_prizes(conn, [r["id"] for r in rows])
    out = []
    for row in rows:
        live = {}
        if row["status"] != "draft":
            live = await engine.live_stock(redis, keys, row["id"], [p["position"] for p in prizes[row["id"]]])
        items = [
            PrizeOut(
                **{k: v for k, v in dict(p).items() if k != "game_id"}, remaining=live.get(p["position"])
            )
            for p in prizes[row["id"]]
        ]
        out.append(GameOut(**dict(row), prizes=items))
    return out


async def create_game(conn: asyncpg.Connection, data: GameIn) -> int:
    await check_game(conn, data)
    async with conn.transaction():
        game_id = await conn.fetchval(
            f"""insert into games ({", ".join(GAME_COLUMNS)})
                values ({", ".join(f"${i}" for i in range(1, len(GAME_COLUMNS) + 1))}) returning id""",
            *(getattr(data, c) for c in GAME_COLUMNS),
        )
        await _insert_prizes(conn, game_id, data)
    return game_id


async def update_game(conn: asyncpg.Connection, game_id: int, data: GameIn) -> None:
    """Edit a draft game (a live game's prizes and odds are what shoppers were shown: frozen)."""
    await check_game(conn, data)
    async with conn.transaction():
        row = await engine.fetch_game(conn, game_id, lock=True)
        if row is None:
            raise NotFound("Game not found", code="game.not_found")
        if row["status"] != "draft":
            raise Conflict("A published game cannot be edited", code="game.live")
        await conn.execute(
            f"""update games set ({", ".join(GAME_COLUMNS)}, weights_version, updated_at)
                = ({", ".join(f"${i}" for i in range(2, len(GAME_COLUMNS) + 2))}, weights_version + 1, now())
                where id = $1""",
            game_id,
            *(getattr(data, c) for c in GAME_COLUMNS),
        )
        await conn.execute("delete from game_prizes where game_id = $1", game_id)
        await _insert_prizes(conn, game_id, data)


TRANSITIONS = {
    "activate": ("active", ["draft", "paused"]),
    "pause": ("paused", ["active"]),
    "end": ("ended", ["active", "paused"]),
}


async def change_status(
    conn: asyncpg.Connection,
    redis: aioredis.Redis,
    scripts: Any,
    keys: Keys,
    settings: Settings,
    game_id: int,
    action: str,
    admin_id: int | None = None,
) -> None:
    """activate (sets goods aside, prewarms Redis), pause, end (settles): each a conditional UPDATE."""
    target, sources = TRANSITIONS[action]
    async with conn.transaction():
        old = await conn.fetchval("select status from games where id = $1 for update", game_id)
        if old is None:
            raise NotFound("Game not found", code="game.not_found")
        row = await conn.fetchrow(
            f"""update games set status = $2, updated_at = now() where id = $1 and status = any($3::text[])
                returning {engine.GAME_FIELDS}""",
            game_id,
            target,
            sources,
        )
        if row is None:
            raise Conflict(f"Cannot {action} a game that is {old}", code="game.illegal_transition")
        if old == "draft":
            await delivery.set_aside_goods(conn, game_id, admin_id)
            warm = False
        else:
            # Inside the transaction: Redis that cannot be told keeps the old status in both.
            prizes = (await engine.fetch_prizes(conn, [game_id]))[game_id]
            warm = await engine.warm_rules(keys, scripts, settings, row, prizes)
    # After the commit: Redis never hands out goods PostgreSQL has not set aside (the rebuild
    # reads its own snapshot). If this fails, draws answer 503 until `shop reconcile --fix`.
    if not warm:
        await engine.rebuild_game(conn, redis, scripts, keys, settings, game_id)
    if action == "end":
        await delivery.settle_game(conn, redis, keys, game_id, admin_id=admin_id)


async def set_prize_stock(
    conn: asyncpg.Connection,
    scripts: Any,
    keys: Keys,
    game_id: int,
    position: int,
    stock: int,
    admin_id: int | None = None,
) -> None:
    """Raise a live game's prize stock (加奖 during a live stream). Odds stay as published; only
    the units grow. A goods prize's added units are set aside from SKU stock. The total is
    absolute, so a retried call changes nothing; stock only grows while the game is live.

    PostgreSQL commits first; Redis learns of the units after the commit, once per restock
    (`game_restock.lua`; the worker's restore_pending retries a failure, a rebuild counts it), so
    Redis never offers a unit PostgreSQL did not commit.
    """
    async with conn.transaction():
        # No rebuild of the game's counters straddles this commit (engine.counters_lock).
        await engine.hold_counters(conn, [game_id])
        # NO KEY UPDATE: the draws' group commit (foreign keys to both rows) is not held up.
        game = await conn.fetchrow(
            """select status, settled_at, ends_at <= now() as over from games where id = $1
               for no key update""",
            game_id,
        )
        if game is None:
            raise NotFound("Game not found", code="game.not_found")
        if game["status"] not in ("active", "paused") or game["over"] or game["settled_at"] is not None:
            state = "over" if game["status"] in ("active", "paused") else game["status"]
            raise Conflict(
                f"Only a live game's stock is raised this way (the game is {state}; a draft is edited whole)",
                code="game.not_live",
            )
        prize = await conn.fetchrow(
            """select id, kind, sku_id, stock from game_prizes where game_id = $1 and position = $2
               for no key update""",
            game_id,
            position,
        )
        if prize is None:
            raise NotFound("The game has no prize at that position", code="game.prize_not_found")
        if prize["stock"] is None:
            raise Conflict("The prize's stock is unlimited", code="game.prize_unlimited")
        added = stock - prize["stock"]
        if added < 0:
            raise Conflict(
                f"A live prize's stock only grows (it is {prize['stock']})", code="game.stock_decrease"
            )
        if added == 0:
            return
        await conn.execute("update game_prizes set stock = $2 where id = $1", prize["id"], stock)
        if prize["kind"] == "goods":
            await delivery.set_aside_more_goods(conn, game_id, prize["id"], prize["sku_id"], added, admin_id)
        restock = await conn.fetchrow(
            f"""insert into game_prize_restocks (game_id, prize_id, position, added, stock_after, admin_id)
                values ($1, $2, $3, $4, $5, $6) returning {engine.RESTOCK_FIELDS}""",
            game_id,
            prize["id"],
            position,
            added,
            stock,
            admin_id,
        )
    await engine.after_commit(engine.apply_restocks(conn, scripts, keys, [restock]), "restocked units")


def odds_of(game: Any, prizes: list[Any]) -> OddsOut:
    """Each prize's probability from the weights, as published to shoppers."""
    total = sum(p["weight"] for p in prizes)
    return OddsOut(
        game_id=game["id"],
        weights_version=game["weights_version"],
        out_of_stock=game["out_of_stock"],
        items=[
            Odds(
                position=p["position"],
                name=p["name"],
                kind=p["kind"],
                weight=p["weight"],
                probability=p["weight"] / total,
            )
            for p in prizes
        ],
    )


async def game_stats(conn: asyncpg.Connection, redis: aioredis.Redis, keys: Keys, game_id: int) -> GameStats:
    game = await engine.fetch_game(conn, game_id)
    if game is None:
        raise NotFound("Game not found", code="game.not_found")
    totals = await conn.fetchrow(
        """select count(*) as draws, count(distinct d.user_id) as players, count(*) filter (where d.paid) as paid_draws,
                  coalesce(sum(d.cost_points), 0) as points_spent,
                  count(distinct d.user_id) filter (where p.kind <> 'thanks' and not d.returned) as winners
           from game_draws d join game_prizes p on p.id = d.prize_id where d.game_id = $1""",
        game_id,
    )
    rows = await conn.fetch(
        """select p.position, p.name, p.kind, p.stock,
                  (select count(*) from game_draws d where d.prize_id = p.id and not d.returned) as won,
                  case p.kind when 'coupon' then coalesce(t.amount, 0) when 'goods' then s.price
                              when 'points' then p.points else 0 end as unit_cost
           from game_prizes p left join coupon_templates t on t.id = p.coupon_template_id
           left join skus s on s.id = p.sku_id
           where p.game_id = $1 order by p.position""",
        game_id,
    )
    live = (
        await engine.live_stock(redis, keys, game_id, [r["position"] for r in rows])
        if game["status"] != "draft"
        else {}
    )
    prizes = [
        PrizeStats(
            position=r["position"],
            name=r["name"],
            kind=r["kind"],
            won=r["won"],
            remaining=live.get(r["position"], r["stock"] - r["won"] if r["stock"] is not None else None),
            cost=r["won"] * r["unit_cost"],
        )
        for r in rows
    ]
    return GameStats(game_id=game_id, **dict(totals), prizes=prizes, cost_total=sum(p.cost for p in prizes))


# ---------------------------------------------------------------- routes


async def _one(conn: asyncpg.Connection, request: Request, game_id: int) -> GameOut:
    row = await engine.fetch_game(conn, game_id)
    if row is None:
        raise NotFound("Game not found", code="game.not_found")
    return (await game_out(conn, request.app.state.redis, request.app.state.redis_keys, [row]))[0]


class AdminGameController(Controller):
    path = "/api/v1/admin/games"
    tags = ["games"]
    guards = [admin_guard]

    @post("/")
    async def create(
        self, request: Request, admin: AuthAdmin, conn: asyncpg.Connection, data: GameIn
    ) -> GameOut:
        """A draft game with its prizes; nothing is live until it is activated."""
        return await _one(conn, request, await create_game(conn, data))

    @get("/")
    async def list_games(
        self,
        request: Request,
        admin: AuthAdmin,
        conn: asyncpg.Connection,
        cursor: str | None = None,
        limit: Limit = DEFAULT_LIMIT,
    ) -> GamePage:
        after = decode_id_cursor(cursor)
        rows = await conn.fetch(
            f"select {engine.GAME_FIELDS} from games where ($1::bigint is null or id < $1) order by id desc limit $2",
            after,
            limit + 1,
        )
        more = len(rows) > limit
        rows = rows[:limit]
        items = await game_out(conn, request.app.state.redis, request.app.state.redis_keys, rows)
        return GamePage(items=items, next_cursor=encode_cursor(rows[-1]["id"]) if more else None)

    @get("/{game_id:int}")
    async def one(
        self, request: Request, admin: AuthAdmin, conn: asyncpg.Connection, game_id: int
    ) -> GameOut:
        return await _one(conn, request, game_id)

    @put("/{game_id:int}")
    async def update(
        self, request: Request, admin: AuthAdmin, conn: asyncpg.Connection, game_id: int, data: GameIn
    ) -> GameOut:
        await update_game(conn, game_id, data)
        return await _one(conn, request, game_id)

    @post("/{game_id:int}/{action:str}", status_code=200)
    async def transition(
        self, request: Request, admin: AuthAdmin, conn: asyncpg.Connection, game_id: int, action: str
    ) -> GameOut:
        """activate | pause | end."""
        if action not in TRANSITIONS:
            raise NotFound("No such action", code="game.unknown_action")
        state = request.app.state
        await change_status(
            conn, state.redis, state.scripts, state.redis_keys, state.settings, game_id, action, admin.id
        )
        return await _one(conn, request, game_id)

    @put("/{game_id:int}/prizes/{position:int}/stock")
    async def restock(
        self,
        request: Request,
        admin: AuthAdmin,
        conn: asyncpg.Connection,
        game_id: int,
        position: int,
        data: PrizeStockIn,
    ) -> GameOut:
        """Raise a live prize's total stock; the game with every prize's remaining units."""
        state = request.app.state
        await set_prize_stock(conn, state.scripts, state.redis_keys, game_id, position, data.stock, admin.id)
        return await _one(conn, request, game_id)

    @get("/{game_id:int}/stats")
    async def stats(
        self, request: Request, admin: AuthAdmin, conn: asyncpg.Connection, game_id: int
    ) -> GameStats:
        """Draws, winners per prize, remaining stock and the cost of prizes issued."""
        return await game_stats(conn, request.app.state.redis, request.app.state.redis_keys, game_id)

    @post("/{game_id:int}/chances", status_code=200)
    async def grant(
        self, request: Request, admin: AuthAdmin, conn: asyncpg.Connection, game_id: int, data: ChanceGrantIn
    ) -> ChanceGrantOut:
        """A merchant-defined task was completed (say, an invited shopper logged in): extra chances today."""
        game = await engine.fetch_game(conn, game_id)
        if game is None:
            raise NotFound("Game not found", code="game.not_found")
        if game["status"] not in ("active", "paused"):
            raise Conflict(f"The game is {game['status']}", code="game.not_live")
        if not await conn.fetchval("select exists (select 1 from users where id = $1)", data.user_id):
            raise NotFound("No such shopper", code="user.not_found")
        state = request.app.state
        granted = await engine.grant_chances(
            conn,
            state.scripts,
            state.redis_keys,
            state.settings,
            game,
            data.user_id,
            data.amount,
            source="task",
            ref=data.ref,
        )
        return ChanceGrantOut(granted=granted)

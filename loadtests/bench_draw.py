"""Benchmark the wheel draw against a bare reference running the same draw script, in one run, with wrk.

    python -m loadtests.bench_draw            # SHOP_DATABASE_URL / SHOP_REDIS_URL / SHOP_REDIS_PREFIX

Three apps, served the same way (granian, ASGI, uvloop, 2 workers, one at a time) and measured with
the same wrk settings against a live wheel with chances to spare (every request is a draw):
`shop` (the real endpoint: JWT, validation, `game_draw.lua` through the hot path, the draw
group-committed to PostgreSQL before the answer), `bare_draw` (decode the same body, run the
same `game_draw.lua` with one EVALSHA; no auth, no PostgreSQL) and, between them,
`bare_draw_jwt_commit` (the JWT check and the engine's draw with its PostgreSQL write, without
the shop's middleware and dependency injection). Stop `shop worker` first: the
benchmark measures the API alone. Prints a Markdown table with req/s, p99 and the ratio.
"""

from __future__ import annotations

import asyncio
import secrets
import sys
import tempfile
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from datetime import UTC, datetime, timedelta
from pathlib import Path

from litestar import Litestar, Request, Response, post

from games import admin, engine
from games.schemas import DrawIn, GameIn, PrizeIn
from loadtests.bench_flash import HERE, bench_arguments, server_env, start, stop, wait_ready, wrk
from loadtests.reference.apps import redis_lifespan
from shop.auth_tokens import AUD_SHOPPER, issue_access_token
from shop.db import connect
from shop.hotpath import new_reservation_id
from shop.keys import Keys
from shop.redis import Scripts, create_redis
from shop.settings import load_settings, with_default_urls

APPS = {
    "shop": "shop.app:create_app",
    "bare_draw": "loadtests.bench_draw:bare_draw",
    "bare_draw_jwt_commit": "loadtests.bench_draw:bare_draw_jwt_commit",
}


def bare_draw() -> Litestar:
    """The reference: the same body decoded and the same draw script, nothing else."""
    settings = with_default_urls(load_settings())
    keys = Keys(settings.redis_prefix)
    state: dict = {}

    lifespan = redis_lifespan(settings, state, "game_draw")

    @post("/api/v1/games/{game_id:int}/draw")
    async def draw(request: Request, game_id: int, data: DrawIn | None = None) -> Response:
        user_id = int(request.headers["x-bench-user"])
        now = engine.clock()
        day = engine.business_date(settings, now)
        args = engine.draw_args(
            game_id=game_id, user_id=user_id, rid=new_reservation_id(), rand=secrets.randbits(engine.RAND_BITS),
            mode="free", game_type="wheel", now=now, day=day,
        )  # fmt: skip
        reply = await state["redis"].evalsha(
            state["sha"], 5, keys.game_state(game_id), keys.game_users(game_id),
            keys.game_day(game_id, day.isoformat()), keys.game_idem(game_id, user_id, None),
            keys.game_stream(game_id), *args,
        )  # fmt: skip
        return Response({"draw_no": reply[1], "slot_index": reply[2]}, status_code=201)

    return Litestar([draw], lifespan=[lifespan])


def bare_draw_jwt_commit() -> Litestar:
    """Between the two: the JWT check and the engine's draw with its group-committed PostgreSQL
    write, without the shop's middleware and dependency injection (where the rest of the gap is)."""
    from shop.auth_tokens import _bearer, decode_access_token
    from shop.db import create_pool
    from shop.hotpath import HotPath

    settings = with_default_urls(load_settings())
    keys = Keys(settings.redis_prefix)
    state: dict = {}

    @asynccontextmanager
    async def lifespan(app: Litestar) -> AsyncIterator[None]:
        redis = create_redis(settings.redis_url)
        pool = await create_pool(settings)
        state["hotpath"], state["scripts"] = HotPath(pool, redis), Scripts(redis)
        try:
            yield
        finally:
            await redis.aclose()
            await pool.close()

    @post("/api/v1/games/{game_id:int}/draw")
    async def draw(request: Request, game_id: int, data: DrawIn | None = None) -> Response:
        user_id = int(decode_access_token(settings, _bearer(request), AUD_SHOPPER)["sub"])
        drawn = await engine.draw(
            state["hotpath"], state["scripts"], keys, settings,
            game_id=game_id, game_type="wheel", user_id=user_id, idempotency_key=None,
        )  # fmt: skip
        return Response({"draw_no": drawn.draw_no, "slot_index": drawn.position}, status_code=201)

    return Litestar([draw], lifespan=[lifespan])


async def prepare(settings, users: int) -> tuple[dict[str, int], list[tuple[int, str]]]:
    """A live wheel per app (unlimited prizes, the most free draws a day) and shoppers with tokens."""
    conn = await connect(settings)
    redis = create_redis(settings.redis_url)
    keys, scripts = Keys(settings.redis_prefix), Scripts(redis)
    try:
        games = {}
        for app in APPS:
            now = datetime.now(UTC)
            data = GameIn(
                type="wheel",
                name=f"压测转盘 {app}",
                starts_at=now - timedelta(minutes=1),
                ends_at=now + timedelta(hours=2),
                free_per_day=1000,
                prizes=[
                    PrizeIn(name="1 积分", kind="points", points=1, weight=1),
                    PrizeIn(name="谢谢参与", kind="thanks", weight=9),
                ],
            )
            game_id = await admin.create_game(conn, data)
            await admin.change_status(conn, redis, scripts, keys, settings, game_id, "activate")
            games[app] = game_id
        rows = await conn.fetch(
            "insert into users (nickname) select 'draw' || g from generate_series(1, $1) g returning id",
            users,
        )
    finally:
        await redis.aclose()
        await conn.close()
    return games, [
        (r["id"], issue_access_token(settings, r["id"], AUD_SHOPPER, exp=int(time.time()) + 3 * 3600))
        for r in rows
    ]


def main(argv: list[str] | None = None) -> int:
    parser = bench_arguments(__doc__, 8401)
    parser.add_argument("--rounds", type=int, default=1, help="alternate the apps this many times")
    args = parser.parse_args(argv)

    settings = with_default_urls(load_settings())
    games, shoppers = asyncio.run(prepare(settings, args.users))
    env = server_env(settings)
    file = Path(tempfile.mkdtemp(prefix="bench_draw_")) / "shoppers.txt"
    file.write_text("".join(f"{uid}|{jwt}\n" for uid, jwt in shoppers))
    results: dict[str, list[dict]] = {app: [] for app in APPS}
    for _ in range(args.rounds):
        for app in APPS:
            proc = start(app, args.port, args.workers, env, APPS)
            try:
                wait_ready(args.port, "/api/v1/games/0/draw")
                r = wrk(args.port, f"/api/v1/games/{games[app]}/draw", file, args, HERE / "bench_draw.lua")
            finally:
                stop(proc)
            results[app].append(r)
            print(
                f"{app:10s} {r['rps']:9.0f} req/s  p99 {r['p99_ms']:6.1f} ms  requests {r['requests']}  "
                f"non-2xx {r['non2xx']}  socket errors {r['errors']}",
                flush=True,
            )

    def median(app: str, field: str) -> float:
        values = sorted(r[field] for r in results[app])
        return values[len(values) // 2]

    print()
    print("| app | req/s (median) | p99 (ms) | non-2xx | shop ÷ app |")
    print("|---|---|---|---|---|")
    for app in APPS:
        ratio = median("shop", "rps") / median(app, "rps")
        non2xx = sum(r["non2xx"] for r in results[app])
        print(f"| {app} | {median(app, 'rps'):.0f} | {median(app, 'p99_ms'):.1f} | {non2xx} | {ratio:.2f}× |")
    return 0


if __name__ == "__main__":
    sys.exit(main())

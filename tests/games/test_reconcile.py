"""`shop reconcile` after a Redis loss: prize stock and chance counters come back from PostgreSQL."""

from __future__ import annotations

import asyncio

from games import engine
from shop.hotpath.jobs import persist_all_streams
from shop.keys import Keys
from shop.reconcile import reconcile
from tests.games.test_admin import ADMIN, THANKS, code_of, make_game, many_users
from tests.games.test_draw import draw
from tests.games.test_returns import RedisDownForReturns, expire
from tests.games.test_scratch_egg import CARD_PRIZES, issue
from tests.shop.test_hotpath import ctx_of
from tests.shop.test_reconcile import run_cli


def draw_script_keys(keys: Keys, game_id: int, user_id: int, day) -> list[str]:
    return [
        keys.game_state(game_id), keys.game_users(game_id), keys.game_day(game_id, day.isoformat()),
        keys.game_idem(game_id, user_id, None), keys.game_stream(game_id),
    ]  # fmt: skip


async def draw_and_die(app, settings, game_id: int, user_id: int, rid: str, rand: int) -> None:
    """What an API process that died right after the draw script leaves behind: an entry, no row."""
    keys = Keys(settings.redis_prefix)
    now = engine.clock()
    day = engine.business_date(settings, now)
    reply = await app.state.scripts.game_draw(
        keys=draw_script_keys(keys, game_id, user_id, day),
        args=engine.draw_args(
            game_id=game_id, user_id=user_id, rid=rid, rand=rand, mode="free", game_type="wheel", now=now, day=day
        ),
    )  # fmt: skip
    assert reply[0] == "ok"


async def test_flushed_redis_is_rebuilt_with_stock_and_chances_intact(
    client, app, db, settings, admin_headers, monkeypatch, capsys
):
    prizes = [
        {"name": "20 积分", "kind": "points", "points": 20, "weight": 1, "stock": 4},
        {**THANKS, "weight": 1},
    ]
    game = await make_game(client, admin_headers, prizes=prizes, free_per_day=2, extra_per_day_cap=1)
    (a, ha), (_b, hb), (c, hc) = await many_users(db, settings, 3)
    for headers in (ha, ha, hb):
        assert (await draw(client, headers, game["id"])).status_code == 201
    r = await client.post(
        f"{ADMIN}/{game['id']}/chances",
        json={"user_id": c, "amount": 1, "ref": "task-1"},
        headers=admin_headers,
    )
    assert r.json() == {"granted": 1}
    assert [d for d in (await reconcile(settings)).found if d.checker == "games"] == []
    keys = Keys(settings.redis_prefix)
    before = await app.state.redis.hgetall(keys.game_state(game["id"]))

    # Redis loses everything of this shop.
    redis = app.state.redis
    doomed = [k async for k in redis.scan_iter(match=f"{settings.redis_prefix}:*")]
    await redis.delete(*doomed)
    r = await draw(client, hb, game["id"])
    assert r.status_code == 503 and code_of(r) == "game.not_ready"
    found = [d for d in (await reconcile(settings)).found if d.checker == "games"]
    assert {"status", "s:0", f"users {a}", f"today {a}:f", f"today {c}:x", "stream registered"} <= {
        d.field for d in found
    }

    assert await asyncio.to_thread(run_cli, monkeypatch, settings, "--fix") == 0
    capsys.readouterr()
    assert (await reconcile(settings)).found == []
    assert await redis.hgetall(keys.game_state(game["id"])) == before
    # Chances hold as before the loss: a has used both, b one, c has two plus the extra one.
    assert code_of(await draw(client, ha, game["id"])) == "game.no_chances"
    assert (await draw(client, hb, game["id"])).status_code == 201
    assert code_of(await draw(client, hb, game["id"])) == "game.no_chances"
    assert [(await draw(client, hc, game["id"])).status_code for _ in range(4)] == [201, 201, 201, 409]
    won = await db.fetchval("select count(*) from game_draws where position = 0")
    assert won <= 4 and int(await redis.hget(keys.game_state(game["id"]), "s:0")) == 4 - won


async def test_a_draw_not_yet_written_is_counted_by_the_rebuild(client, app, db, settings, admin_headers):
    prizes = [{"name": "20 积分", "kind": "points", "points": 20, "weight": 1, "stock": 3}]
    game = await make_game(client, admin_headers, prizes=prizes, out_of_stock="redistribute")
    [(user_id, _)] = await many_users(db, settings, 1)
    keys = Keys(settings.redis_prefix)
    await draw_and_die(app, settings, game["id"], user_id, "LOST1", 7)
    await app.state.redis.hset(keys.game_state(game["id"]), "s:0", 3)  # and a counter goes wrong
    report = await reconcile(settings, fix=True)
    assert [d.field for d in report.found] == ["s:0"] and report.remaining == []
    assert await db.fetchval("select user_id from game_draws where draw_no = 'LOST1'") == user_id
    assert await app.state.redis.hget(keys.game_state(game["id"]), "s:0") == "2"


async def test_the_worker_persists_a_draw_whose_api_process_died(client, app, db, settings, admin_headers):
    prizes = [{"name": "20 积分", "kind": "points", "points": 20, "weight": 1}]
    game = await make_game(client, admin_headers, prizes=prizes, out_of_stock="redistribute")
    [(user_id, _)] = await many_users(db, settings, 1)
    await draw_and_die(app, settings, game["id"], user_id, "DIED1", 3)
    assert await persist_all_streams(ctx_of(app)) == 1
    row = await db.fetchrow("select id, rand, position from game_draws where draw_no = 'DIED1'")
    assert (row["rand"], row["position"]) == (3, 0)
    assert await db.fetchval("select kind from prize_deliveries where draw_id = $1", row["id"]) == "points"
    assert await persist_all_streams(ctx_of(app)) == 0


async def test_an_ended_games_stream_leaves_the_workers_pass_once_drained(
    client, app, db, settings, admin_headers
):
    """A draw an API process died on, then the game ends: the worker's next pass writes the draw
    and drops the stream (no draw can add to it any more); reconcile expects that."""
    from shop.hotpath import registered_streams

    prizes = [{"name": "20 积分", "kind": "points", "points": 20, "weight": 1}]
    game = await make_game(client, admin_headers, prizes=prizes, out_of_stock="redistribute")
    other = await make_game(client, admin_headers, prizes=prizes, out_of_stock="redistribute")
    [(user_id, _)] = await many_users(db, settings, 1)
    keys = Keys(settings.redis_prefix)
    await draw_and_die(app, settings, game["id"], user_id, "DIED2", 3)
    r = await client.post(f"{ADMIN}/{game['id']}/end", headers=admin_headers)
    assert r.status_code == 200, r.text
    assert await persist_all_streams(ctx_of(app)) == 1
    assert await db.fetchval("select count(*) from game_draws where draw_no = 'DIED2'") == 1
    registered = set(await registered_streams(app.state.redis, keys, engine.KIND))
    assert keys.game_stream(game["id"]) not in registered and keys.game_stream(other["id"]) in registered
    assert (await reconcile(settings)).found == []


def during_rebuild(monkeypatch, step) -> None:
    """Run `step` once, right after the rebuild persisted the stream and before it reads PostgreSQL."""
    original, armed = engine.persist_backlog, [True]

    async def persist_then_step(*args, **kwargs):
        last = await original(*args, **kwargs)
        if armed:
            armed.clear()
            await step()
        return last

    monkeypatch.setattr(engine, "persist_backlog", persist_then_step)


async def rebuild(app, db, game_id: int) -> None:
    state = app.state
    await engine.rebuild_game(db, state.redis, state.scripts, state.redis_keys, state.settings, game_id)


async def test_a_draw_written_while_the_rebuild_runs_is_counted_once(
    client, app, db, settings, admin_headers, monkeypatch
):
    prizes = [{"name": "20 积分", "kind": "points", "points": 20, "weight": 1, "stock": 5}]
    game = await make_game(client, admin_headers, prizes=prizes, out_of_stock="redistribute", free_per_day=2)
    [(user_id, headers)] = await many_users(db, settings, 1)

    async def a_shopper_draws():  # answered (so in PostgreSQL) after the stream was persisted
        assert (await draw(client, headers, game["id"])).status_code == 201

    during_rebuild(monkeypatch, a_shopper_draws)
    await rebuild(app, db, game["id"])
    keys = Keys(settings.redis_prefix)
    today = engine.business_date(settings).isoformat()
    assert await app.state.redis.hget(keys.game_state(game["id"]), "s:0") == "4"
    assert await app.state.redis.hget(keys.game_users(game["id"]), str(user_id)) == "1"
    assert await app.state.redis.hget(keys.game_day(game["id"], today), f"{user_id}:f") == "1"
    assert [d for d in (await reconcile(settings)).found if d.checker == "games"] == []
    # The shopper still has the second free draw of the day.
    assert [(await draw(client, headers, game["id"])).status_code for _ in range(2)] == [201, 409]


async def test_the_losing_streak_survives_a_draw_made_during_the_rebuild(
    client, app, db, settings, admin_headers, monkeypatch
):
    prizes = [
        {"name": "保底 20 积分", "kind": "points", "points": 20, "weight": 1},
        {**THANKS, "weight": 1_000_000},
    ]
    game = await make_game(
        client, admin_headers, prizes=prizes, free_per_day=9, pity_after=3, pity_position=0
    )
    [(user_id, headers)] = await many_users(db, settings, 1)
    for _ in range(2):
        assert (await draw(client, headers, game["id"])).json()["prize"]["kind"] == "thanks"
    keys = Keys(settings.redis_prefix)

    async def a_loss_not_yet_written():  # the third loss in a row: in the stream, not in PostgreSQL
        now = engine.clock()
        day = engine.business_date(settings, now)
        reply = await app.state.scripts.game_draw(
            keys=draw_script_keys(keys, game["id"], user_id, day),
            args=engine.draw_args(
                game_id=game["id"], user_id=user_id, rid="DURING1", rand=1, mode="free", game_type="wheel",
                now=now, day=day,
            ),
        )  # fmt: skip
        assert reply[0] == "ok" and reply[2] == 1

    during_rebuild(monkeypatch, a_loss_not_yet_written)
    await rebuild(app, db, game["id"])
    assert await app.state.redis.hget(keys.game_users(game["id"]), f"{user_id}:l") == "3"
    r = await draw(client, headers, game["id"])
    assert r.json()["pity"] is True and r.json()["prize"]["kind"] == "points"


async def test_returns_committed_before_or_during_the_rebuild_are_counted_once(
    client, app, db, settings, admin_headers, monkeypatch
):
    game = await make_game(
        client, admin_headers, type="scratch", prizes=CARD_PRIZES, out_of_stock="redistribute", free_per_day=3
    )
    [(user_id, headers)] = await many_users(db, settings, 1)
    cards = [(await issue(client, headers, game["id"])).json()["card_id"] for _ in range(3)]
    keys, redis = Keys(settings.redis_prefix), app.state.redis
    state = keys.game_state(game["id"])
    assert await redis.hget(state, "s:0") == "2"
    # Committed before the rebuild, its Redis step still due (it failed): the rebuild counts it.
    assert await expire(db, app, cards[0], RedisDownForReturns(app.state.scripts)) == 1

    # A card expiring while the rebuild runs (after it counted the stock, before it listed the
    # returns) waits for it (the counters lock) before it commits: the snapshot never straddles a
    # return, and the return's own step lands on the rebuilt state, once.
    original = engine.expected_counts
    during: dict = {}

    async def expire_elsewhere() -> int:
        async with app.state.pool.acquire() as other:
            return await expire(other, app, cards[1])

    async def count_while_a_card_expires(*args):
        counts = await original(*args)
        monkeypatch.setattr(engine, "expected_counts", original)
        during["task"] = asyncio.create_task(expire_elsewhere())
        await asyncio.sleep(0.3)
        during["waited"] = not during["task"].done()
        return counts

    monkeypatch.setattr(engine, "expected_counts", count_while_a_card_expires)
    await rebuild(app, db, game["id"])
    assert during["waited"]
    assert await during["task"] == 1
    assert await redis.hget(state, "s:0") == "4"
    assert await redis.hget(keys.game_users(game["id"]), f"{user_id}:w:0") == "1"
    assert not await db.fetchval("select bool_or(return_pending) from game_draws")
    # The failed step's retry comes later: the rebuild already counted it.
    await db.execute("update game_draws set return_pending = true where draw_no = $1", cards[0])
    assert await engine.restore_pending(app.state.pool, app.state.scripts, keys) == 1
    assert await redis.hget(state, "s:0") == "4"
    assert [d for d in (await reconcile(settings)).found if d.checker == "games"] == []

"""Raising a live game's prize stock (加奖 during a live stream): PostgreSQL, SKU stock and Redis
move together, under a crowd drawing at the same time; Redis never offers a unit PostgreSQL did
not commit."""

from __future__ import annotations

import asyncio

from redis.exceptions import ConnectionError as RedisConnectionError

from games import engine
from games.engine import restore_pending
from shop.keys import Keys
from shop.reconcile import reconcile
from tests.factories import make_product, stock_of
from tests.games.test_admin import ADMIN, THANKS, code_of, make_game, many_users
from tests.games.test_draw import draw
from tests.games.test_goods_stock import goods, ledger


def stock_url(game_id: int, position: int) -> str:
    return f"{ADMIN}/{game_id}/prizes/{position}/stock"


def remaining(game: dict, position: int = 0) -> int | None:
    return next(p["remaining"] for p in game["prizes"] if p["position"] == position)


async def crowd_draws(client, db, settings, game_id: int, n: int) -> list[str]:
    """n shoppers draw at once: 'win' or the refusal's code for each."""
    users = await many_users(db, settings, n)
    answers = await asyncio.gather(*(draw(client, headers, game_id) for _, headers in users))
    assert {r.status_code for r in answers} <= {201, 409}, [r.text for r in answers if r.status_code >= 500]
    return ["win" if r.status_code == 201 else code_of(r) for r in answers]


async def test_a_sold_out_goods_prize_restocked_live_is_won_again_up_to_the_new_total(
    client, app, db, settings, admin_headers
):
    _, (sku,) = await make_product(db, skus=[(19900, 10)])
    game = await make_game(client, admin_headers, prizes=goods(sku, 2), out_of_stock="redistribute")
    assert (await crowd_draws(client, db, settings, game["id"], 30)).count("win") == 2
    assert await stock_of(db, sku) == 8

    r = await client.put(stock_url(game["id"], 0), json={"stock": 5}, headers=admin_headers)
    assert r.status_code == 200, r.text
    assert remaining(r.json()) == 3 and r.json()["prizes"][0]["stock"] == 5
    assert await stock_of(db, sku) == 5  # the three added units are set aside from the SKU
    assert (await ledger(db, sku))[-1] == (-3, "game prize units set aside", f"game:{game['id']}")
    # A retry of the same call (the operator's double tap) changes nothing.
    r = await client.put(stock_url(game["id"], 0), json={"stock": 5}, headers=admin_headers)
    assert r.status_code == 200 and remaining(r.json()) == 3
    assert await stock_of(db, sku) == 5 and len(await ledger(db, sku)) == 2

    outcomes = await crowd_draws(client, db, settings, game["id"], 30)
    assert outcomes.count("win") == 3 and set(outcomes) == {"win", "game.sold_out"}
    assert await db.fetchval("select count(*) from game_draws where game_id = $1", game["id"]) == 5
    held = await db.fetchval("select held from game_prizes where game_id = $1", game["id"])
    assert held == 5  # every unit won is still held for its winner's claim

    # Refusals change nothing.
    r = await client.put(stock_url(game["id"], 0), json={"stock": 4}, headers=admin_headers)
    assert (r.status_code, code_of(r)) == (409, "game.stock_decrease")
    r = await client.put(stock_url(game["id"], 0), json={"stock": 11}, headers=admin_headers)
    assert (r.status_code, code_of(r)) == (409, "game.insufficient_stock")  # the SKU has 5, not 6
    assert await stock_of(db, sku) == 5
    assert await db.fetchval("select stock from game_prizes where game_id = $1", game["id"]) == 5
    r = await client.get(f"{ADMIN}/{game['id']}", headers=admin_headers)
    assert remaining(r.json()) == 0
    r = await client.put(stock_url(game["id"], 7), json={"stock": 9}, headers=admin_headers)
    assert (r.status_code, code_of(r)) == (404, "game.prize_not_found")
    r = await client.put(stock_url(game["id"], 0), json={"stock": -1}, headers=admin_headers)
    assert (r.status_code, code_of(r)) == (422, "validation_failed")
    r = await client.put(stock_url(999999, 0), json={"stock": 9}, headers=admin_headers)
    assert (r.status_code, code_of(r)) == (404, "game.not_found")
    assert (await client.put(stock_url(game["id"], 0), json={"stock": 9})).status_code == 401
    assert [d for d in (await reconcile(settings)).found if d.checker == "games"] == []


async def test_raises_racing_each_other_and_a_crowd_end_at_the_highest_total_with_no_unit_lost(
    client, app, db, settings, admin_headers
):
    prizes = [
        {"name": "5 积分", "kind": "points", "points": 5, "weight": 50, "stock": 3},
        {**THANKS, "weight": 50},
    ]
    game = await make_game(client, admin_headers, prizes=prizes, free_per_day=1)
    users = await many_users(db, settings, 200)
    raises = [
        client.put(stock_url(game["id"], 0), json={"stock": total}, headers=admin_headers)
        for total in range(4, 24)
    ]
    results = await asyncio.gather(*raises, *(draw(client, headers, game["id"]) for _, headers in users))
    raised, drawn = results[: len(raises)], results[len(raises) :]
    # Each raise either applied its total or found a higher one already there.
    assert {r.status_code for r in raised} <= {200, 409}
    assert {code_of(r) for r in raised if r.status_code == 409} <= {"game.stock_decrease"}
    assert raised[-1].status_code == 200  # the highest total always applies
    assert {r.status_code for r in drawn} == {201}
    assert await db.fetchval("select stock from game_prizes where game_id = $1", game["id"]) == 23
    applied = await db.fetch(
        "select added, redis_done from game_prize_restocks where game_id = $1", game["id"]
    )
    assert len(applied) == sum(r.status_code == 200 for r in raised)
    assert sum(r["added"] for r in applied) == 20 and all(r["redis_done"] for r in applied)
    won = await db.fetchval("select count(*) from game_draws where game_id = $1 and position = 0", game["id"])
    game_now = (await client.get(f"{ADMIN}/{game['id']}", headers=admin_headers)).json()
    assert remaining(game_now) == 23 - won
    assert [d for d in (await reconcile(settings)).found if d.checker == "games"] == []
    # What is left is drawable to the last unit, and not one more.
    while (left := remaining((await client.get(f"{ADMIN}/{game['id']}", headers=admin_headers)).json())) > 0:
        await crowd_draws(client, db, settings, game["id"], 2 * left)
    assert (
        await db.fetchval("select count(*) from game_draws where game_id = $1 and position = 0", game["id"])
        == 23
    )


async def test_units_redis_was_not_told_of_are_offered_once_the_worker_retries(
    client, app, db, settings, admin_headers, monkeypatch
):
    _, (sku,) = await make_product(db, skus=[(19900, 10)])
    game = await make_game(client, admin_headers, prizes=goods(sku, 2), out_of_stock="redistribute")
    assert (await crowd_draws(client, db, settings, game["id"], 10)).count("win") == 2
    scripts = app.state.scripts

    class RedisDownForRestocks:
        def __getattr__(self, name: str):
            if name == "game_restock":

                async def fail(**_):
                    raise RedisConnectionError("Redis went away")

                return fail
            return getattr(scripts, name)

    monkeypatch.setattr(app.state, "scripts", RedisDownForRestocks())
    r = await client.put(stock_url(game["id"], 0), json={"stock": 5}, headers=admin_headers)
    monkeypatch.setattr(app.state, "scripts", scripts)
    assert r.status_code == 200, r.text  # committed: the raise stands
    assert await db.fetchval("select stock from game_prizes where game_id = $1", game["id"]) == 5
    assert await stock_of(db, sku) == 5
    # Redis offers none of the new units yet (never more than PostgreSQL committed), and
    # reconcile does not call that a difference: the restock is pending.
    assert remaining(r.json()) == 0
    assert set(await crowd_draws(client, db, settings, game["id"], 5)) == {"game.sold_out"}
    assert [d for d in (await reconcile(settings)).found if d.checker == "games"] == []
    # The worker's retry applies it, once.
    keys = Keys(settings.redis_prefix)
    assert await restore_pending(app.state.pool, scripts, keys) == 1
    assert await restore_pending(app.state.pool, scripts, keys) == 0
    outcomes = await crowd_draws(client, db, settings, game["id"], 20)
    assert outcomes.count("win") == 3
    assert await db.fetchval("select count(*) from game_draws where game_id = $1", game["id"]) == 5


async def test_rebuilds_racing_restocks_count_each_restock_once(client, app, db, settings, admin_headers):
    prizes = [{"name": "5 积分", "kind": "points", "points": 5, "weight": 1, "stock": 2}]
    game = await make_game(client, admin_headers, prizes=prizes, out_of_stock="redistribute")
    state = app.state

    async def rebuild():
        async with state.pool.acquire() as conn:
            await engine.rebuild_game(
                conn, state.redis, state.scripts, state.redis_keys, state.settings, game["id"]
            )

    raises = [
        client.put(stock_url(game["id"], 0), json={"stock": total}, headers=admin_headers)
        for total in (6, 9, 12)
    ]
    await asyncio.gather(*raises, *(rebuild() for _ in range(3)))
    game_now = (await client.get(f"{ADMIN}/{game['id']}", headers=admin_headers)).json()
    assert remaining(game_now) == 12
    assert [d for d in (await reconcile(settings)).found if d.checker == "games"] == []
    await rebuild()
    outcomes = await crowd_draws(client, db, settings, game["id"], 40)
    assert outcomes.count("win") == 12 and set(outcomes) == {"win", "game.sold_out"}


async def test_only_a_live_limited_prize_of_a_game_not_yet_over_is_raised(client, db, admin_headers):
    draft = await make_game(client, admin_headers, activate=False)
    r = await client.put(stock_url(draft["id"], 0), json={"stock": 9}, headers=admin_headers)
    assert (r.status_code, code_of(r)) == (409, "game.not_live")
    live = await make_game(client, admin_headers)  # 10 points, unlimited
    r = await client.put(stock_url(live["id"], 0), json={"stock": 9}, headers=admin_headers)
    assert (r.status_code, code_of(r)) == (409, "game.prize_unlimited")
    r = await client.post(f"{ADMIN}/{live['id']}/end", headers=admin_headers)
    assert r.status_code == 200
    r = await client.put(stock_url(live["id"], 0), json={"stock": 9}, headers=admin_headers)
    assert (r.status_code, code_of(r)) == (409, "game.not_live")
    # Still 'active' but past its end (the worker settles it): its units would never go back.
    prizes = [{"name": "5 积分", "kind": "points", "points": 5, "weight": 1, "stock": 2}]
    late = await make_game(client, admin_headers, prizes=prizes, out_of_stock="redistribute")
    await db.execute("update games set ends_at = now() - interval '1 second' where id = $1", late["id"])
    r = await client.put(stock_url(late["id"], 0), json={"stock": 9}, headers=admin_headers)
    assert (r.status_code, code_of(r)) == (409, "game.not_live")
    # A paused game is live: its stock may be raised for when it resumes.
    paused = await make_game(client, admin_headers, prizes=prizes, out_of_stock="redistribute")
    assert (await client.post(f"{ADMIN}/{paused['id']}/pause", headers=admin_headers)).status_code == 200
    r = await client.put(stock_url(paused["id"], 0), json={"stock": 4}, headers=admin_headers)
    assert r.status_code == 200 and remaining(r.json()) == 4


async def test_settling_a_restocked_goods_game_gives_back_every_unit_no_winner_holds(
    client, app, db, settings, admin_headers
):
    _, (sku,) = await make_product(db, skus=[(19900, 10)])
    game = await make_game(client, admin_headers, prizes=goods(sku, 2), out_of_stock="redistribute")
    assert (await crowd_draws(client, db, settings, game["id"], 1)).count("win") == 1
    r = await client.put(stock_url(game["id"], 0), json={"stock": 6}, headers=admin_headers)
    assert r.status_code == 200 and await stock_of(db, sku) == 4
    assert (await crowd_draws(client, db, settings, game["id"], 2)).count("win") == 2
    assert (await client.post(f"{ADMIN}/{game['id']}/end", headers=admin_headers)).status_code == 200
    assert await stock_of(db, sku) == 7  # 10 - 3 won; the 3 never won came back
    assert await db.fetchval("select held from game_prizes where game_id = $1", game["id"]) == 3


async def test_a_restock_waits_for_a_rebuild_in_progress_so_no_unit_is_offered_twice(
    client, app, db, settings, admin_headers
):
    # Had the raise committed (and reached the old hash) after the rebuild's snapshot, the units
    # it added could be won before the rewrite: the rewrite replays those draws onto a count of 0
    # (it stays 0), then applies the raise again, offering them a second time.
    prizes = [{"name": "5 积分", "kind": "points", "points": 5, "weight": 1, "stock": 2}]
    game = await make_game(client, admin_headers, prizes=prizes, out_of_stock="redistribute")
    assert (await crowd_draws(client, db, settings, game["id"], 4)).count("win") == 2
    state = app.state
    real = state.scripts
    seen: dict = {}

    class RaiseDuringRebuild:
        def __getattr__(self, name: str):
            script = getattr(real, name)
            if name != "game_warm":
                return script

            async def warm(*, keys, args):
                if args[0] == "rebuild" and "raise" not in seen:  # after the snapshot, before the rewrite
                    seen["raise"] = asyncio.create_task(
                        client.put(stock_url(game["id"], 0), json={"stock": 7}, headers=admin_headers)
                    )
                    await asyncio.sleep(0.5)
                    seen["raised_meanwhile"] = seen["raise"].done()
                    seen["won_meanwhile"] = (await crowd_draws(client, db, settings, game["id"], 8)).count(
                        "win"
                    )
                return await script(keys=keys, args=args)

            return warm

    async with state.pool.acquire() as conn:
        await engine.rebuild_game(
            conn, state.redis, RaiseDuringRebuild(), state.redis_keys, state.settings, game["id"]
        )
    r = await seen["raise"]
    assert r.status_code == 200, r.text
    assert (seen["raised_meanwhile"], seen["won_meanwhile"]) == (False, 0)
    assert remaining(r.json()) == 5
    assert (await crowd_draws(client, db, settings, game["id"], 20)).count("win") == 5
    assert await db.fetchval("select count(*) from game_draws where game_id = $1", game["id"]) == 7
    assert [d for d in (await reconcile(settings)).found if d.checker == "games"] == []

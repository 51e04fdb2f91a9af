"""Goods prizes hold their units out of SKU stock from activation: ordinary checkout cannot sell
them, a winner's claim consumes one, and settling the game gives back what no winner holds."""

from __future__ import annotations

import asyncio

from games.delivery import deliver_prizes, expire_unclaimed_goods
from shop.keys import Keys
from tests.factories import make_address, make_product, stock_of
from tests.games.test_admin import ADMIN, code_of, game_body, make_game, many_users
from tests.games.test_draw import draw


def goods(sku: int, stock: int) -> list[dict]:
    return [{"name": "蓝牙耳机", "kind": "goods", "sku_id": sku, "weight": 1, "stock": stock}]


async def checkout(client, headers: dict, sku: int, address_id: int):
    return await client.post(
        "/api/v1/orders",
        json={"items": [{"sku_id": sku, "qty": 1}], "address_id": address_id},
        headers=headers,
    )


async def win_goods(client, app, db, headers: dict, game_id: int) -> int:
    """One draw that wins the goods; returns the prize record id awaiting its claim."""
    assert (await draw(client, headers, game_id)).status_code == 201
    assert await deliver_prizes(app.state.pool) == 1
    r = await client.get("/api/v1/games/prizes", params={"status": "awaiting_claim"}, headers=headers)
    return r.json()["items"][0]["id"]


async def ledger(db, sku: int) -> list[tuple]:
    rows = await db.fetch("select delta, reason, ref from stock_ledger where sku_id = $1 order by id", sku)
    return [tuple(r) for r in rows]


async def test_activation_sets_the_goods_aside_so_checkout_cannot_sell_the_winners_units(
    client, app, db, settings, admin_headers
):
    _, (sku,) = await make_product(db, skus=[(19900, 3)])
    game = await make_game(client, admin_headers, prizes=goods(sku, 3), out_of_stock="redistribute")
    assert await stock_of(db, sku) == 0
    assert await ledger(db, sku) == [(-3, "game prize units set aside", f"game:{game['id']}")]

    (winner, winner_headers), (buyer, buyer_headers) = await many_users(db, settings, 2)
    buyer_address = await make_address(db, buyer)
    r = await checkout(client, buyer_headers, sku, buyer_address)
    assert r.status_code == 409 and code_of(r) == "stock.insufficient"

    prize_id = await win_goods(client, app, db, winner_headers, game["id"])
    address = await make_address(db, winner)
    r = await client.post(
        f"/api/v1/games/prizes/{prize_id}/claim", json={"address_id": address}, headers=winner_headers
    )
    assert r.status_code == 201, r.text
    assert r.json()["kind"] == "prize" and r.json()["status"] == "paid"
    # The claim consumed a unit set aside: SKU stock is not taken twice, the SKU counts the sale.
    assert await stock_of(db, sku) == 0
    assert await db.fetchval("select held from game_prizes where game_id = $1", game["id"]) == 2
    assert await db.fetchval("select sales from skus where id = $1", sku) == 1

    # The game ends: the two units nobody won go back to SKU stock, once.
    r = await client.post(f"{ADMIN}/{game['id']}/end", headers=admin_headers)
    assert r.status_code == 200
    assert await stock_of(db, sku) == 2
    assert (await ledger(db, sku))[1:] == [(2, "game prize units given back", f"game:{game['id']}")]
    assert await db.fetchval("select held from game_prizes where game_id = $1", game["id"]) == 0
    assert await db.fetchval("select settled_at is not null from games where id = $1", game["id"])
    assert (await checkout(client, buyer_headers, sku, buyer_address)).status_code == 201
    assert [d for d, _, _ in await ledger(db, sku)] == [-3, 2]


async def test_activation_without_the_units_in_stock_is_409_and_changes_nothing(client, db, admin_headers):
    _, (sku,) = await make_product(db, skus=[(19900, 2)])
    game = await make_game(
        client, admin_headers, activate=False, prizes=goods(sku, 3), out_of_stock="redistribute"
    )
    r = await client.post(f"{ADMIN}/{game['id']}/activate", headers=admin_headers)
    assert r.status_code == 409 and code_of(r) == "game.insufficient_stock"
    assert await stock_of(db, sku) == 2
    assert await ledger(db, sku) == []
    assert await db.fetchval("select status from games where id = $1", game["id"]) == "draft"
    assert await db.fetchval("select held from game_prizes where game_id = $1", game["id"]) == 0
    # A goods prize without a stock cannot be set aside: refused when the game is configured.
    body = game_body(
        prizes=[{"name": "耳机", "kind": "goods", "sku_id": sku, "weight": 1}], out_of_stock="redistribute"
    )
    r = await client.post(ADMIN, json=body, headers=admin_headers)
    assert r.status_code == 422 and [d["field"] for d in r.json()["error"]["details"]] == ["prizes[0].stock"]


async def test_concurrent_checkouts_and_claims_split_the_sku_exactly(
    client, app, db, settings, admin_headers
):
    _, (sku,) = await make_product(db, skus=[(19900, 5)])
    game = await make_game(client, admin_headers, prizes=goods(sku, 3), out_of_stock="redistribute")
    assert await stock_of(db, sku) == 2
    winners = await many_users(db, settings, 3)
    prizes = [await win_goods(client, app, db, headers, game["id"]) for _, headers in winners]
    buyers = await many_users(db, settings, 10)
    addresses = [await make_address(db, user_id) for user_id, _ in winners]
    claims = [
        client.post(f"/api/v1/games/prizes/{prize}/claim", json={"address_id": address}, headers=headers)
        for prize, address, (_, headers) in zip(prizes, addresses, winners, strict=True)
    ]
    buys = [checkout(client, headers, sku, await make_address(db, user_id)) for user_id, headers in buyers]
    results = await asyncio.gather(*claims, *buys)
    assert [r.status_code for r in results[:3]] == [201] * 3
    assert sorted(r.status_code for r in results[3:]) == [201] * 2 + [409] * 8
    assert await stock_of(db, sku) == 0
    assert await db.fetchval("select held from game_prizes where game_id = $1", game["id"]) == 0


async def test_a_prize_left_unclaimed_after_the_game_goes_back_to_sku_stock(
    client, app, db, settings, admin_headers
):
    _, (sku,) = await make_product(db, skus=[(19900, 4)])
    game = await make_game(client, admin_headers, prizes=goods(sku, 2), out_of_stock="redistribute")
    [(_, headers)] = await many_users(db, settings, 1)
    prize_id = await win_goods(client, app, db, headers, game["id"])
    assert (await client.post(f"{ADMIN}/{game['id']}/end", headers=admin_headers)).status_code == 200
    # Settled: the unit nobody won is back; the winner's unit stays set aside for the claim window.
    assert await stock_of(db, sku) == 3
    await db.execute(
        "update prize_deliveries set claim_deadline = now() - interval '1 second' where id = $1", prize_id
    )
    keys = Keys(settings.redis_prefix)
    assert await expire_unclaimed_goods(app.state.pool, app.state.scripts, keys) == 1
    assert await stock_of(db, sku) == 4
    assert await db.fetchval("select held from game_prizes where game_id = $1", game["id"]) == 0
    assert [d for d, _, _ in await ledger(db, sku)] == [-2, 1, 1]

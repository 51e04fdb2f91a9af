"""Merchant game configuration, status, odds and the shopper's game page (real PostgreSQL and Redis)."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

from shop.auth_tokens import AUD_SHOPPER, issue_access_token
from tests.factories import make_product

ADMIN = "/api/v1/admin/games"


def at(**delta) -> str:
    return (datetime.now(UTC) + timedelta(**delta)).isoformat()


def code_of(r) -> str:
    return r.json()["error"]["code"]


THANKS = {"name": "谢谢参与", "kind": "thanks", "weight": 90}


def game_body(**fields) -> dict:
    """A wheel open now for a day: 10 points (weight 10) or thanks (weight 90), 1 free draw a day."""
    return {
        "type": "wheel",
        "name": "幸运大转盘",
        "starts_at": at(minutes=-5),
        "ends_at": at(days=1),
        "prizes": [{"name": "10 积分", "kind": "points", "points": 10, "weight": 10}, THANKS],
        **fields,
    }


async def make_game(client, admin_headers, *, activate: bool = True, **fields) -> dict:
    r = await client.post(ADMIN, json=game_body(**fields), headers=admin_headers)
    assert r.status_code == 201, r.text
    game = r.json()
    if activate:
        r = await client.post(f"{ADMIN}/{game['id']}/activate", headers=admin_headers)
        assert r.status_code == 200, r.text
        game = r.json()
    return game


async def many_users(db, settings, n: int) -> list[tuple[int, dict]]:
    """n shoppers in one statement (fast), with their auth headers."""
    rows = await db.fetch(
        "insert into users (nickname) select 'g' || g from generate_series(1, $1) g returning id", n
    )
    return [
        (r["id"], {"Authorization": f"Bearer {issue_access_token(settings, r['id'], AUD_SHOPPER)}"})
        for r in rows
    ]


async def coupon_template(db, *, status: str = "active") -> int:
    return await db.fetchval(
        """insert into coupon_templates (name, kind, amount, validity, valid_days, status, is_public)
           values ('游戏券 5 元', 'no_threshold', 500, 'relative', 7, $1, false) returning id""",
        status,
    )


async def test_merchant_creates_edits_and_publishes_a_game_with_every_prize_kind(client, db, admin_headers):
    template = await coupon_template(db)
    _, (sku,) = await make_product(db, skus=[(5900, 10)])
    prizes = [
        {"name": "5 元券", "kind": "coupon", "coupon_template_id": template, "weight": 20, "stock": 100},
        {"name": "50 积分", "kind": "points", "points": 50, "weight": 30, "per_user_cap": 2},
        {"name": "蓝牙耳机", "kind": "goods", "sku_id": sku, "weight": 1, "stock": 3},
        {**THANKS, "weight": 49},
    ]
    r = await client.post(
        ADMIN, json=game_body(prizes=prizes, pity_after=5, pity_position=1), headers=admin_headers
    )
    assert r.status_code == 201, r.text
    game = r.json()
    assert game["status"] == "draft" and game["weights_version"] == 1
    assert [p["position"] for p in game["prizes"]] == [0, 1, 2, 3]
    assert game["prizes"][2]["sku_id"] == sku and game["prizes"][0]["remaining"] is None

    # A draft is edited freely (the weights version moves); a published game is frozen.
    r = await client.put(
        f"{ADMIN}/{game['id']}", json=game_body(prizes=prizes, name="新名字"), headers=admin_headers
    )
    assert r.status_code == 200 and r.json()["name"] == "新名字" and r.json()["weights_version"] == 2
    r = await client.post(f"{ADMIN}/{game['id']}/activate", headers=admin_headers)
    assert r.status_code == 200 and r.json()["status"] == "active"
    assert [p["remaining"] for p in r.json()["prizes"]] == [100, None, 3, None]
    r = await client.put(f"{ADMIN}/{game['id']}", json=game_body(prizes=prizes), headers=admin_headers)
    assert r.status_code == 409 and code_of(r) == "game.live"

    r = await client.post(f"{ADMIN}/{game['id']}/pause", headers=admin_headers)
    assert r.status_code == 200 and r.json()["status"] == "paused"
    r = await client.post(f"{ADMIN}/{game['id']}/pause", headers=admin_headers)
    assert r.status_code == 409 and code_of(r) == "game.illegal_transition"
    r = await client.post(f"{ADMIN}/{game['id']}/end", headers=admin_headers)
    assert r.status_code == 200 and r.json()["status"] == "ended"

    r = await client.get(ADMIN, params={"limit": 1}, headers=admin_headers)
    assert r.status_code == 200 and [g["id"] for g in r.json()["items"]] == [game["id"]]
    assert r.json()["next_cursor"] is None
    r = await client.get(f"{ADMIN}/{game['id']}", headers=admin_headers)
    assert r.status_code == 200 and r.json()["pity_after"] is None


async def test_invalid_games_are_422_with_details(client, db, admin_headers):
    cases = [
        ({"starts_at": at(days=2)}, "ends_at"),
        ({"prizes": [{"name": "x", "kind": "points", "weight": 1}, THANKS]}, "prizes[0].points"),
        ({"prizes": [{"name": "x", "kind": "thanks", "weight": 1, "points": 5}]}, "prizes[0].points"),
        ({"prizes": [{"name": "x", "kind": "coupon", "coupon_template_id": 999999, "weight": 1}, THANKS]},
         "prizes[0].coupon_template_id"),
        ({"prizes": [{"name": "x", "kind": "points", "points": 5, "weight": 1}]}, "prizes"),
        ({"pity_after": 3}, "pity_position"),
        ({"pity_after": 3, "pity_position": 1}, "pity_position"),
    ]  # fmt: skip
    for fields, field in cases:
        r = await client.post(ADMIN, json=game_body(**fields), headers=admin_headers)
        assert r.status_code == 422, (fields, r.text)
        assert field in [d["field"] for d in r.json()["error"]["details"]], (fields, r.json())
    r = await client.post(ADMIN, json={**game_body(), "weight_of_luck": 1}, headers=admin_headers)
    assert r.status_code == 422
    r = await client.post(
        ADMIN, json=game_body(prizes=[{"name": "x", "kind": "thanks", "weight": 0}]), headers=admin_headers
    )
    assert r.status_code == 422
    assert await db.fetchval("select count(*) from games") == 0


async def test_admin_routes_need_a_merchant_and_unknown_games_are_404(client, make_user, admin_headers):
    _, shopper = await make_user()
    assert (await client.post(ADMIN, json=game_body())).status_code == 401
    assert (await client.post(ADMIN, json=game_body(), headers=shopper)).status_code in (401, 403)
    assert (await client.get(f"{ADMIN}/999", headers=admin_headers)).status_code == 404
    r = await client.put(f"{ADMIN}/999", json=game_body(), headers=admin_headers)
    assert r.status_code == 404 and code_of(r) == "game.not_found"
    assert (await client.post(f"{ADMIN}/999/activate", headers=admin_headers)).status_code == 404
    assert (await client.post(f"{ADMIN}/999/explode", headers=admin_headers)).status_code == 404
    assert (await client.get(f"{ADMIN}/999/stats", headers=admin_headers)).status_code == 404


async def test_odds_are_published_from_the_weights_and_drafts_stay_hidden(client, make_user, admin_headers):
    _, headers = await make_user()
    draft = await make_game(client, admin_headers, activate=False)
    assert (await client.get(f"/api/v1/games/{draft['id']}/odds")).status_code == 404
    assert (await client.get(f"/api/v1/games/{draft['id']}", headers=headers)).status_code == 404
    game = await make_game(client, admin_headers)
    r = await client.get(f"/api/v1/games/{game['id']}/odds")
    assert r.status_code == 200
    odds = r.json()
    assert [(o["position"], o["probability"]) for o in odds["items"]] == [(0, 0.1), (1, 0.9)]
    assert odds["weights_version"] == game["weights_version"] and odds["out_of_stock"] == "thanks"

    r = await client.get(f"/api/v1/games/{game['id']}", headers=headers)
    assert r.status_code == 200
    view = r.json()
    assert view["free_left_today"] == 1 and view["eggs"] is None
    assert "weight" not in view["prizes"][0] and view["prizes"][0]["name"] == "10 积分"
    assert (await client.get(f"/api/v1/games/{game['id']}")).status_code == 401

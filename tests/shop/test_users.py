"""The shopper's profile and shipping addresses."""

from __future__ import annotations

import asyncio

import pytest

from shop.errors import NotFound
from shop.users import MAX_ADDRESSES, get_address_snapshot

ADDRESS = {
    "receiver": "张三",
    "phone": "13800138000",
    "province": "广东省",
    "city": "深圳市",
    "district": "南山区",
    "detail": "科技园南区 1 栋 101",
}


async def add(client, headers, **changes):
    return await client.post("/api/v1/me/addresses", json={**ADDRESS, **changes}, headers=headers)


async def insert_addresses(db, user_id: int, count: int) -> None:
    await db.executemany(
        """insert into addresses (user_id, receiver, phone, province, city, detail)
           values ($1, 'r', '13900000000', 'p', 'c', 'd')""",
        [(user_id,)] * count,
    )


# --- profile -----------------------------------------------------------------------------------


async def test_me_shows_the_profile(client, make_user):
    user_id, headers = await make_user("阿花")
    r = await client.get("/api/v1/me", headers=headers)
    assert r.status_code == 200
    body = r.json()
    assert body["id"] == user_id
    assert (body["nickname"], body["avatar_url"], body["phone"]) == ("阿花", "", None)
    assert body["created_at"]
    assert (await client.get("/api/v1/me")).status_code == 401


async def test_patch_me_changes_only_what_is_sent(client, db, make_user):
    user_id, headers = await make_user("old")
    r = await client.patch("/api/v1/me", json={"nickname": "新名字"}, headers=headers)
    assert r.status_code == 200
    assert r.json()["nickname"] == "新名字"
    avatar = "https://thirdwx.qlogo.cn/mmopen/abc/132"
    r = await client.patch("/api/v1/me", json={"avatar_url": avatar}, headers=headers)
    assert (r.json()["nickname"], r.json()["avatar_url"]) == ("新名字", avatar)
    row = await db.fetchrow("select nickname, avatar_url from users where id = $1", user_id)
    assert (row["nickname"], row["avatar_url"]) == ("新名字", avatar)
    # "" clears the avatar; an empty body changes nothing.
    assert (await client.patch("/api/v1/me", json={"avatar_url": ""}, headers=headers)).json()[
        "avatar_url"
    ] == ""
    assert (await client.patch("/api/v1/me", json={}, headers=headers)).json()["nickname"] == "新名字"
    assert (await client.patch("/api/v1/me", json={"nickname": "x"})).status_code == 401


@pytest.mark.parametrize(
    "body",
    [
        {"nickname": ""},
        {"nickname": "   "},
        {"nickname": "x" * 65},
        {"nickname": "line\nbreak"},
        {"nickname": "ok\n"},
        {"avatar_url": "javascript:alert(1)"},
        {"avatar_url": "https://x/" + "a" * 1020},
        {"phone": "13800138000"},
        {"id": 2},
    ],
)
async def test_patch_me_validates(client, db, make_user, body):
    user_id, headers = await make_user("same")
    r = await client.patch("/api/v1/me", json=body, headers=headers)
    assert r.status_code == 422, r.text
    assert r.json()["error"]["code"] == "validation_failed"
    row = await db.fetchrow("select nickname, phone from users where id = $1", user_id)
    assert (row["nickname"], row["phone"]) == ("same", None)


# --- addresses ---------------------------------------------------------------------------------


async def test_first_address_is_the_default_and_a_new_default_replaces_it(client, db, make_user):
    user_id, headers = await make_user()
    first = await add(client, headers, postal_code="518057")
    assert first.status_code == 201, first.text
    body = first.json()
    assert {k: body[k] for k in ADDRESS} == ADDRESS
    assert body["postal_code"] == "518057" and body["is_default"] is True

    second = (await add(client, headers, receiver="李四")).json()
    assert second["is_default"] is False and second["postal_code"] is None
    third = (await add(client, headers, receiver="王五", is_default=True)).json()
    assert third["is_default"] is True
    defaults = await db.fetch("select id from addresses where user_id = $1 and is_default", user_id)
    assert [r["id"] for r in defaults] == [third["id"]]

    listed = await client.get("/api/v1/me/addresses", headers=headers)
    assert listed.status_code == 200
    assert [a["id"] for a in listed.json()["items"]] == [third["id"], second["id"], body["id"]]
    assert listed.json()["next_cursor"] is None

    one = await client.get(f"/api/v1/me/addresses/{second['id']}", headers=headers)
    assert one.status_code == 200
    assert one.json() == second


async def test_district_may_be_empty_for_cities_without_districts(client, make_user):
    _, headers = await make_user()
    r = await add(client, headers, province="广东省", city="东莞市", district="")
    assert r.status_code == 201
    body = dict(ADDRESS)
    del body["district"]
    r = await client.post("/api/v1/me/addresses", json=body, headers=headers)
    assert r.status_code == 201
    assert r.json()["district"] == ""


@pytest.mark.parametrize(
    ("change", "field"),
    [
        ({"phone": "12345678901"}, "phone"),
        ({"phone": "1380013800"}, "phone"),
        ({"phone": "13800138000\n"}, "phone"),
        ({"phone": "+8613800138000"}, "phone"),
        ({"receiver": ""}, "receiver"),
        ({"receiver": "x" * 33}, "receiver"),
        ({"detail": " "}, "detail"),
        ({"detail": "x" * 201}, "detail"),
        ({"province": ""}, "province"),
        ({"postal_code": "51805"}, "postal_code"),
        ({"user_id": 1}, None),
        ({"receiver": None}, "receiver"),
    ],
)
async def test_address_validation(client, db, make_user, change, field):
    _, headers = await make_user()
    r = await add(client, headers, **change)
    assert r.status_code == 422, r.text
    error = r.json()["error"]
    assert error["code"] == "validation_failed"
    if field:
        assert error["details"][0]["field"] == field
    else:
        assert "unknown field `user_id`" in error["message"]
    assert await db.fetchval("select count(*) from addresses") == 0


async def test_missing_required_address_field_is_422(client, make_user):
    _, headers = await make_user()
    body = dict(ADDRESS)
    del body["receiver"]
    r = await client.post("/api/v1/me/addresses", json=body, headers=headers)
    assert r.status_code == 422


async def test_addresses_need_a_shopper_token(client, admin_headers):
    assert (await client.get("/api/v1/me/addresses")).status_code == 401
    assert (await client.post("/api/v1/me/addresses", json=ADDRESS)).status_code == 401
    assert (await client.get("/api/v1/me/addresses", headers=admin_headers)).status_code == 401


async def test_a_shopper_cannot_see_or_touch_another_shoppers_address(client, db, make_user):
    _, owner = await make_user("owner")
    _, other = await make_user("other")
    address = (await add(client, owner)).json()
    path = f"/api/v1/me/addresses/{address['id']}"

    assert (await client.get("/api/v1/me/addresses", headers=other)).json()["items"] == []
    for r in (
        await client.get(path, headers=other),
        await client.patch(path, json={"receiver": "hijack"}, headers=other),
        await client.patch(path, json={"is_default": True}, headers=other),
        await client.delete(path, headers=other),
    ):
        assert r.status_code == 404
        assert r.json()["error"]["code"] == "address.not_found"
    row = await db.fetchrow("select receiver, is_default from addresses where id = $1", address["id"])
    assert (row["receiver"], row["is_default"]) == (ADDRESS["receiver"], True)


async def test_unknown_address_ids_are_404(client, make_user):
    _, headers = await make_user()
    for address_id in (1, 999_999, 2**63, 10**30):
        r = await client.get(f"/api/v1/me/addresses/{address_id}", headers=headers)
        assert r.status_code == 404, address_id
        assert r.json()["error"]["code"] == "address.not_found"
    r = await client.get("/api/v1/me/addresses/abc", headers=headers)
    assert r.status_code in (404, 422)


async def test_patch_address_changes_only_what_is_sent(client, db, make_user):
    _, headers = await make_user()
    first = (await add(client, headers)).json()
    second = (await add(client, headers, receiver="李四")).json()
    path = f"/api/v1/me/addresses/{second['id']}"

    r = await client.patch(path, json={"detail": "新地址 8 号", "postal_code": "100000"}, headers=headers)
    assert r.status_code == 200, r.text
    changed = r.json()
    assert (changed["detail"], changed["postal_code"], changed["receiver"]) == (
        "新地址 8 号",
        "100000",
        "李四",
    )
    assert changed["updated_at"] > second["updated_at"]
    # null clears the optional postal code; leaving it out keeps it.
    assert (await client.patch(path, json={"city": "广州市"}, headers=headers)).json()[
        "postal_code"
    ] == "100000"
    assert (await client.patch(path, json={"postal_code": None}, headers=headers)).json()[
        "postal_code"
    ] is None

    r = await client.patch(path, json={"is_default": True}, headers=headers)
    assert r.json()["is_default"] is True
    defaults = await db.fetch("select id from addresses where is_default")
    assert [d["id"] for d in defaults] == [second["id"]]
    assert (await client.get(f"/api/v1/me/addresses/{first['id']}", headers=headers)).json()[
        "is_default"
    ] is False

    for body in ({"phone": "110"}, {"receiver": ""}, {"owner": 1}, {"detail": None}):
        r = await client.patch(path, json=body, headers=headers)
        assert r.status_code == 422, body


async def test_delete_address_and_default_promotion(client, db, make_user):
    user_id, headers = await make_user()
    oldest = (await add(client, headers, receiver="a")).json()
    middle = (await add(client, headers, receiver="b")).json()
    newest = (await add(client, headers, receiver="c")).json()
    # Touch the middle one last: "most recently updated" decides, not the id.
    await client.patch(f"/api/v1/me/addresses/{middle['id']}", json={"detail": "edited"}, headers=headers)

    r = await client.delete(f"/api/v1/me/addresses/{oldest['id']}", headers=headers)
    assert r.status_code == 204
    assert (await client.get(f"/api/v1/me/addresses/{oldest['id']}", headers=headers)).status_code == 404
    assert (await client.delete(f"/api/v1/me/addresses/{oldest['id']}", headers=headers)).status_code == 404
    defaults = await db.fetch("select id from addresses where user_id = $1 and is_default", user_id)
    assert [d["id"] for d in defaults] == [middle["id"]]

    # Deleting a non-default leaves the default alone.
    assert (await client.delete(f"/api/v1/me/addresses/{newest['id']}", headers=headers)).status_code == 204
    assert await db.fetchval("select id from addresses where is_default") == middle["id"]
    assert (await client.delete(f"/api/v1/me/addresses/{middle['id']}", headers=headers)).status_code == 204
    assert await db.fetchval("select count(*) from addresses") == 0


async def test_address_limit(client, db, make_user):
    user_id, headers = await make_user()
    await insert_addresses(db, user_id, MAX_ADDRESSES - 1)
    assert (await add(client, headers)).status_code == 201
    r = await add(client, headers)
    assert r.status_code == 409
    assert r.json()["error"]["code"] == "address.limit_reached"
    assert await db.fetchval("select count(*) from addresses where user_id = $1", user_id) == MAX_ADDRESSES
    # Another shopper has their own 20.
    _, other = await make_user("other")
    assert (await add(client, other)).status_code == 201


async def test_address_limit_holds_under_concurrent_adds(client, db, make_user):
    user_id, headers = await make_user()
    await insert_addresses(db, user_id, MAX_ADDRESSES - 3)
    responses = await asyncio.gather(*(add(client, headers, is_default=True) for _ in range(8)))
    statuses = sorted(r.status_code for r in responses)
    assert statuses == [201] * 3 + [409] * 5, [r.text for r in responses]
    assert await db.fetchval("select count(*) from addresses where user_id = $1", user_id) == MAX_ADDRESSES
    assert await db.fetchval("select count(*) from addresses where user_id = $1 and is_default", user_id) == 1


async def test_concurrent_default_changes_leave_one_default(client, db, make_user):
    user_id, headers = await make_user()
    ids = [(await add(client, headers, receiver=f"r{i}")).json()["id"] for i in range(5)]
    responses = await asyncio.gather(
        *(client.patch(f"/api/v1/me/addresses/{i}", json={"is_default": True}, headers=headers) for i in ids)
    )
    assert all(r.status_code == 200 for r in responses), [r.text for r in responses]
    assert await db.fetchval("select count(*) from addresses where user_id = $1 and is_default", user_id) == 1


async def test_get_address_snapshot_is_the_owners_only(client, db, make_user):
    user_id, headers = await make_user()
    other_id, _ = await make_user("other")
    address = (await add(client, headers, postal_code="518057")).json()
    snapshot = await get_address_snapshot(db, user_id, address["id"])
    assert snapshot == {**ADDRESS, "postal_code": "518057"}
    with pytest.raises(NotFound) as info:
        await get_address_snapshot(db, other_id, address["id"])
    assert info.value.code == "address.not_found"

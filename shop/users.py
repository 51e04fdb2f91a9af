"""The shopper's own profile and shipping addresses.

Address writes lock the shopper's users row first, so the 20-address limit and the single default
hold under concurrent requests. The first address becomes the default; deleting the default makes
the most recently updated remaining address the default, so checkout can always pre-fill one.
"""

from __future__ import annotations

from datetime import datetime
from typing import Annotated

import asyncpg
import msgspec
from litestar import Controller, delete, get, patch, post
from msgspec import UNSET, UnsetType

from shop.auth_tokens import AuthUser
from shop.errors import Conflict, NotFound
from shop.schemas import Page, Schema

MAX_ADDRESSES = 20
MAX_ID = 2**63 - 1

# Printable text with at least one non-space character. `\Z`, not `$`: `$` also matches before a
# trailing newline.
TEXT = r"^[^\x00-\x1f\x7f]*[^\s\x00-\x1f\x7f][^\x00-\x1f\x7f]*\Z"
Nickname = Annotated[str, msgspec.Meta(min_length=1, max_length=64, pattern=TEXT)]
AvatarUrl = Annotated[str, msgspec.Meta(max_length=1024, pattern=r"^(https?://[^\s\x00-\x1f\x7f]+)?\Z")]
Receiver = Annotated[str, msgspec.Meta(min_length=1, max_length=32, pattern=TEXT)]
# Mainland China mobile numbers, as WeChat's chooseAddress returns them.
MobilePhone = Annotated[str, msgspec.Meta(min_length=11, max_length=11, pattern=r"^1[3-9][0-9]{9}\Z")]
RegionName = Annotated[str, msgspec.Meta(min_length=1, max_length=32, pattern=TEXT)]
District = Annotated[str, msgspec.Meta(max_length=32, pattern=r"^[^\x00-\x1f\x7f]*\Z")]
Detail = Annotated[str, msgspec.Meta(min_length=1, max_length=200, pattern=TEXT)]
PostalCode = Annotated[str, msgspec.Meta(pattern=r"^[0-9]{6}\Z")]


class Me(Schema):
    id: int
    nickname: str
    avatar_url: str
    phone: str | None
    created_at: datetime


class MeUpdate(Schema):
    nickname: Nickname | UnsetType = UNSET
    avatar_url: AvatarUrl | UnsetType = UNSET  # "" clears it


class AddressIn(Schema):
    receiver: Receiver
    phone: MobilePhone
    province: RegionName
    city: RegionName
    detail: Detail
    district: District = ""
    postal_code: PostalCode | None = None
    is_default: bool = False


class AddressUpdate(Schema):
    receiver: Receiver | UnsetType = UNSET
    phone: MobilePhone | UnsetType = UNSET
    province: RegionName | UnsetType = UNSET
    city: RegionName | UnsetType = UNSET
    district: District | UnsetType = UNSET
    detail: Detail | UnsetType = UNSET
    postal_code: PostalCode | UnsetType | None = UNSET
    is_default: bool | UnsetType = UNSET


class Address(Schema):
    id: int
    receiver: str
    phone: str
    province: str
    city: str
    district: str
    detail: str
    postal_code: str | None
    is_default: bool
    created_at: datetime
    updated_at: datetime


class AddressList(Page):
    items: list[Address]
    next_cursor: str | None = None


# --- SQL ---------------------------------------------------------------------------------------

SELECT_ME = "select id, nickname, avatar_url, phone, created_at from users where id = $1"
UPDATE_ME = """
update users set nickname = coalesce($2, nickname), avatar_url = coalesce($3, avatar_url), updated_at = now()
where id = $1
returning id, nickname, avatar_url, phone, created_at
"""
LOCK_SHOPPER = "select id from users where id = $1 for update"
ADDRESS_COLUMNS = (
    "id, receiver, phone, province, city, district, detail, postal_code, is_default, created_at, updated_at"
)
SELECT_ADDRESSES = f"""
select {ADDRESS_COLUMNS} from addresses where user_id = $1 order by is_default desc, id desc
"""
SELECT_ADDRESS = f"select {ADDRESS_COLUMNS} from addresses where id = $1 and user_id = $2"
COUNT_ADDRESSES = "select count(*) from addresses where user_id = $1"
CLEAR_DEFAULT = "update addresses set is_default = false where user_id = $1 and is_default and id <> $2"
INSERT_ADDRESS = f"""
insert into addresses (user_id, receiver, phone, province, city, district, detail, postal_code, is_default)
values ($1, $2, $3, $4, $5, $6, $7, $8, $9)
returning {ADDRESS_COLUMNS}
"""
# $9 says whether postal_code was sent at all, since null is a value it can be set to.
UPDATE_ADDRESS = f"""
update addresses set
    receiver = coalesce($3, receiver),
    phone = coalesce($4, phone),
    province = coalesce($5, province),
    city = coalesce($6, city),
    district = coalesce($7, district),
    detail = coalesce($8, detail),
    postal_code = case when $9 then $10 else postal_code end,
    is_default = coalesce($11, is_default),
    updated_at = now()
where id = $1 and user_id = $2
returning {ADDRESS_COLUMNS}
"""
DELETE_ADDRESS = "delete from addresses where id = $1 and user_id = $2 returning is_default"
PROMOTE_LATEST_ADDRESS = """
update addresses set is_default = true where id = (
    select id from addresses where user_id = $1 order by updated_at desc, id desc limit 1
)
"""
SELECT_ADDRESS_SNAPSHOT = """
select receiver, phone, province, city, district, detail, postal_code
from addresses where id = $1 and user_id = $2
"""


# --- data functions ----------------------------------------------------------------------------


def _address_not_found() -> NotFound:
    return NotFound("No such address", code="address.not_found")


def _check_id(address_id: int) -> None:
    # Path ids beyond bigint would make asyncpg raise; they cannot exist anyway.
    if not 1 <= address_id <= MAX_ID:
        raise _address_not_found()


def _unset_to_none(value: object) -> object:
    return None if value is UNSET else value


async def lock_shopper(conn: asyncpg.Connection, user_id: int) -> None:
    """Lock the shopper's users row: every address write of one shopper goes through it, one at a time."""
    if await conn.fetchval(LOCK_SHOPPER, user_id) is None:
        raise NotFound("No such shopper", code="user.not_found")


async def get_address_snapshot(conn: asyncpg.Connection, user_id: int, address_id: int) -> dict:
    """The shopper's address as an order keeps it: receiver, phone, province, city, district, detail, postal_code."""
    _check_id(address_id)
    row = await conn.fetchrow(SELECT_ADDRESS_SNAPSHOT, address_id, user_id)
    if row is None:
        raise _address_not_found()
    return dict(row)


# --- services ----------------------------------------------------------------------------------


async def get_me(conn: asyncpg.Connection, user_id: int) -> Me:
    row = await conn.fetchrow(SELECT_ME, user_id)
    if row is None:
        raise NotFound("No such shopper", code="user.not_found")
    return Me(**row)


async def update_me(conn: asyncpg.Connection, user_id: int, data: MeUpdate) -> Me:
    row = await conn.fetchrow(
        UPDATE_ME, user_id, _unset_to_none(data.nickname), _unset_to_none(data.avatar_url)
    )
    if row is None:
        raise NotFound("No such shopper", code="user.not_found")
    return Me(**row)


async def list_addresses(conn: asyncpg.Connection, user_id: int) -> list[Address]:
    return [Address(**row) for row in await conn.fetch(SELECT_ADDRESSES, user_id)]


async def get_address(conn: asyncpg.Connection, user_id: int, address_id: int) -> Address:
    _check_id(address_id)
    row = await conn.fetchrow(SELECT_ADDRESS, address_id, user_id)
    if row is None:
        raise _address_not_found()
    return Address(**row)


async def create_address(conn: asyncpg.Connection, user_id: int, data: AddressIn) -> Address:
    """Add an address (at most MAX_ADDRESSES); the first one, or one sent with is_default, is the default."""
    async with conn.transaction():
        await lock_shopper(conn, user_id)
        count = await conn.fetchval(COUNT_ADDRESSES, user_id)
        if count >= MAX_ADDRESSES:
            raise Conflict(f"At most {MAX_ADDRESSES} addresses per shopper", code="address.limit_reached")
        is_default = data.is_default or count == 0
        if is_default:
            await conn.execute(CLEAR_DEFAULT, user_id, 0)  # 0: no address keeps its flag
        row = await conn.fetchrow(
            INSERT_ADDRESS,
            user_id,
            data.receiver,
            data.phone,
            data.province,
            data.city,
            data.district,
            data.detail,
            data.postal_code,
            is_default,
        )
    return Address(**row)


async def update_address(
    conn: asyncpg.Connection, user_id: int, address_id: int, data: AddressUpdate
) -> Address:
    """Change some fields; is_default=true takes the default from the previous one."""
    _check_id(address_id)
    async with conn.transaction():
        await lock_shopper(conn, user_id)
        if data.is_default is True:
            await conn.execute(CLEAR_DEFAULT, user_id, address_id)
        row = await conn.fetchrow(
            UPDATE_ADDRESS,
            address_id,
            user_id,
            _unset_to_none(data.receiver),
            _unset_to_none(data.phone),
            _unset_to_none(data.province),
            _unset_to_none(data.city),
            _unset_to_none(data.district),
            _unset_to_none(data.detail),
            data.postal_code is not UNSET,
            _unset_to_none(data.postal_code),
            _unset_to_none(data.is_default),
        )
        if row is None:
            raise _address_not_found()  # rolls back the cleared default too
    return Address(**row)


async def delete_address(conn: asyncpg.Connection, user_id: int, address_id: int) -> None:
    """Delete an address; if it was the default, the most recently updated remaining one takes over."""
    _check_id(address_id)
    async with conn.transaction():
        await lock_shopper(conn, user_id)
        was_default = await conn.fetchval(DELETE_ADDRESS, address_id, user_id)
        if was_default is None:
            raise _address_not_found()
        if was_default:
            await conn.execute(PROMOTE_LATEST_ADDRESS, user_id)


# --- routes ------------------------------------------------------------------------------------


class MeController(Controller):
    path = "/api/v1/me"
    tags = ["me"]

    @get("/")
    async def show_me(self, conn: asyncpg.Connection, user: AuthUser) -> Me:
        """The logged-in shopper's profile."""
        return await get_me(conn, user.id)

    @patch("/")
    async def edit_me(self, conn: asyncpg.Connection, user: AuthUser, data: MeUpdate) -> Me:
        """Change nickname and/or avatar."""
        return await update_me(conn, user.id, data)

    @get("/addresses")
    async def addresses(self, conn: asyncpg.Connection, user: AuthUser) -> AddressList:
        """Every address of the shopper (at most 20, so always one page), the default first."""
        return AddressList(items=await list_addresses(conn, user.id))

    @post("/addresses")
    async def add_address(self, conn: asyncpg.Connection, user: AuthUser, data: AddressIn) -> Address:
        """Add a shipping address."""
        return await create_address(conn, user.id, data)

    @get("/addresses/{address_id:int}")
    async def show_address(self, conn: asyncpg.Connection, user: AuthUser, address_id: int) -> Address:
        """One of the shopper's addresses."""
        return await get_address(conn, user.id, address_id)

    @patch("/addresses/{address_id:int}")
    async def edit_address(
        self, conn: asyncpg.Connection, user: AuthUser, address_id: int, data: AddressUpdate
    ) -> Address:
        """Change an address."""
        return await update_address(conn, user.id, address_id, data)

    @delete("/addresses/{address_id:int}")
    async def remove_address(self, conn: asyncpg.Connection, user: AuthUser, address_id: int) -> None:
        """Delete an address."""
        await delete_address(conn, user.id, address_id)

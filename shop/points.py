"""Points: a per-shopper balance kept as an append-only ledger (the currency draws cost and prizes pay).

Every change is one `points_entries` row, unique per (kind, ref), written under the shopper's
account row lock: a repeated earn/spend/reversal with the same reference is a no-op, and the
balance can never go below zero (a conditional check under the lock, plus `CHECK (balance >= 0)`).
A refund reversal that finds the points already spent takes what is there and leaves the rest
as a debt; later earnings repay the debt first.
"""

from __future__ import annotations

from datetime import datetime
from typing import Annotated, Any, Literal

import asyncpg
import msgspec
from litestar import Controller, get, put

from shop.auth_tokens import AuthAdmin, AuthUser, admin_guard
from shop.errors import Conflict
from shop.events import OrderEvent, on_order_event
from shop.pagination import DEFAULT_LIMIT, Limit, decode_id_cursor, encode_cursor
from shop.schemas import Schema

EntryKind = Literal["prize", "order", "draw", "draw_refund", "refund_reversal", "adjust"]


class PointsEntry(Schema):
    id: int
    kind: EntryKind
    ref: str
    amount: int
    balance_delta: int
    debt_delta: int
    balance_after: int
    created_at: datetime


class PointsOut(Schema):
    balance: int
    debt: int
    items: list[PointsEntry]
    next_cursor: str | None = None


class PointsRule(Schema):
    points_per_yuan: Annotated[int, msgspec.Meta(ge=0, le=1000)]


DEFAULT_POINTS_PER_YUAN = 1  # the migration's default, when the rule row is missing
ENTRY_FIELDS = "id, kind, ref, amount, balance_delta, debt_delta, balance_after, created_at"


# ---------------------------------------------------------------- the ledger


async def _post(
    conn: asyncpg.Connection,
    user_id: int,
    kind: str,
    ref: str,
    amount: int,
    mode: str,
    basis: int | None = None,
) -> PointsEntry | None:
    """One ledger entry under the account row lock; None when (kind, ref) was already posted."""
    if amount <= 0:
        raise ValueError("points amounts are positive; the mode gives the direction")
    async with conn.transaction():
        # The upsert locks the shopper's row: entries of one shopper are applied one at a time.
        account = await conn.fetchrow(
            """insert into points_accounts (user_id) values ($1)
               on conflict (user_id) do update set updated_at = now() returning balance, debt""",
            user_id,
        )
        if await conn.fetchval("select 1 from points_entries where kind = $1 and ref = $2", kind, ref):
            return None
        balance, debt = account["balance"], account["debt"]
        if mode == "earn":
            repay = min(debt, amount)
            balance_delta, debt_delta, signed = amount - repay, -repay, amount
        elif mode == "spend":
            if balance < amount:
                raise Conflict(f"{amount} points needed, {balance} available", code="points.insufficient")
            balance_delta, debt_delta, signed = -amount, 0, -amount
        else:  # reverse: take back what is there, owe the rest
            take = min(balance, amount)
            balance_delta, debt_delta, signed = -take, amount - take, -amount
        await conn.execute(
            "update points_accounts set balance = balance + $2, debt = debt + $3 where user_id = $1",
            user_id,
            balance_delta,
            debt_delta,
        )
        row = await conn.fetchrow(
            f"""insert into points_entries (user_id, kind, ref, amount, balance_delta, debt_delta, balance_after,
                    basis)
                values ($1, $2, $3, $4, $5, $6, $7, $8) returning {ENTRY_FIELDS}""",
            user_id,
            kind,
            ref,
            signed,
            balance_delta,
            debt_delta,
            balance + balance_delta,
            basis,
        )
    return PointsEntry(**dict(row))


async def earn_points(
    conn: asyncpg.Connection, user_id: int, amount: int, *, kind: str, ref: str, basis: int | None = None
):
    """Credit points (debt is repaid first); idempotent per (kind, ref). `basis`: the fen they were
    earned on, when a later refund must take back a share of them."""
    return await _post(conn, user_id, kind, ref, amount, "earn", basis)


async def spend_points(conn: asyncpg.Connection, user_id: int, amount: int, *, kind: str, ref: str):
    """Debit points or raise 409 points.insufficient; idempotent per (kind, ref)."""
    return await _post(conn, user_id, kind, ref, amount, "spend")


async def reverse_points(conn: asyncpg.Connection, user_id: int, amount: int, *, kind: str, ref: str):
    """Take points back (a refund): what the balance lacks becomes debt; idempotent per (kind, ref)."""
    return await _post(conn, user_id, kind, ref, amount, "reverse")


async def points_balance(conn: asyncpg.Connection, user_id: int) -> tuple[int, int]:
    row = await conn.fetchrow("select balance, debt from points_accounts where user_id = $1", user_id)
    return (row["balance"], row["debt"]) if row else (0, 0)


async def points_per_yuan(conn: asyncpg.Connection) -> int:
    rate = await conn.fetchval("select points_per_yuan from points_rule where id = 1")
    return DEFAULT_POINTS_PER_YUAN if rate is None else rate


# ---------------------------------------------------------------- order events


# Both handlers lock the order row first, so one order's earning and reversals are worked out one
# at a time, each on the order as it is then (refunded_amount already counts every finished
# refund): the result does not depend on the order the events are delivered in.
LOCKED_ORDER = "select user_id, kind, paid_amount, refunded_amount from orders where id = $1 for update"


@on_order_event("order.completed", "points.earn_on_completion")
async def earn_on_completion(conn: asyncpg.Connection, event: OrderEvent, ctx: Any) -> None:
    """Points for what the shopper paid and kept, at the configured rate, once per order."""
    order = await conn.fetchrow(LOCKED_ORDER, event.order_id)
    if order is None or order["kind"] == "prize":
        return
    kept = order["paid_amount"] - order["refunded_amount"]
    points = kept // 100 * await points_per_yuan(conn)
    if points > 0:
        await earn_points(
            conn, order["user_id"], points, kind="order", ref=f"order:{event.order_id}", basis=kept
        )


@on_order_event("order.refunded", "points.reverse_on_refund")
async def reverse_on_refund(conn: asyncpg.Connection, event: OrderEvent, ctx: Any) -> None:
    """A refund after the order earned points takes back the refunded share (never more than earned).

    What stays earned is what the order as it is now would earn at the rate of the earning; a
    refund the earning already left out (it finished first) takes nothing more.
    """
    order = await conn.fetchrow(LOCKED_ORDER, event.order_id)
    earned = await conn.fetchrow(
        "select user_id, amount, basis from points_entries where kind = 'order' and ref = $1",
        f"order:{event.order_id}",
    )
    if order is None or earned is None:
        return  # refunded before completion: completion earns on what was kept
    reversed_so_far = -(
        await conn.fetchval(
            """select coalesce(sum(amount), 0) from points_entries
               where kind = 'refund_reversal' and ref like $1""",
            f"refund:{event.order_id}:%",
        )
    )
    if earned["basis"] is not None:
        rate = earned["amount"] // (earned["basis"] // 100)  # exact: amount = basis // 100 * rate
        kept = max(order["paid_amount"] - order["refunded_amount"], 0)
        points = earned["amount"] - reversed_so_far - kept // 100 * rate
    else:  # earned before the basis was recorded: the refund's own share at today's rate
        points = int(event.payload.get("amount", 0)) // 100 * await points_per_yuan(conn)
    points = min(points, earned["amount"] - reversed_so_far)
    if points > 0:
        await reverse_points(
            conn,
            earned["user_id"],
            points,
            kind="refund_reversal",
            ref=f"refund:{event.order_id}:{event.payload.get('refund_id', event.id)}",
        )


# ---------------------------------------------------------------- routes


class PointsController(Controller):
    path = "/api/v1/points"
    tags = ["points"]

    @get("/")
    async def mine(
        self,
        user: AuthUser,
        conn: asyncpg.Connection,
        cursor: str | None = None,
        limit: Limit = DEFAULT_LIMIT,
    ) -> PointsOut:
        """The shopper's balance, debt and ledger entries, newest first."""
        after = decode_id_cursor(cursor)
        rows = await conn.fetch(
            f"""select {ENTRY_FIELDS} from points_entries
                where user_id = $1 and ($2::bigint is null or id < $2) order by id desc limit $3""",
            user.id,
            after,
            limit + 1,
        )
        more = len(rows) > limit
        rows = rows[:limit]
        balance, debt = await points_balance(conn, user.id)
        return PointsOut(
            balance=balance,
            debt=debt,
            items=[PointsEntry(**dict(r)) for r in rows],
            next_cursor=encode_cursor(rows[-1]["id"]) if more else None,
        )


class AdminPointsController(Controller):
    path = "/api/v1/admin/points/rule"
    tags = ["points"]
    guards = [admin_guard]

    @get("/")
    async def rule(self, admin: AuthAdmin, conn: asyncpg.Connection) -> PointsRule:
        return PointsRule(points_per_yuan=await points_per_yuan(conn))

    @put("/")
    async def set_rule(self, admin: AuthAdmin, conn: asyncpg.Connection, data: PointsRule) -> PointsRule:
        """Points earned per yuan paid, for orders completed from now on."""
        await conn.execute(
            """insert into points_rule (id, points_per_yuan) values (1, $1)
               on conflict (id) do update set points_per_yuan = excluded.points_per_yuan""",
            data.points_per_yuan,
        )
        return data


ROUTES = [PointsController, AdminPointsController]

"""The shared draw engine: chances, prize stock, sealed results and prize delivery for every game.

A draw follows the hot-path contract (DESIGN.md): `game_draw.lua` checks the window, the
shopper's daily and total chances, the Idempotency-Key and the pity state, picks the prize by
weight among prizes in stock with a random value drawn here from `secrets`, decrements the
stock and XADDs the draw, atomically. The draw row (with the random value and the weights
version, so a disputed result can be replayed) is group-committed to PostgreSQL before the
answer. A paid draw debits the points ledger first and credits it back if the script refuses.

Each win that is not a sealed scratch card enters the `prize_deliveries` outbox in the same
statement as its draw row (games/delivery.py delivers it). Extra chances (paid orders, merchant
tasks) and `shop reconcile`'s rebuild of the Redis counters live here too. Units given back and
chances granted are committed in PostgreSQL first and reach Redis after the commit, once per
draw or grant id (`game_return.lua`, `game_grant.lua`); the rebuild reads one snapshot.
"""

from __future__ import annotations

import logging
import secrets
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from datetime import date, datetime, timedelta
from typing import Any

import asyncpg
import msgspec
import redis.asyncio as aioredis

from games.schemas import PrizeWon
from shop.db import hold_xact_locks, session_lock
from shop.errors import Conflict, NotFound, Unavailable, ValidationFailed
from shop.events import OrderEvent, on_order_event
from shop.hotpath import (
    HotPath,
    Reservation,
    new_reservation_id,
    persist_backlog,
    register_persister,
    register_stream,
    register_streams_over,
    registered_streams,
    streams_past_end,
)
from shop.keys import Keys
from shop.points import earn_points, spend_points
from shop.reconcile import Difference, ReconcileContext, register_checker
from shop.settings import Settings

log = logging.getLogger("games.engine")

KIND = "game_draw"  # the hot-path stream kind
IDEMPOTENCY_TTL = 24 * 3600
DAY_TTL = 3 * 24 * 3600
RAND_BITS = 52  # Lua numbers are doubles: integers below 2^53 are exact

REFUSALS = {
    "not_found": (NotFound, "game.not_found", "No such game"),
    "not_started": (Conflict, "game.not_started", "The game has not started yet"),
    "ended": (Conflict, "game.ended", "The game has ended"),
    "paused": (Conflict, "game.paused", "The game is paused"),
    "no_chances": (Conflict, "game.no_chances", "No chances left today"),
    "limit_exceeded": (Conflict, "game.limit_exceeded", "You have used all your chances in this game"),
    "no_paid_draws": (Conflict, "game.no_paid_draws", "This game has no draws for points"),
    "sold_out": (Conflict, "game.sold_out", "Every prize has been given away"),
    "cold": (Unavailable, "game.not_ready", "The game is being restored, try again shortly"),
}


def clock() -> datetime:
    """Now (UTC); tests move it to another business day."""
    return datetime.now().astimezone()


def business_date(settings: Settings, now: datetime | None = None) -> date:
    """The store's date (its configured time zone): what "per day" means."""
    return (now or clock()).astimezone(settings.tz).date()


def _ms(value: datetime) -> int:
    return int(value.timestamp() * 1000)


# ---------------------------------------------------------------- reading games


GAME_FIELDS = """id, type, name, status, starts_at, ends_at, free_per_day, total_per_user, cost_points,
    chances_per_paid_order, chances_per_invite, extra_per_day_cap, out_of_stock, pity_after, pity_position, egg_count,
    card_ttl_minutes, claim_days, weights_version, created_at"""
PRIZE_FIELDS = (
    "id, game_id, position, name, kind, coupon_template_id, points, sku_id, weight, stock, per_user_cap"
)


async def fetch_game(conn: asyncpg.Connection, game_id: int, *, lock: bool = False) -> asyncpg.Record | None:
    return await conn.fetchrow(
        f"select {GAME_FIELDS} from games where id = $1 {'for update' if lock else ''}", game_id
    )


async def fetch_prizes(conn: asyncpg.Connection, game_ids: Sequence[int]) -> dict[int, list[asyncpg.Record]]:
    rows = await conn.fetch(
        f"select {PRIZE_FIELDS} from game_prizes where game_id = any($1::bigint[]) order by game_id, position",
        list(game_ids),
    )
    out: dict[int, list] = {g: [] for g in game_ids}
    for row in rows:
        out[row["game_id"]].append(row)
    return out


def prize_won(prize: Any) -> PrizeWon:
    return PrizeWon(
        position=prize["position"],
        name=prize["name"],
        kind=prize["kind"],
        is_win=prize["kind"] != "thanks",
        points=prize["points"],
        coupon_template_id=prize["coupon_template_id"],
        sku_id=prize["sku_id"],
    )


async def prizes_of_version(state: Any, game_id: int, version: int) -> dict[int, PrizeWon]:
    """position -> the prize as a draw answer, cached per app: the prizes of a weights version never change."""
    cache = getattr(state, "game_prizes", None)
    if cache is None:
        cache = state.game_prizes = {}
    cached = cache.get((game_id, version))
    if cached is None:
        async with state.pool.acquire() as conn:
            rows = (await fetch_prizes(conn, [game_id]))[game_id]
        cached = {row["position"]: prize_won(row) for row in rows}
        if len(cache) > 1000:
            cache.clear()
        cache[(game_id, version)] = cached
    return cached


# ---------------------------------------------------------------- Redis state


def rule_pairs(game: Any, prizes: Sequence[Any]) -> list[Any]:
    """The game's rules as game_draw.lua reads them (field, value, field, value, …); no stock."""
    thanks = next((p["position"] for p in prizes if p["kind"] == "thanks"), -1)
    pairs: list[Any] = [
        "type", game["type"],
        "status", game["status"],
        "starts_ms", _ms(game["starts_at"]),
        "ends_ms", _ms(game["ends_at"]),
        "free", game["free_per_day"],
        "total", game["total_per_user"] if game["total_per_user"] is not None else -1,
        "cost", game["cost_points"] or 0,
        "policy", game["out_of_stock"],
        "pity_after", game["pity_after"] or 0,
        "pity_pos", game["pity_position"] if game["pity_position"] is not None else -1,
        "thanks_pos", thanks,
        "version", game["weights_version"],
        "n", len(prizes),
    ]  # fmt: skip
    for p in prizes:
        i = p["position"]
        pairs += [
            f"w:{i}",
            p["weight"],
            f"cap:{i}",
            p["per_user_cap"] or 0,
            f"k:{i}",
            "t" if p["kind"] == "thanks" else "w",
        ]
    return pairs


def _game_keys(keys: Keys, game_id: int, day: date) -> list[str]:
    return [
        keys.game_state(game_id),
        keys.game_users(game_id),
        keys.game_day(game_id, day.isoformat()),
        keys.game_stream(game_id),
    ]


@dataclass(frozen=True)
class Counts:
    """What PostgreSQL implies for a game's Redis counters."""

    left: dict[int, int]  # position -> stock left (-1: unlimited; a limited prize never below 0)
    users: dict[str, int]  # users hash
    day: dict[str, int]  # today's day hash
    oversold: dict[int, int]  # position -> units issued beyond its stock (never expected: an alarm)


async def expected_counts(
    conn: asyncpg.Connection, game_id: int, prizes: Sequence[Any], today: date
) -> Counts:
    issued = {
        r["position"]: r["n"]
        for r in await conn.fetch(
            "select position, count(*) as n from game_draws where game_id = $1 and not returned group by position",
            game_id,
        )
    }
    # A limited prize's count is never below 0: -1 would read as unlimited in Redis.
    left = {
        p["position"]: max(p["stock"] - issued.get(p["position"], 0), 0) if p["stock"] is not None else -1
        for p in prizes
    }
    oversold = {
        p["position"]: issued.get(p["position"], 0) - p["stock"]
        for p in prizes
        if p["stock"] is not None and issued.get(p["position"], 0) > p["stock"]
    }
    users: dict[str, int] = {}
    for r in await conn.fetch(
        """select d.user_id, count(*) as draws,
                  count(*) filter (where d.id > coalesce(w.last_win, 0)) as streak
           from game_draws d
           left join (select user_id, max(d2.id) as last_win from game_draws d2
                      join game_prizes p on p.id = d2.prize_id
                      where d2.game_id = $1 and p.kind <> 'thanks' group by user_id) w using (user_id)
           where d.game_id = $1 group by d.user_id, w.last_win""",
        game_id,
    ):
        users[str(r["user_id"])] = r["draws"]
        users[f"{r['user_id']}:l"] = r["streak"]
    for r in await conn.fetch(
        """select d.user_id, d.position, count(*) as n from game_draws d join game_prizes p on p.id = d.prize_id
           where d.game_id = $1 and not d.returned and p.kind <> 'thanks' group by d.user_id, d.position""",
        game_id,
    ):
        users[f"{r['user_id']}:w:{r['position']}"] = r["n"]
    day: dict[str, int] = {}
    for r in await conn.fetch(
        """select user_id, count(*) filter (where not paid) as free, count(*) filter (where paid) as paid
           from game_draws where game_id = $1 and business_date = $2 group by user_id""",
        game_id,
        today,
    ):
        if r["free"]:
            day[f"{r['user_id']}:f"] = r["free"]
        if r["paid"]:
            day[f"{r['user_id']}:p"] = r["paid"]
    for r in await conn.fetch(
        """select user_id, sum(amount)::int as n from game_chance_grants
           where game_id = $1 and business_date = $2 group by user_id""",
        game_id,
        today,
    ):
        day[f"{r['user_id']}:x"] = r["n"]
    return Counts(left, users, day, oversold)


def _flat(mapping: dict[str, Any]) -> list[Any]:
    out: list[Any] = []
    for k, v in mapping.items():
        out += [k, v]
    return out


# One rebuild (or reconcile check) of a game's counters at a time, and no restock or unit return
# committing while one runs. A rebuild replays the stream's draws that its snapshot lacks on top
# of the stock it read, never below 0; a unit added to Redis after that snapshot and won before
# the rewrite would otherwise be counted twice: once as the draw it allowed is replayed onto a
# count that never had it (and stays at 0), and once more when it is applied to the new hash.
def counters_lock(conn: asyncpg.Connection, game_id: int):
    """The game's counters lock for a session (shop.db.session_lock, outside a transaction)."""
    return session_lock(conn, f"game_counters:{game_id}")


async def hold_counters(conn: asyncpg.Connection, game_ids: Iterable[int]) -> None:
    """In a transaction that adds units back to games' stock: wait for a rebuild of any of them in
    progress, and keep new ones out until the commit."""
    await hold_xact_locks(conn, [f"game_counters:{game_id}" for game_id in game_ids])


async def rebuild_game(
    conn: asyncpg.Connection,
    redis: aioredis.Redis,
    scripts: Any,
    keys: Keys,
    settings: Settings,
    game_id: int,
) -> None:
    """Write the game's rules, stock and chance counters into Redis from PostgreSQL (the truth).

    Call it outside a transaction: it reads one snapshot of its own, under the counters lock.
    """
    async with counters_lock(conn, game_id):
        stream = keys.game_stream(game_id)
        # Every draw the stream holds goes to PostgreSQL first; later ones the script adds on top.
        last = await persist_backlog(redis, conn, KIND, stream)
        today = business_date(settings)
        # One snapshot for every count (READ COMMITTED would let a return or a grant that commits
        # between two statements be counted in one and not the other).
        async with conn.transaction(isolation="repeatable_read", readonly=True):
            game = await fetch_game(conn, game_id)  # the first statement takes the snapshot
            # Draws the API wrote after `last` are in the snapshot and in the stream: counted once.
            tail = await redis.xrange(stream, min="-" if last == "0-0" else f"({last}", max="+")
            counted = await conn.fetch(
                "select draw_no from game_draws where draw_no = any($1::text[])",
                [f["rid"] for _, f in tail if f],
            )
            prizes = (await fetch_prizes(conn, [game_id]))[game_id]
            counts = await expected_counts(conn, game_id, prizes, today)
            returned = [r["id"] for r in await conn.fetch(RETURNED_DRAWS, game_id, [])]
            granted = [r["id"] for r in await conn.fetch(TODAYS_GRANTS, game_id, today, [])]
            restocked = [r["id"] for r in await conn.fetch(RESTOCKS, game_id, [])]
        # Marked as counted: their own after-commit step (or its retry) finds them done.
        state = rule_pairs(game, prizes) + _flat(
            {
                **{f"s:{pos}": n for pos, n in counts.left.items()},
                **{f"r:{i}": 1 for i in returned},
                **{f"x:{i}": 1 for i in restocked},
            }
        )
        users = _flat(counts.users)
        day = _flat({**counts.day, **{f"grant:{i}": 1 for i in granted}})
        await scripts.game_warm(
            keys=_game_keys(keys, game_id, today),
            args=[
                "rebuild", len(state), *state, last, today.isoformat(), len(users), *users, len(day), *day,
                DAY_TTL, len(counted), *(r["draw_no"] for r in counted),
            ],
        )  # fmt: skip
        await register_stream(redis, keys, KIND, stream)
        # Returns and grants committed after the snapshot go on top, once each: their own step may
        # have run before the warm (on the state it replaced, or on none).
        await return_units_to_redis(conn, scripts, keys, await conn.fetch(RETURNED_DRAWS, game_id, returned))
        await apply_chance_grants(
            conn, scripts, keys, await conn.fetch(TODAYS_GRANTS, game_id, today, granted)
        )
        await apply_restocks(conn, scripts, keys, await conn.fetch(RESTOCKS, game_id, restocked))
        await conn.execute(
            "update game_draws set return_pending = false where id = any($1::bigint[]) and return_pending",
            returned,
        )
        await conn.execute(
            "update game_prize_restocks set redis_done = true where id = any($1::bigint[]) and not redis_done",
            restocked,
        )
        await conn.execute(
            "update game_chance_grants set redis_done = true where id = any($1::bigint[]) and not redis_done",
            granted,
        )


RETURNED_DRAWS = """select id, game_id, user_id, position from game_draws
    where game_id = $1 and returned and id <> all($2::bigint[])"""
GRANT_FIELDS = "id, game_id, user_id, business_date, amount"
TODAYS_GRANTS = f"""select {GRANT_FIELDS} from game_chance_grants
    where game_id = $1 and business_date = $2 and amount > 0 and id <> all($3::bigint[])"""
RESTOCK_FIELDS = "id, game_id, position, added"
RESTOCKS = (
    f"""select {RESTOCK_FIELDS} from game_prize_restocks where game_id = $1 and id <> all($2::bigint[])"""
)


async def warm_rules(keys: Keys, scripts: Any, settings: Settings, game: Any, prizes: Sequence[Any]) -> bool:
    """Update the live rules (status, window), counters untouched; False when Redis holds no state
    (the caller rebuilds it, after its commit)."""
    reply = await scripts.game_warm(
        keys=_game_keys(keys, game["id"], business_date(settings)), args=["config", *rule_pairs(game, prizes)]
    )
    return reply[0] != "cold"


# ---------------------------------------------------------------- Redis told after the commit
# A unit given back, a chance granted and a prize restocked are committed in PostgreSQL first
# (flagged as not yet in Redis), then applied by one script each, once per draw, grant or restock
# id: a retry, a second worker or a rebuild that counted it finds it done. A script that finds
# no state does nothing: the rebuild from PostgreSQL counts it.


async def return_units_to_redis(
    conn: asyncpg.Connection, scripts: Any, keys: Keys, draws: Sequence[Any]
) -> int:
    """Draws whose unit came back (id, game_id, user_id, position): into Redis once each, then marked."""
    for d in draws:
        await scripts.game_return(
            keys=[keys.game_state(d["game_id"]), keys.game_users(d["game_id"])],
            args=[d["id"], d["user_id"], d["position"]],
        )
    if draws:
        await conn.execute(
            "update game_draws set return_pending = false where id = any($1::bigint[])",
            [d["id"] for d in draws],
        )
    return len(draws)


async def apply_chance_grants(
    conn: asyncpg.Connection, scripts: Any, keys: Keys, grants: Sequence[Any]
) -> int:
    """Committed grants (GRANT_FIELDS): into Redis once each, then marked."""
    for g in grants:
        await scripts.game_grant(
            keys=[keys.game_state(g["game_id"]), keys.game_day(g["game_id"], g["business_date"].isoformat())],
            args=[g["id"], g["user_id"], g["amount"], DAY_TTL],
        )
    if grants:
        await conn.execute(
            "update game_chance_grants set redis_done = true where id = any($1::bigint[])",
            [g["id"] for g in grants],
        )
    return len(grants)


async def apply_restocks(conn: asyncpg.Connection, scripts: Any, keys: Keys, restocks: Sequence[Any]) -> int:
    """Committed restocks (RESTOCK_FIELDS): into Redis once each, then marked."""
    for r in restocks:
        await scripts.game_restock(
            keys=[keys.game_state(r["game_id"])], args=[r["id"], r["position"], r["added"]]
        )
    if restocks:
        await conn.execute(
            "update game_prize_restocks set redis_done = true where id = any($1::bigint[])",
            [r["id"] for r in restocks],
        )
    return len(restocks)


async def restore_pending(pool: asyncpg.Pool, scripts: Any, keys: Keys, batch: int = 500) -> int:
    """Returns, grants and restocks whose after-commit step did not run (a crash, a Redis error):
    applied now."""
    async with pool.acquire() as conn:
        draws = await conn.fetch(
            "select id, game_id, user_id, position from game_draws where return_pending order by id limit $1",
            batch,
        )
        grants = await conn.fetch(
            f"select {GRANT_FIELDS} from game_chance_grants where not redis_done order by id limit $1", batch
        )
        restocks = await conn.fetch(
            f"select {RESTOCK_FIELDS} from game_prize_restocks where not redis_done order by id limit $1",
            batch,
        )
        return (
            await return_units_to_redis(conn, scripts, keys, draws)
            + await apply_chance_grants(conn, scripts, keys, grants)
            + await apply_restocks(conn, scripts, keys, restocks)
        )


async def after_commit(step: Any, what: str) -> None:
    """Run an after-commit Redis step; a failure is logged and left to restore_pending."""
    try:
        await step
    except Exception:
        log.exception("%s not yet in Redis (the worker retries)", what)


async def live_stock(
    redis: aioredis.Redis, keys: Keys, game_id: int, positions: Sequence[int]
) -> dict[int, int | None]:
    values = await redis.hmget(keys.game_state(game_id), [f"s:{p}" for p in positions]) if positions else []
    return {
        p: (int(v) if v is not None and int(v) >= 0 else None) for p, v in zip(positions, values, strict=True)
    }


# ---------------------------------------------------------------- drawing (the hot path)


@register_persister(KIND, single_statement=True)
async def persist_draws(conn: asyncpg.Connection, entries: Sequence[Reservation]) -> None:
    """Many draws in one statement, and an outbox row for each win that is not a sealed card."""
    await conn.execute(
        """with e as (
               select * from unnest($1::text[], $2::bigint[], $3::bigint[], $4::int[], $5::bigint[], $6::int[],
                                    $7::date[], $8::bool[], $9::int[], $10::bool[], $11::text[], $12::bigint[],
                                    $13::bigint[], $14::text[])
                   as u (rid, uid, gid, pos, rand, v, d, paid, cost, pity, t, at, x, dr)),
           ins as (
               insert into game_draws (draw_no, game_id, user_id, prize_id, position, rand, weights_version,
                                       business_date, paid, cost_points, pity, card_status, expires_at, drawn_at,
                                       debit_ref)
               select e.rid, e.gid, e.uid, p.id, e.pos, e.rand, e.v, e.d, e.paid, e.cost, e.pity,
                      case when e.t = 'card' then 'sealed' end,
                      case when e.t = 'card' then to_timestamp(e.x / 1000.0) end,
                      to_timestamp(e.at / 1000.0), e.dr
               from e join game_prizes p on p.game_id = e.gid and p.position = e.pos
               on conflict (draw_no) do nothing
               returning id, user_id, game_id, prize_id, card_status)
           insert into prize_deliveries (draw_id, user_id, game_id, prize_id, kind)
           select ins.id, ins.user_id, ins.game_id, ins.prize_id, p.kind
           from ins join game_prizes p on p.id = ins.prize_id
           where p.kind <> 'thanks' and ins.card_status is null""",
        [e.id for e in entries],
        [e.user_id for e in entries],
        [e.payload["g"] for e in entries],
        [e.payload["pos"] for e in entries],
        [int(e.payload["r"]) for e in entries],
        [e.payload["v"] for e in entries],
        [date.fromisoformat(e.payload["d"]) for e in entries],
        [bool(e.payload["paid"]) for e in entries],
        [e.payload["c"] for e in entries],
        [bool(e.payload["pity"]) for e in entries],
        [e.payload["t"] for e in entries],
        [e.payload["at"] for e in entries],
        [e.payload["x"] for e in entries],
        [e.payload.get("dr") for e in entries],
    )


@dataclass(frozen=True)
class Drawn:
    draw_no: str
    position: int
    pity: bool
    paid: bool
    version: int
    expires_at: datetime | None
    replayed: bool


def draw_args(
    *,
    game_id: int,
    user_id: int,
    rid: str,
    rand: int,
    mode: str,
    game_type: str,
    now: datetime,
    day: date,
    kind: str = "draw",
    cost: int = 0,
    expires_ms: int = 0,
    idempotency_key: str | None = None,
) -> list[Any]:
    """game_draw.lua's ARGV; the payload prefix holds what Python knows, the script appends the result."""
    prefix = (
        f'{{"g":{game_id},"r":"{rand}","d":"{day.isoformat()}","at":{_ms(now)},"t":"{kind}",'
        f'"c":{cost},"x":{expires_ms}'
    )
    return [
        _ms(now), user_id, rid, rand, mode, game_type, prefix,
        "1" if idempotency_key else "0", IDEMPOTENCY_TTL, DAY_TTL,
    ]  # fmt: skip


async def draw(
    hotpath: HotPath,
    scripts: Any,
    keys: Keys,
    settings: Settings,
    *,
    game_id: int,
    game_type: str,
    user_id: int,
    idempotency_key: str | None,
    pay_with_points: bool = False,
    kind: str = "draw",
) -> Drawn:
    """One draw: (debit points), the script decides, the row is committed; refusals raise."""
    rid = new_reservation_id()
    now = clock()
    day = business_date(settings, now)
    cost, debit_ref, expires_ms = 0, None, 0
    if kind == "card":
        async with hotpath.pool.acquire() as conn:
            ttl = await conn.fetchval("select card_ttl_minutes from games where id = $1", game_id)
        expires_ms = _ms(now + timedelta(minutes=ttl or 1440))
    if not pay_with_points:
        decided = await _decide(
            hotpath, scripts, keys, game_id=game_id, game_type=game_type, user_id=user_id, rid=rid, now=now,
            day=day, kind=kind, expires_ms=expires_ms, idempotency_key=idempotency_key,
        )  # fmt: skip
        return await _commit(hotpath, user_id, decided)
    async with hotpath.pool.acquire() as conn:
        cost = await conn.fetchval(
            "select cost_points from games where id = $1 and type = $2 and status <> 'draft'",
            game_id,
            game_type,
        )
        if cost is None:
            raise Conflict("This game has no draws for points", code="game.no_paid_draws")
        # Keyed by the Idempotency-Key: a retried request never pays twice. An attempt that was
        # refused was paid back, so the next attempt with the key pays under the next number.
        # The lock serialises requests with one key: a concurrent duplicate waits until the first
        # has drawn or been paid back, so it can never draw on a payment that is being refunded.
        base = f"{game_id}:{user_id}:{idempotency_key or rid}"
        await conn.execute("select pg_advisory_lock(hashtextextended($1, 0))", f"draw:{base}")
        try:
            for attempt in range(1, 100):
                debit_ref = base if attempt == 1 else f"{base}:{attempt}"
                if await spend_points(conn, user_id, cost, kind="draw", ref=debit_ref) is not None:
                    break
                if not await conn.fetchval(
                    "select 1 from points_entries where kind = 'draw_refund' and ref = $1", debit_ref
                ):
                    # Paid and not paid back: a repeat of that attempt. Its draw, once stored, is
                    # replayed from PostgreSQL: Redis's idempotency record expires (or is lost), and
                    # the script would otherwise draw again on the same payment.
                    stored = await conn.fetchrow(
                        """select draw_no, position, pity, paid, weights_version, expires_at from game_draws
                           where debit_ref = $1""",
                        debit_ref,
                    )
                    if stored is not None:
                        return Drawn(
                            draw_no=stored["draw_no"],
                            position=stored["position"],
                            pity=stored["pity"],
                            paid=stored["paid"],
                            version=stored["weights_version"],
                            expires_at=stored["expires_at"],
                            replayed=True,
                        )
                    break
            decided = await _decide(
                hotpath, scripts, keys, game_id=game_id, game_type=game_type, user_id=user_id, rid=rid,
                now=now, day=day, kind=kind, expires_ms=expires_ms, idempotency_key=idempotency_key,
                cost=cost, debit_ref=debit_ref, refund_conn=conn,
            )  # fmt: skip
        finally:
            await conn.execute("select pg_advisory_unlock(hashtextextended($1, 0))", f"draw:{base}")
    # Committed outside the lock and with the connection given back: the group commit needs one
    # from the same pool. A duplicate that got the lock meanwhile replays this reservation.
    _, payload, replayed = decided
    if not replayed:
        payload["dr"] = debit_ref  # stored with the draw: the payment it was made on
    return await _commit(hotpath, user_id, decided)


async def _decide(
    hotpath: HotPath,
    scripts: Any,
    keys: Keys,
    *,
    game_id: int,
    game_type: str,
    user_id: int,
    rid: str,
    now: datetime,
    day: Any,
    kind: str,
    expires_ms: int,
    idempotency_key: str | None,
    cost: int = 0,
    debit_ref: str | None = None,
    refund_conn: asyncpg.Connection | None = None,
) -> tuple[str, dict, bool]:
    """The script decides: (reservation id, payload, replayed); a paid draw it refuses is paid back."""
    pay_with_points = debit_ref is not None
    args = draw_args(
        game_id=game_id, user_id=user_id, rid=rid, rand=secrets.randbits(RAND_BITS),
        mode="paid" if pay_with_points else "free", game_type=game_type, now=now, day=day, kind=kind,
        cost=cost, expires_ms=expires_ms, idempotency_key=idempotency_key,
    )  # fmt: skip
    reply = await hotpath.reserve(
        scripts.game_draw,
        keys=[
            keys.game_state(game_id),
            keys.game_users(game_id),
            keys.game_day(game_id, day.isoformat()),
            keys.game_idem(game_id, user_id, idempotency_key),
            keys.game_stream(game_id),
        ],
        args=args,
    )
    outcome = reply[0]
    if outcome not in ("ok", "replay"):
        if debit_ref is not None:
            await earn_points(refund_conn, user_id, cost, kind="draw_refund", ref=debit_ref)
        error, code, message = REFUSALS[outcome]
        raise error(message, code=code)
    rid = reply[1]
    payload = msgspec.json.decode(reply[5] if outcome == "ok" else reply[2])
    if outcome == "replay" and (bool(payload["paid"]) != pay_with_points or payload["t"] != kind):
        if debit_ref is not None and not payload["paid"]:
            await earn_points(refund_conn, user_id, cost, kind="draw_refund", ref=debit_ref)
        raise ValidationFailed(
            "This Idempotency-Key was used with a different request", code="idempotency.mismatch"
        )
    return rid, payload, outcome == "replay"


async def _commit(hotpath: HotPath, user_id: int, decided: tuple[str, dict, bool]) -> Drawn:
    """The draw row is in PostgreSQL before the answer."""
    rid, payload, replayed = decided
    await hotpath.commit(KIND, Reservation(rid, user_id, payload))
    return Drawn(
        draw_no=rid,
        position=payload["pos"],
        pity=bool(payload["pity"]),
        paid=bool(payload["paid"]),
        version=payload["v"],
        expires_at=datetime.fromtimestamp(payload["x"] / 1000).astimezone() if payload["x"] else None,
        replayed=replayed,
    )


async def explain_missing(conn: asyncpg.Connection, game_id: int, game_type: str) -> None:
    """Redis knows nothing of the game: 404 unless it is a live game of this type (then Redis lost it)."""
    status = await conn.fetchval("select status from games where id = $1 and type = $2", game_id, game_type)
    if status is None or status == "draft":
        raise NotFound("No such game", code="game.not_found")


# ---------------------------------------------------------------- scratch cards


async def reveal_card(conn: asyncpg.Connection, card_id: str, user_id: int) -> asyncpg.Record:
    """Reveal a sealed card once (its prize enters the outbox then); a repeat returns the same result."""
    async with conn.transaction():
        row = await conn.fetchrow(
            """update game_draws set card_status = 'revealed', revealed_at = now()
               where draw_no = $1 and user_id = $2 and card_status = 'sealed' and expires_at > now()
               returning id, game_id, prize_id, position, user_id""",
            card_id,
            user_id,
        )
        if row is not None:
            await conn.execute(
                """insert into prize_deliveries (draw_id, user_id, game_id, prize_id, kind)
                   select $1, $2, $3, p.id, p.kind from game_prizes p where p.id = $4 and p.kind <> 'thanks'
                   on conflict (draw_id) do nothing""",
                row["id"],
                row["user_id"],
                row["game_id"],
                row["prize_id"],
            )
            return row
        # Another shopper's card is 404, like a card that does not exist.
        row = await conn.fetchrow(
            """select id, game_id, prize_id, position, user_id, card_status from game_draws
               where draw_no = $1 and user_id = $2 and card_status is not null""",
            card_id,
            user_id,
        )
    if row is None:
        raise NotFound("No such card", code="game.card_not_found")
    if row["card_status"] != "revealed":
        raise Conflict("The card has expired", code="game.card_expired")
    return row


# ---------------------------------------------------------------- extra chances


async def record_chance_grant(
    conn: asyncpg.Connection,
    settings: Settings,
    game: Any,
    user_id: int,
    amount: int,
    *,
    source: str,
    ref: str,
) -> asyncpg.Record | None:
    """Extra chances for today, within the game's daily cap, once per (source, ref), in PostgreSQL
    only (in the caller's transaction, if any); the new grant (GRANT_FIELDS) or None.

    Redis learns of it after the commit (apply_chance_grants, or restore_pending): applied
    inside a transaction that then rolls back and is retried, it would count twice.
    """
    today = business_date(settings)
    async with conn.transaction():
        # One shopper's grants for one game are counted and written one at a time.
        await conn.execute(
            "select pg_advisory_xact_lock(hashtextextended($1, 0))", f"game_chances:{game['id']}:{user_id}"
        )
        so_far = await conn.fetchval(
            """select coalesce(sum(amount), 0) from game_chance_grants
               where game_id = $1 and user_id = $2 and business_date = $3""",
            game["id"],
            user_id,
            today,
        )
        # Past the cap the reference is still recorded (amount 0): it is handled, not retried.
        amount = max(min(amount, game["extra_per_day_cap"] - so_far), 0)
        return await conn.fetchrow(
            f"""insert into game_chance_grants (game_id, user_id, business_date, amount, source, ref, redis_done)
                values ($1, $2, $3, $4, $5, $6, $4 = 0) on conflict do nothing returning {GRANT_FIELDS}""",
            game["id"],
            user_id,
            today,
            amount,
            source,
            ref,
        )


async def grant_chances(
    conn: asyncpg.Connection,
    scripts: Any,
    keys: Keys,
    settings: Settings,
    game: Any,
    user_id: int,
    amount: int,
    *,
    source: str,
    ref: str,
) -> int:
    """record_chance_grant in a transaction of its own, then Redis; returns how many were granted."""
    if conn.is_in_transaction():
        raise RuntimeError("grant_chances commits before telling Redis: use record_chance_grant here")
    grant = await record_chance_grant(conn, settings, game, user_id, amount, source=source, ref=ref)
    if grant is None or grant["amount"] == 0:
        return 0
    await after_commit(apply_chance_grants(conn, scripts, keys, [grant]), f"chance grant {grant['id']}")
    return grant["amount"]


@on_order_event("order.paid", "games.chances_on_paid_order")
async def chances_on_paid_order(conn: asyncpg.Connection, event: OrderEvent, ctx: Any) -> None:
    """A paid order grants the configured extra chances in every running game that offers them.

    Inside the event's transaction: the worker's restore_pending tells Redis once it committed.
    """
    order = await conn.fetchrow("select user_id, kind from orders where id = $1", event.order_id)
    if order is None or order["kind"] == "prize":
        return
    games = await conn.fetch(
        f"""select {GAME_FIELDS} from games where status = 'active' and chances_per_paid_order > 0
            and extra_per_day_cap > 0 and starts_at <= now() and ends_at > now() order by id"""
    )
    for game in games:
        await record_chance_grant(
            conn, ctx.settings, game, order["user_id"], game["chances_per_paid_order"],
            source="order.paid", ref=str(event.order_id),
        )  # fmt: skip


async def grant_invite_chances(
    pool: asyncpg.Pool, scripts: Any, keys: Keys, settings: Settings, batch: int = 500
) -> int:
    """The invitation task: each shopper who logged in for the first time with an inviter, during a
    running game that rewards invitations, gives the inviter its chances once (within the daily cap)."""
    granted = 0
    async with pool.acquire() as conn:
        games = await conn.fetch(
            f"""select {GAME_FIELDS} from games where status = 'active' and chances_per_invite > 0
                and extra_per_day_cap > 0 and starts_at <= now() and ends_at > now() order by id"""
        )
        for game in games:
            invitees = await conn.fetch(
                """select u.id, u.inviter_id from users u
                   where u.inviter_id is not null and u.created_at >= $2
                     and not exists (select 1 from game_chance_grants g
                                     where g.game_id = $1 and g.user_id = u.inviter_id and g.source = 'invite'
                                       and g.ref = u.id::text)
                   order by u.id limit $3""",
                game["id"],
                game["starts_at"],
                batch,
            )
            for row in invitees:
                granted += await grant_chances(
                    conn, scripts, keys, settings, game, row["inviter_id"], game["chances_per_invite"],
                    source="invite", ref=str(row["id"]),
                )  # fmt: skip
    return granted


@register_streams_over(KIND)
async def ended_game_streams(conn: asyncpg.Connection, keys: Keys, streams: Sequence[str]) -> list[str]:
    """The streams of games no one can draw in any more: ended, gone, or past their end by a
    grace period."""
    ids = await streams_past_end(conn, keys, streams, table="games", end="t.ends_at")
    return [keys.game_stream(game_id) for game_id in ids]


# ---------------------------------------------------------------- reconcile


async def check_game_counters(ctx: ReconcileContext) -> list[Difference]:
    """Every live game: rules, stock left, chances used and granted today, Redis vs PostgreSQL."""
    diffs: list[Difference] = []
    streams = set(await registered_streams(ctx.redis, ctx.keys, KIND))
    today = business_date(ctx.settings)
    game_ids = [
        r["id"] for r in await ctx.conn.fetch("select id from games where status <> 'draft' order by id")
    ]
    # Streams of ended games are left out of the worker's pass once drained (hotpath.jobs).
    over = set(await ended_game_streams(ctx.conn, ctx.keys, [ctx.keys.game_stream(g) for g in game_ids]))
    for game_id in game_ids:
        async with counters_lock(ctx.conn, game_id):  # no restock or return commits meanwhile
            diffs.extend(await _check_game(ctx, game_id, today, streams, over))
    return diffs


async def _check_game(
    ctx: ReconcileContext, game_id: int, today: date, streams: set[str], over: set[str]
) -> list[Difference]:
    """One game, read under its counters lock (its rules and stock as they are now)."""
    diffs: list[Difference] = []
    subject = f"game {game_id}"
    stream = ctx.keys.game_stream(game_id)
    await persist_backlog(ctx.redis, ctx.conn, KIND, stream)
    game = await fetch_game(ctx.conn, game_id)
    prizes = (await fetch_prizes(ctx.conn, [game["id"]]))[game["id"]]
    counts = await expected_counts(ctx.conn, game["id"], prizes, today)
    state = await ctx.redis.hgetall(ctx.keys.game_state(game["id"]))
    await _leave_out_pending(ctx.conn, game["id"], prizes, today, counts, state)
    for pos, extra in counts.oversold.items():
        diffs.append(Difference("games", subject, f"units issued beyond stock, prize {pos}", 0, extra))
    pairs = rule_pairs(game, prizes)
    expected = {str(pairs[i]): str(pairs[i + 1]) for i in range(0, len(pairs), 2)}
    expected.update({f"s:{pos}": str(n) for pos, n in counts.left.items()})
    for field, want in expected.items():
        if state.get(field) != want:
            diffs.append(Difference("games", subject, field, want, state.get(field)))
    for name, key, want_map in (
        ("users", ctx.keys.game_users(game["id"]), counts.users),
        ("today", ctx.keys.game_day(game["id"], today.isoformat()), counts.day),
    ):
        have = {k: int(v) for k, v in (await ctx.redis.hgetall(key)).items() if not k.startswith("grant:")}
        for field in sorted(set(have) | set(want_map)):
            if have.get(field, 0) != want_map.get(field, 0):
                diffs.append(
                    Difference("games", subject, f"{name} {field}", want_map.get(field, 0), have.get(field))
                )
    if stream not in streams and stream not in over:
        diffs.append(Difference("games", subject, "stream registered", True, False))
    return diffs


async def _leave_out_pending(
    conn: asyncpg.Connection, game_id: int, prizes: Sequence[Any], today: date, counts: Counts, state: dict
) -> None:
    """Returns, grants and restocks whose after-commit step is still due are not in Redis yet: not
    expected there."""
    kinds = {p["position"]: p["kind"] for p in prizes}
    for r in await conn.fetch(
        "select user_id, position from game_draws where game_id = $1 and return_pending", game_id
    ):
        if counts.left[r["position"]] >= 0:
            counts.left[r["position"]] = max(counts.left[r["position"]] - 1, 0)
        if kinds[r["position"]] != "thanks":
            wins = f"{r['user_id']}:w:{r['position']}"
            counts.users[wins] = counts.users.get(wins, 0) + 1
    for g in await conn.fetch(TODAYS_GRANTS + " and not redis_done", game_id, today, []):
        counts.day[f"{g['user_id']}:x"] -= g["amount"]
    # A restock is in Redis exactly when its x:<id> marker is in the state hash read (its script or
    # a rebuild put it there), whatever its redis_done flag says yet.
    for r in await conn.fetch(RESTOCKS, game_id, []):
        if f"x:{r['id']}" not in state and counts.left[r["position"]] >= 0:
            counts.left[r["position"]] = max(counts.left[r["position"]] - r["added"], 0)


async def fix_game_counters(ctx: ReconcileContext, diffs: list[Difference]) -> None:
    for game_id in sorted({int(d.subject.rsplit(" ", 1)[1]) for d in diffs}):
        await rebuild_game(ctx.conn, ctx.redis, ctx.scripts, ctx.keys, ctx.settings, game_id)


register_checker("games", check_game_counters, fix_game_counters)

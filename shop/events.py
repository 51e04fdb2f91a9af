"""The order-events outbox.

Every order state change writes an `order_events` row in the same transaction. The worker
dispatches each event to the handlers registered for its type, at least once; each handler's
effect commits together with its `order_event_deliveries` row, so a handler never acts twice
on one event even when dispatch is retried. Later features (coupons, group-buy, rebates, game
chances) subscribe here instead of being called from the payment path.
"""

from __future__ import annotations

import asyncio
import importlib
import logging
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

import asyncpg

log = logging.getLogger("shop.events")

ORDER_EVENT_TYPES = frozenset(
    {
        "order.created",
        "order.paid",
        "order.cancelled",
        "order.shipped",
        "order.completed",
        "order.refund_requested",
        "order.refund_approved",
        "order.refund_rejected",
        "order.refunded",
        "order.paid_after_cancel",
    }
)


@dataclass(frozen=True)
class OrderEvent:
    id: int
    order_id: int
    type: str
    payload: dict[str, Any]


# ctx is the worker's JobContext (pool, redis, settings, …); conn is inside the delivery transaction.
# Connections a backlog is worked off on at once, per worker process.
DRAIN_LANES = 4

Handler = Callable[[asyncpg.Connection, OrderEvent, Any], Awaitable[None]]
HANDLERS: dict[str, list[tuple[str, Handler]]] = {}


_LOADED: list[bool] = []


def load_subscribers() -> None:
    """Import every module holding a handler, once per process: the worker's module list (every
    domain with handlers has jobs there), so an API process sees the registry the dispatching
    worker sees. The app calls it at start-up, so no request pays for the imports."""
    if _LOADED:
        return
    from shop.worker import JOB_MODULES  # late: shop.worker's domains import this module

    for module in JOB_MODULES:
        importlib.import_module(module)
    _LOADED.append(True)


def subscribed(event_type: str) -> bool:
    """Whether any handler subscribes to the event type (the registry complete: load_subscribers)."""
    load_subscribers()
    return bool(HANDLERS.get(event_type))


def on_order_event(event_type: str, name: str) -> Callable[[Handler], Handler]:
    """Subscribe a handler (unique `name`, used for its idempotency) to one event type."""
    if event_type not in ORDER_EVENT_TYPES:
        raise ValueError(f"unknown order event type {event_type}")

    def register(func: Handler) -> Handler:
        subscribers = HANDLERS.setdefault(event_type, [])
        if any(existing == name for existing, _ in subscribers):
            raise RuntimeError(f"two handlers named {name} for {event_type}")
        subscribers.append((name, func))
        return func

    return register


async def record_event(
    conn: asyncpg.Connection, order_id: int, event_type: str, payload: dict[str, Any] | None = None
) -> int:
    """Write an event row; call inside the transaction that makes the change it describes."""
    if event_type not in ORDER_EVENT_TYPES:
        raise ValueError(f"unknown order event type {event_type}")
    return await conn.fetchval(
        "insert into order_events (order_id, type, payload) values ($1, $2, $3) returning id",
        order_id,
        event_type,
        payload or {},
    )


def _backoff(attempts: int) -> timedelta:
    return timedelta(seconds=min(3600, 2 ** min(attempts, 12)))


async def dispatch_order_events(pool: asyncpg.Pool, ctx: Any, batch: int = 100) -> int:
    """Deliver up to `batch` due events to their handlers; returns how many were fully dispatched.

    One short transaction per event: a slow handler (an HTTP upload) holds only its own event,
    and SKIP LOCKED lets several workers (and several lanes of one) split the backlog. Handlers
    must not depend on the order in which one order's events arrive (they read the order's
    current state instead): two lanes may deliver them at the same time.
    """
    done, _taken = await _dispatch_pass(pool, ctx, batch)
    return done


async def drain_order_events(
    pool: asyncpg.Pool, ctx: Any, *, lanes: int = DRAIN_LANES, batch: int = 100, max_seconds: float = 10.0
) -> int:
    """Dispatch until nothing is due, or for at most `max_seconds`; returns events dispatched.

    A quiet outbox costs one query. A backlog (a live stream's thousands of payments within a
    minute) is worked off on `lanes` connections at once instead of `batch` events a tick.
    """
    done, taken = await _dispatch_pass(pool, ctx, batch)
    if taken < batch:
        return done
    deadline = time.monotonic() + max_seconds

    async def lane() -> int:
        total = 0
        while time.monotonic() < deadline:
            lane_done, lane_taken = await _dispatch_pass(pool, ctx, batch)
            total += lane_done
            if lane_taken < batch:
                break
        return total

    async with asyncio.TaskGroup() as group:  # one lane failing stops the others: the job reports it
        tasks = [group.create_task(lane()) for _ in range(lanes)]
    return done + sum(task.result() for task in tasks)


async def _dispatch_pass(pool: asyncpg.Pool, ctx: Any, batch: int) -> tuple[int, int]:
    """(events fully dispatched, events taken) for one pass of up to `batch` events."""
    done = taken = 0
    async with pool.acquire() as conn:
        for _ in range(batch):
            async with conn.transaction():
                row = await conn.fetchrow(
                    """select id, order_id, type, payload, attempts from order_events
                       where dispatched_at is null and next_attempt_at <= now()
                       order by next_attempt_at, id limit 1 for update skip locked"""
                )
                if row is None:
                    break
                taken += 1
                event = OrderEvent(row["id"], row["order_id"], row["type"], row["payload"])
                failed = None
                for name, handler in HANDLERS.get(event.type, []):
                    try:
                        async with conn.transaction():  # savepoint: one handler's failure undoes only itself
                            inserted = await conn.fetchval(
                                """insert into order_event_deliveries (event_id, handler) values ($1, $2)
                                   on conflict do nothing returning 1""",
                                event.id,
                                name,
                            )
                            if inserted:
                                await handler(conn, event, ctx)
                    except Exception as exc:
                        log.exception("order event %s handler %s failed", event.id, name)
                        failed = f"{name}: {type(exc).__name__}: {exc}"[:500]
                if failed is None:
                    await conn.execute(
                        "update order_events set dispatched_at = now() where id = $1", event.id
                    )
                    done += 1
                else:
                    await conn.execute(
                        """update order_events set attempts = attempts + 1, last_error = $2,
                               next_attempt_at = now() + $3 where id = $1""",
                        event.id,
                        failed,
                        _backoff(row["attempts"] + 1),
                    )
    return done, taken

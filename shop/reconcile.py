"""`shop reconcile [--fix]`: compare every Redis counter with PostgreSQL (the truth), and rebuild it.

Each hot path registers a checker: `check(ctx)` lists the differences between what Redis holds
and what PostgreSQL implies; `fix(ctx, differences)` rewrites the Redis side from PostgreSQL.
A checker persists its streams' backlog before counting, so reservations not yet written are
counted, and a fix made during a live campaign can only over-count claims (undersell), never
under-count them (oversell). After a Redis loss, `--fix` restores a working state.
"""

from __future__ import annotations

import importlib
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

import asyncpg
import redis.asyncio as aioredis

from shop.keys import Keys
from shop.settings import Settings

# Modules whose import registers checkers; a hot path that keeps counters in Redis adds its module.
RECONCILE_MODULES: list[str] = ["shop.coupons.service", "shop.flash_sale.service", "games.engine"]


@dataclass(frozen=True)
class Difference:
    checker: str
    subject: str  # e.g. "coupon template 42"
    field: str
    expected: Any  # from PostgreSQL
    actual: Any  # in Redis (None: missing)

    def __str__(self) -> str:
        return f"{self.checker}: {self.subject}: {self.field}: redis has {self.actual!r}, expected {self.expected!r}"


def per_user_differences(
    checker: str, subject: str, label: str, expected: dict[int, int], redis_hash: dict[str, str]
) -> list[Difference]:
    """Per-shopper counters (a Redis hash user id -> count) against PostgreSQL's counts."""
    actual = {int(k): int(v) for k, v in redis_hash.items()}
    return [
        Difference(
            checker, subject, label.format(user_id=user_id), expected.get(user_id, 0), actual.get(user_id)
        )
        for user_id in sorted(set(actual) | set(expected))
        if actual.get(user_id, 0) != expected.get(user_id, 0)
    ]


@dataclass(frozen=True)
class ReconcileContext:
    settings: Settings
    conn: asyncpg.Connection
    redis: aioredis.Redis
    scripts: Any  # shop.redis.Scripts
    keys: Keys


Check = Callable[[ReconcileContext], Awaitable[list[Difference]]]
Fix = Callable[[ReconcileContext, list[Difference]], Awaitable[None]]


@dataclass(frozen=True)
class Checker:
    name: str
    check: Check
    fix: Fix


CHECKERS: dict[str, Checker] = {}


def register_checker(name: str, check: Check, fix: Fix) -> None:
    existing = CHECKERS.get(name)
    if existing is not None and (existing.check is not check or existing.fix is not fix):
        raise RuntimeError(f"two reconcile checkers named {name}")
    CHECKERS[name] = Checker(name, check, fix)


def registered_checkers() -> list[Checker]:
    for module in RECONCILE_MODULES:
        importlib.import_module(module)
    return list(CHECKERS.values())


@dataclass(frozen=True)
class Report:
    found: list[Difference]  # before any fix
    remaining: list[Difference]  # after the fix (= found without --fix)


async def reconcile(settings: Settings, *, fix: bool = False) -> Report:
    """Run every checker; with `fix`, rewrite what differs and check again."""
    from shop.db import connect
    from shop.redis import Scripts, create_redis

    checkers = registered_checkers()
    conn = await connect(settings)
    redis = create_redis(settings.redis_url)
    try:
        ctx = ReconcileContext(settings, conn, redis, Scripts(redis), Keys(settings.redis_prefix))
        found: list[Difference] = []
        remaining: list[Difference] = []
        for checker in checkers:
            diffs = await checker.check(ctx)
            found += diffs
            if fix and diffs:
                await checker.fix(ctx, diffs)
                diffs = await checker.check(ctx)
            remaining += diffs
        return Report(found, remaining)
    finally:
        await redis.aclose()
        await conn.close()

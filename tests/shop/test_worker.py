from __future__ import annotations

import asyncio
import os
import secrets

import asyncpg
import msgspec
import pytest

from shop.db import create_pool
from shop.embedded import replace_dbname
from shop.keys import Keys
from shop.migrate import NotMigrated
from shop.redis import Scripts, create_redis
from shop.worker import (
    JOBS,
    Job,
    JobContext,
    purge_expired_refresh_tokens,
    registered_jobs,
    run_worker,
    tick,
)


@pytest.fixture
async def ctx(settings, db):
    pool = await create_pool(msgspec.structs.replace(settings, db_pool_min=1, db_pool_max=4))
    redis = create_redis(settings.redis_url)
    yield JobContext(settings, pool, redis, Scripts(redis), Keys(settings.redis_prefix))
    await redis.aclose()
    await pool.close()


async def _token(db: asyncpg.Connection, user_id: int, expires_in: str) -> int:
    return await db.fetchval(
        """insert into refresh_tokens (token_hash, family_id, user_id, expires_at)
           values ($1, gen_random_uuid(), $2, now() + $3::text::interval) returning id""",
        secrets.token_bytes(32),
        user_id,
        expires_in,
    )


async def test_purge_deletes_only_tokens_expired_over_a_day(ctx, db, make_user):
    user_id, _ = await make_user()
    old = await _token(db, user_id, "-2 days")
    recently_expired = await _token(db, user_id, "-1 hour")
    fresh = await _token(db, user_id, "30 days")

    outcomes = await tick(ctx, [JOBS["purge_expired_refresh_tokens"]])

    assert outcomes == {"purge_expired_refresh_tokens": True}
    left = {r["id"] for r in await db.fetch("select id from refresh_tokens")}
    assert left == {recently_expired, fresh}
    assert old not in left


async def test_purge_works_in_batches(ctx, db, make_user, monkeypatch):
    import shop.worker

    monkeypatch.setattr(shop.worker, "PURGE_BATCH", 3)
    user_id, _ = await make_user()
    for _ in range(7):
        await _token(db, user_id, "-3 days")
    keep = await _token(db, user_id, "1 day")

    assert await purge_expired_refresh_tokens(ctx) == 7
    assert [r["id"] for r in await db.fetch("select id from refresh_tokens")] == [keep]


async def test_failing_job_does_not_stop_the_others(ctx, db, make_user):
    user_id, _ = await make_user()
    await _token(db, user_id, "-5 days")
    ran = []

    async def broken(ctx: JobContext) -> None:
        raise RuntimeError("boom")

    async def counter(ctx: JobContext) -> None:
        ran.append(1)

    jobs = [Job("broken", 1, broken), JOBS["purge_expired_refresh_tokens"], Job("counter", 1, counter)]
    outcomes = await tick(ctx, jobs)

    assert outcomes == {"broken": False, "purge_expired_refresh_tokens": True, "counter": True}
    assert ran == [1]
    assert await db.fetchval("select count(*) from refresh_tokens") == 0


async def test_run_worker_retries_failures_and_finishes_the_run_in_progress(settings, db):
    calls = {"flaky": 0}
    flaky_retried = asyncio.Event()
    slow_finished = asyncio.Event()
    slow_started = asyncio.Event()

    async def flaky(ctx: JobContext) -> None:
        calls["flaky"] += 1
        if calls["flaky"] == 1:
            raise RuntimeError("first run fails")
        if calls["flaky"] == 3:
            flaky_retried.set()

    async def slow(ctx: JobContext) -> None:
        assert await ctx.pool.fetchval("select 1") == 1
        assert await ctx.redis.ping()
        slow_started.set()
        await asyncio.sleep(0.3)
        slow_finished.set()

    stopping = asyncio.Event()
    worker = asyncio.create_task(
        run_worker(settings, [Job("flaky", 0.01, flaky), Job("slow", 60, slow)], stopping)
    )
    await asyncio.wait_for(slow_started.wait(), 10)
    await asyncio.wait_for(flaky_retried.wait(), 10)
    stopping.set()  # the slow run is still in progress: shutdown waits for it
    await asyncio.wait_for(worker, 10)
    assert slow_finished.is_set()


async def test_worker_refuses_unmigrated_database(servers, settings):
    admin = await asyncpg.connect(servers.database_admin_url)
    name = f"shop_unmigrated_w{os.getpid()}"
    await admin.execute(f'drop database if exists "{name}"')
    await admin.execute(f'create database "{name}"')
    try:
        bare = msgspec.structs.replace(settings, database_url=replace_dbname(settings.database_url, name))
        with pytest.raises(NotMigrated, match="run `shop migrate`"):
            await run_worker(bare, [])
    finally:
        await admin.execute(f'drop database if exists "{name}" with (force)')
        await admin.close()


def test_purge_job_is_registered():
    job = next(job for job in registered_jobs() if job.name == "purge_expired_refresh_tokens")
    assert job.func is purge_expired_refresh_tokens
    assert job.every > 0

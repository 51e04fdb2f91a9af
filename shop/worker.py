"""Background jobs: periodic jobs run concurrently in one asyncio process (`shop worker`).

A domain registers a job with `@periodic("cancel_unpaid_orders", every_seconds=10)` on an
`async def job(ctx: JobContext)` and adds its module to JOB_MODULES. Several worker processes
may run at once, so every job must be safe to run concurrently with itself: claim work with
`FOR UPDATE SKIP LOCKED` or Redis consumer groups. A failing run is logged and retried on the
next tick; it never stops the other jobs.
"""

from __future__ import annotations

import asyncio
import importlib
import logging
import signal
import time
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass, field

import asyncpg
import redis.asyncio as aioredis

from shop.keys import Keys
from shop.payments.service import build_providers, close_providers
from shop.settings import Settings

log = logging.getLogger("shop.worker")

# Modules whose import registers jobs with @periodic and order-event handlers with @on_order_event
# (shop.events.subscribed relies on it); a domain that adds either adds its module here.
JOB_MODULES: list[str] = [
    "shop.worker",
    "shop.orders.jobs",
    "shop.payments.shipping_info",
    "shop.hotpath.jobs",
    "shop.coupons.jobs",
    "shop.flash_sale.jobs",
    "shop.points",
    "games.jobs",
]
# On shutdown a run in progress gets this long to finish before it is cancelled.
SHUTDOWN_GRACE_SECONDS = 30.0


@dataclass(frozen=True)
class JobContext:
    settings: Settings
    pool: asyncpg.Pool
    redis: aioredis.Redis
    scripts: object  # shop.redis.Scripts
    keys: Keys
    providers: dict = field(default_factory=dict)  # payment providers by name


JobFunc = Callable[[JobContext], Awaitable[object]]


@dataclass(frozen=True)
class Job:
    name: str
    every: float  # seconds between the end of one run and the start of the next
    func: JobFunc


JOBS: dict[str, Job] = {}


def periodic(name: str, every_seconds: float) -> Callable[[JobFunc], JobFunc]:
    """Register `func` to run every `every_seconds` in each worker process."""

    def register(func: JobFunc) -> JobFunc:
        if name in JOBS and JOBS[name].func is not func:
            raise RuntimeError(f"two jobs named {name}")
        JOBS[name] = Job(name, every_seconds, func)
        return func

    return register


def registered_jobs() -> list[Job]:
    for module in JOB_MODULES:
        importlib.import_module(module)
    return list(JOBS.values())


async def run_job_once(job: Job, ctx: JobContext) -> bool:
    """One run of one job; a failure is logged (not raised) so the job is simply retried next tick."""
    started = time.perf_counter()
    try:
        result = await job.func(ctx)
    except asyncio.CancelledError:
        raise
    except Exception:
        log.exception(
            "job failed",
            extra={"fields": {"job": job.name, "ms": round((time.perf_counter() - started) * 1000, 1)}},
        )
        return False
    fields = {"job": job.name, "ms": round((time.perf_counter() - started) * 1000, 1)}
    if result is not None:
        fields["result"] = result
    log.debug("job done", extra={"fields": fields})
    return True


async def tick(ctx: JobContext, jobs: Iterable[Job] | None = None) -> dict[str, bool]:
    """Run every job once, concurrently; job name -> whether it succeeded."""
    jobs = list(registered_jobs() if jobs is None else jobs)
    outcomes = await asyncio.gather(*(run_job_once(job, ctx) for job in jobs))
    return {job.name: ok for job, ok in zip(jobs, outcomes, strict=True)}


async def _run_periodically(job: Job, ctx: JobContext, stopping: asyncio.Event) -> None:
    while not stopping.is_set():
        await run_job_once(job, ctx)
        try:
            await asyncio.wait_for(stopping.wait(), timeout=job.every)
        except TimeoutError:
            pass


async def check_migrated(pool: asyncpg.Pool) -> None:
    """Refuse to work on a database that `shop migrate` has not brought up to date."""
    from shop.migrate import ensure_migrated

    async with pool.acquire() as conn:
        await ensure_migrated(conn)


async def run_worker(
    settings: Settings, jobs: Iterable[Job] | None = None, stopping: asyncio.Event | None = None
) -> None:
    """Run every job until SIGINT/SIGTERM (or `stopping` is set); runs in progress finish first."""
    from shop.db import create_pool
    from shop.observability import configure_logging
    from shop.redis import Scripts, create_redis

    configure_logging(settings.log_level)
    jobs = list(registered_jobs() if jobs is None else jobs)
    stopping = stopping or asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(signum, stopping.set)
    pool = await create_pool(settings)
    redis = None
    providers: dict = {}
    try:
        await check_migrated(pool)
        redis = create_redis(settings.redis_url)
        providers = build_providers(settings)
        ctx = JobContext(settings, pool, redis, Scripts(redis), Keys(settings.redis_prefix), providers)
        log.info("worker started", extra={"fields": {"jobs": [job.name for job in jobs]}})
        runners = [asyncio.create_task(_run_periodically(job, ctx, stopping), name=job.name) for job in jobs]
        await stopping.wait()
        log.info("worker stopping: finishing the runs in progress")
        _finished, late = await asyncio.wait(runners, timeout=SHUTDOWN_GRACE_SECONDS)
        for task in late:
            log.warning("job cancelled at shutdown", extra={"fields": {"job": task.get_name()}})
            task.cancel()
        await asyncio.gather(*late, return_exceptions=True)
    finally:
        for signum in (signal.SIGINT, signal.SIGTERM):
            loop.remove_signal_handler(signum)
        await close_providers(providers)
        if redis is not None:
            await redis.aclose()
        await pool.close()
    log.info("worker stopped")


# Jobs ---------------------------------------------------------------------------------------

PURGE_BATCH = 1000


@periodic("purge_expired_refresh_tokens", every_seconds=3600)
async def purge_expired_refresh_tokens(ctx: JobContext) -> int:
    """Delete refresh tokens expired more than a day ago, in short batches that hold few row locks."""
    total = 0
    while True:
        async with ctx.pool.acquire() as conn:
            # SKIP LOCKED: a second worker purging at the same time takes other rows instead of waiting.
            deleted = await conn.fetchval(
                """with doomed as (
                       select id from refresh_tokens
                       where expires_at < now() - interval '1 day'
                       limit $1
                       for update skip locked)
                   , gone as (delete from refresh_tokens r using doomed where r.id = doomed.id returning 1)
                   select count(*) from gone""",
                PURGE_BATCH,
            )
        total += deleted
        if deleted < PURGE_BATCH:
            return total

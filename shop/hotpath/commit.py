"""The API's side of a hot path: run the deciding script, then group-commit the winners.

Concurrent winners within a short window (up to `max_wait` seconds or `max_batch` entries) are
written by one multi-row statement on one pooled connection: 100 rows per statement is ~10x the
rows/s of one INSERT per row (PERFORMANCE.md). Each waiting request is answered only after the
transaction holding its row has committed, so a success response means the row is in
PostgreSQL; when the write fails, every waiter of that batch gets the exception.
"""

from __future__ import annotations

import asyncio
from typing import Any

import asyncpg
import redis.asyncio as aioredis
from redis.commands.core import AsyncScript
from redis.exceptions import NoScriptError

from shop.hotpath.streams import PERSISTERS, Persist, Reservation


class GroupCommitter:
    """Coalesces concurrent `write` calls of one kind into one transaction each window."""

    def __init__(
        self, pool: asyncpg.Pool, persist: Persist, *, max_batch: int = 100, max_wait: float = 0.002
    ):
        self.pool = pool
        self.persist = persist
        self.max_batch = max_batch
        self.max_wait = max_wait
        self._waiting: list[tuple[Reservation, asyncio.Future]] = []
        self._timer: asyncio.TimerHandle | None = None
        self._flushes: set[asyncio.Task] = set()

    async def write(self, reservation: Reservation) -> Any:
        """Return once the reservation's row is committed; raise what the write raised.

        A persister may return {reservation id: result} (say, the rows it created): each waiter
        gets its own entry (None when the row already existed).
        """
        loop = asyncio.get_running_loop()
        future = loop.create_future()
        self._waiting.append((reservation, future))
        if len(self._waiting) >= self.max_batch:
            self._flush_now()
        elif self._timer is None:
            self._timer = loop.call_later(self.max_wait, self._flush_now)
        # A request that goes away does not cancel the batch its row belongs to.
        return await asyncio.shield(future)

    def _flush_now(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        batch, self._waiting = self._waiting, []
        if batch:
            task = asyncio.get_running_loop().create_task(self._flush(batch))
            self._flushes.add(task)
            task.add_done_callback(self._flushes.discard)

    async def _flush(self, batch: list[tuple[Reservation, asyncio.Future]]) -> None:
        try:
            async with self.pool.acquire() as conn, conn.transaction():
                results = await self.persist(conn, [reservation for reservation, _ in batch])
        except asyncio.CancelledError:
            for _, future in batch:
                future.cancel()
            raise
        except Exception as exc:
            for _, future in batch:
                if not future.done():
                    future.set_exception(exc)
        else:
            results = results if isinstance(results, dict) else {}
            for reservation, future in batch:
                if not future.done():
                    future.set_result(results.get(reservation.id))


class ScriptPipeliner:
    """Sends the script calls made in one event-loop turn as one pipeline: one connection, one round trip.

    Python, not Redis, is the limit on this path (PERFORMANCE.md); a crowd of concurrent claims
    also stays within the client's connection pool instead of opening a connection each.
    """

    def __init__(self, redis: aioredis.Redis, *, max_batch: int = 128) -> None:
        self.redis = redis
        self.max_batch = max_batch
        self._waiting: list[tuple[AsyncScript, list[str], list[Any], asyncio.Future]] = []
        self._scheduled = False
        self._flushes: set[asyncio.Task] = set()

    async def call(self, script: AsyncScript, keys: list[str], args: list[Any]) -> Any:
        loop = asyncio.get_running_loop()
        future = loop.create_future()
        self._waiting.append((script, keys, args, future))
        if not self._scheduled:
            self._scheduled = True
            loop.call_soon(self._flush_now)
        return await asyncio.shield(future)

    def _flush_now(self) -> None:
        self._scheduled = False
        waiting, self._waiting = self._waiting, []
        for start in range(0, len(waiting), self.max_batch):
            task = asyncio.get_running_loop().create_task(
                self._flush(waiting[start : start + self.max_batch])
            )
            self._flushes.add(task)
            task.add_done_callback(self._flushes.discard)

    async def _flush(self, batch: list) -> None:
        try:
            async with self.redis.pipeline(transaction=False) as pipe:
                for script, keys, args, _ in batch:
                    pipe.evalsha(script.sha, len(keys), *keys, *args)
                replies = await pipe.execute(raise_on_error=False)
        except Exception as exc:
            for *_, future in batch:
                if not future.done():
                    future.set_exception(exc)
            return
        for (script, keys, args, future), reply in zip(batch, replies, strict=True):
            if isinstance(reply, NoScriptError):
                # Redis lost its script cache (restart, SCRIPT FLUSH): the call did not run, so
                # running it again through the script object (which reloads it) is safe.
                try:
                    reply = await script(keys=keys, args=args)
                except Exception as exc:
                    reply = exc
            if future.done():
                continue
            if isinstance(reply, Exception):
                future.set_exception(reply)
            else:
                future.set_result(reply)


class HotPath:
    """Per API process: the script pipeliner and one group committer per kind, over the app's pool."""

    def __init__(
        self,
        pool: asyncpg.Pool,
        redis: aioredis.Redis | None = None,
        *,
        max_batch: int = 100,
        max_wait: float = 0.002,
    ) -> None:
        self.pool = pool
        self.max_batch = max_batch
        self.max_wait = max_wait
        self._committers: dict[str, GroupCommitter] = {}
        # Cluster clients route each call by its keys: those call the script directly.
        self._pipeliner = ScriptPipeliner(redis) if isinstance(redis, aioredis.Redis) else None

    def committer(self, kind: str) -> GroupCommitter:
        committer = self._committers.get(kind)
        if committer is None:
            committer = self._committers[kind] = GroupCommitter(
                self.pool, PERSISTERS[kind], max_batch=self.max_batch, max_wait=self.max_wait
            )
        return committer

    async def reserve(self, script: AsyncScript, *, keys: list[str], args: list[Any]) -> list[Any]:
        """Run the deciding script; its reply starts with "ok", "replay" or the refusal's name.

        On "ok" the script has already XADDed the reservation to the activity's stream, so even
        if this process dies before `commit`, the worker persists it.
        """
        if self._pipeliner is not None:
            reply = await self._pipeliner.call(script, keys, args)
        else:
            reply = await script(keys=keys, args=args)
        return list(reply) if isinstance(reply, list | tuple) else [reply]

    async def commit(self, kind: str, reservation: Reservation) -> Any:
        """Write the reservation's row (group-committed); returns once it is committed, with the
        persister's result for it, if it gives one."""
        return await self.committer(kind).write(reservation)


def hotpath_of(state: Any) -> HotPath:
    """The app's HotPath, made on first use (bound to the app's current pool)."""
    hotpath = getattr(state, "hotpath", None)
    if hotpath is None or hotpath.pool is not state.pool:
        hotpath = HotPath(state.pool, state.redis)
        state.hotpath = hotpath
    return hotpath

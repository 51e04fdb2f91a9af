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
import hiredis
import redis.asyncio as aioredis
from redis.asyncio.cluster import ClusterNode, RedisCluster
from redis.commands.core import AsyncScript
from redis.exceptions import (
    AskError,
    ClusterDownError,
    ConnectionError,
    MaxConnectionsError,
    MovedError,
    NoScriptError,
    RedisClusterException,
    ResponseError,
    TryAgainError,
)
from redis.exceptions import TimeoutError as RedisTimeoutError

from shop.hotpath.streams import PERSISTERS, SINGLE_STATEMENT, Persist, Reservation


class GroupCommitter:
    """Coalesces concurrent `write` calls of one kind into one transaction per batch.

    Adaptive: at most `max_inflight` batches are being written at once; whatever arrives
    meanwhile waits and goes as the next batch the moment one finishes. Under a crowd the
    batches grow by themselves (fewer, larger transactions: less PostgreSQL work per row and
    fewer commits to flush), and when it is quiet a lone write waits at most `max_wait`.
    One batch in flight per process is the default: every API process has its own committer, so
    PostgreSQL already gets several batches at once, and with two per process the batches were
    half as large and cost PostgreSQL ~15% more CPU per row (BENCHMARKS.md).
    `single_statement`: the persister runs one statement, atomic by itself, so no BEGIN/COMMIT.
    """

    def __init__(
        self,
        pool: asyncpg.Pool,
        persist: Persist,
        *,
        max_batch: int = 100,
        max_wait: float = 0.002,
        max_inflight: int = 1,
        single_statement: bool = False,
    ):
        self.pool = pool
        self.persist = persist
        self.max_batch = max_batch
        self.max_wait = max_wait
        self.max_inflight = max_inflight
        self.single_statement = single_statement
        self.timeout = 60.0
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
        elif self._timer is None and len(self._flushes) < self.max_inflight:
            self._timer = loop.call_later(self.max_wait, self._flush_now)
        # A request that goes away cancels only its own future (no shield needed): the batch its
        # row belongs to is a task of its own, and it skips futures that are done.
        return await future

    def _flush_now(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        # With every slot busy, the waiting rows go when a batch in flight finishes (_finished).
        while self._waiting and len(self._flushes) < self.max_inflight:
            batch, self._waiting = self._waiting[: self.max_batch], self._waiting[self.max_batch :]
            task = asyncio.get_running_loop().create_task(self._flush(batch))
            self._flushes.add(task)
            task.add_done_callback(self._finished)

    def _finished(self, task: asyncio.Task) -> None:
        self._flushes.discard(task)
        if self._waiting:
            self._flush_now()

    def _next_batch(self) -> None:
        """This batch's statement is done: the next batch goes now, before this one's waiters are
        woken, so PostgreSQL writes it while they answer (otherwise it idles for that time)."""
        task = asyncio.current_task()
        if task is not None:
            self._finished(task)

    async def _flush(self, batch: list[tuple[Reservation, asyncio.Future]]) -> None:
        try:
            # One client-side limit per batch (PostgreSQL enforces statement_timeout itself; this
            # covers a server that stops answering without closing the connection).
            async with asyncio.timeout(self.timeout), self.pool.acquire() as conn:
                if self.single_statement:
                    results = await self.persist(conn, [reservation for reservation, _ in batch])
                else:
                    async with conn.transaction():
                        results = await self.persist(conn, [reservation for reservation, _ in batch])
        except asyncio.CancelledError:
            for _, future in batch:
                future.cancel()
            raise
        except Exception as exc:
            self._next_batch()
            for _, future in batch:
                if not future.done():
                    future.set_exception(exc)
        else:
            self._next_batch()
            results = results if isinstance(results, dict) else {}
            for reservation, future in batch:
                if not future.done():
                    future.set_result(results.get(reservation.id))


class ScriptsNotSent(ConnectionError):
    """None of the scripts ran: no connection to Redis could be made for the batch, or a Redis
    Cluster refused the call before running it (the answer is a plain outage, not "unconfirmed")."""


# Cluster refusals that mean the script did not run. ASK (its slot is being migrated) is not
# followed: redis-py sends ASKING and the command on different connections, so the target may
# refuse it again; the call is answered as an outage to try again shortly. (MOVED is followed:
# HotPath.reserve.)
REFUSED_UNRUN = (ClusterDownError, TryAgainError)


def _pack(commands: list[tuple[Any, ...]]) -> bytes:
    """RESP for the commands; hiredis's C packer is ~5x faster than redis-py's."""
    return b"".join([hiredis.pack_command(command) for command in commands])


class ScriptPipeliner:
    """Sends the script calls made in one event-loop turn as one pipeline: one connection, one round trip.

    Python, not Redis, is the limit on this path (PERFORMANCE.md): the calls are
    packed and written straight on connections this object keeps (redis-py's Pipeline and pool
    bookkeeping cost more per call than the script itself), and a crowd of concurrent calls stays
    on a handful of connections instead of opening one each.
    """

    MAX_IDLE = 8

    def __init__(
        self, connection_class: type, connection_kwargs: dict[str, Any], *, max_batch: int = 128
    ) -> None:
        """Connections to one server: `connection_class(**connection_kwargs)`, as a client's pool
        (`of`) or a Redis Cluster node makes them."""
        self.max_batch = max_batch
        # Our connections: the client's settings without redis-py's per-command socket timeout (an
        # asyncio timeout around every reply, a task per send). That timeout bounds a whole batch's
        # round trip instead (connect, send, every reply), as the client's connections would get it:
        # redis-py's default, 5 s, is the connection's, not the pool's (making the object does not
        # connect).
        self.timeout: float | None = connection_class(**connection_kwargs).socket_timeout
        self._connection_class = connection_class
        self._connection_kwargs = {**connection_kwargs, "socket_timeout": None}
        self._waiting: list[tuple[AsyncScript, list[str], list[Any], asyncio.Future]] = []
        self._scheduled = False
        self._flushes: set[asyncio.Task] = set()
        self._idle: list[Any] = []  # connected redis.asyncio.Connection objects, ours alone
        self._open: set[Any] = set()  # every connection of ours, idle or in use
        self._closed = False

    @classmethod
    def of(cls, redis: aioredis.Redis) -> ScriptPipeliner:
        pool = redis.connection_pool
        return cls(pool.connection_class, pool.connection_kwargs)

    async def call(self, script: AsyncScript, keys: list[str], args: list[Any]) -> Any:
        loop = asyncio.get_running_loop()
        future = loop.create_future()
        self._waiting.append((script, keys, args, future))
        if not self._scheduled:
            self._scheduled = True
            loop.call_soon(self._flush_now)
        # A caller that goes away cancels only its own future; the batch skips futures that are done.
        return await future

    async def aclose(self) -> None:
        """Every connection closed; batches still under way close theirs when done."""
        self._closed = True
        self._idle = []
        conns, self._open = self._open, set()
        for conn in conns:
            await conn.disconnect()

    async def _connection(self) -> Any:
        """A kept connection the server has not closed (a restart, its idle `timeout`, a proxy:
        checked the way redis-py's pool checks before reuse), or a new one."""
        while self._idle:
            conn = self._idle.pop()
            try:
                if conn.is_connected and not await conn.can_read():
                    return conn
            except (ConnectionError, OSError):
                pass
            except BaseException:  # the batch's deadline, or a cancellation: not kept half-checked
                await self._discard(conn)
                raise
            await self._discard(conn)
        conn = self._connection_class(**self._connection_kwargs)
        self._open.add(conn)
        try:
            await conn.connect()
        except (ConnectionError, RedisTimeoutError, OSError) as exc:
            await self._discard(conn)
            raise ScriptsNotSent(f"Redis unreachable: {exc}") from exc
        except BaseException:  # the batch's deadline, or a cancellation: not kept half-open
            await self._discard(conn)
            raise
        return conn

    async def _discard(self, conn: Any) -> None:
        self._open.discard(conn)
        await conn.disconnect()

    def _flush_now(self) -> None:
        self._scheduled = False
        waiting, self._waiting = self._waiting, []
        for start in range(0, len(waiting), self.max_batch):
            task = asyncio.get_running_loop().create_task(
                self._flush(waiting[start : start + self.max_batch])
            )
            self._flushes.add(task)
            task.add_done_callback(self._flushes.discard)

    async def _roundtrip(self, batch: list) -> list[Any]:
        """Every call of the batch on one connection; each reply, or the error Redis answered.

        A failure after the send is not retried: whether the unanswered scripts ran cannot be
        known (a winner's reservation is in the stream either way, and the worker persists it).
        The replies read before it stand; each call still unanswered gets the failure."""
        packed = _pack([("EVALSHA", script.sha, len(keys), *keys, *args) for script, keys, args, _ in batch])
        replies: list[Any] = []
        conn = None
        try:
            async with asyncio.timeout(self.timeout):
                conn = await self._connection()
                await conn.send_packed_command(packed, check_health=False)
                for _ in batch:
                    try:
                        replies.append(await conn.read_response())
                    except ResponseError as exc:
                        replies.append(exc)
        except BaseException as exc:
            if conn is not None:
                await self._discard(conn)
            if isinstance(exc, asyncio.CancelledError) or not replies:
                raise
            return replies + [exc] * (len(batch) - len(replies))
        if len(self._idle) < self.MAX_IDLE and not self._closed:
            self._idle.append(conn)
        else:
            await self._discard(conn)
        return replies

    async def _flush(self, batch: list) -> None:
        try:
            replies = await self._roundtrip(batch)
        except BaseException as exc:
            for *_, future in batch:
                if not future.done():
                    if isinstance(exc, asyncio.CancelledError):
                        future.cancel()
                    else:
                        future.set_exception(exc)
            if isinstance(exc, asyncio.CancelledError):
                raise
            return
        for (script, keys, args, future), reply in zip(batch, replies, strict=True):
            if isinstance(reply, NoScriptError):
                # Redis lost its script cache (restart, SCRIPT FLUSH): the call did not run, so
                # running it again through the script object (which reloads it) is safe.
                try:
                    reply = await script(keys=keys, args=args)
                except MaxConnectionsError as exc:  # refused before sending
                    reply = ScriptsNotSent(str(exc))
                except Exception as exc:
                    reply = exc
            elif isinstance(reply, REFUSED_UNRUN):
                reply = ScriptsNotSent(f"Redis refused the script without running it: {reply}")
            if future.done():
                continue
            if isinstance(reply, Exception):
                future.set_exception(reply)
            else:
                future.set_result(reply)


class HotPath:
    """Per API process: the script pipeliner and one group committer per kind.

    `pool` is the app's pool (for the callers' own reads); the committers write over `write_pool`
    (the app's hot-path pool: shop.db.create_hot_pool), or over `pool` when there is none.
    """

    def __init__(
        self,
        pool: asyncpg.Pool,
        redis: aioredis.Redis | RedisCluster,
        *,
        write_pool: asyncpg.Pool | None = None,
        max_batch: int = 100,
        max_wait: float = 0.002,
    ) -> None:
        self.pool = pool
        self.write_pool = write_pool or pool
        self.max_batch = max_batch
        self.max_wait = max_wait
        self.redis = redis
        self._committers: dict[str, GroupCommitter] = {}
        # One Redis: one pipeliner. A Redis Cluster: one per node, each call sent to the node
        # serving its keys' slot (they share one hash tag).
        self._pipeliner = ScriptPipeliner.of(redis) if isinstance(redis, aioredis.Redis) else None
        self._node_pipeliners: dict[str, ScriptPipeliner] = {}  # by node name, host:port
        self._prune = False
        self._closing: set[asyncio.Task] = set()

    def committer(self, kind: str) -> GroupCommitter:
        committer = self._committers.get(kind)
        if committer is None:
            committer = self._committers[kind] = GroupCommitter(
                self.write_pool,
                PERSISTERS[kind],
                max_batch=self.max_batch,
                max_wait=self.max_wait,
                single_statement=kind in SINGLE_STATEMENT,
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
            reply = await self._cluster_call(script, keys, args)
        return list(reply) if isinstance(reply, list | tuple) else [reply]

    async def _cluster_call(self, script: AsyncScript, keys: list[str], args: list[Any]) -> Any:
        pipeliner = await self._node_pipeliner(keys[0])
        try:
            for _ in range(self.MAX_REDIRECTS):
                try:
                    return await pipeliner.call(script, keys, args)
                except MovedError as moved:
                    # The slot is served elsewhere now (a resharding, a failover): the script did
                    # not run; it goes to the node MOVED names, and the next call reloads the map.
                    self._reload_slot_map()
                    host, port = moved.node_addr
                    pipeliner = self._pipeliner_of(
                        ClusterNode(host, port, **self.redis.get_connection_kwargs())
                    )
                except AskError as asked:
                    raise ScriptsNotSent(f"Redis Cluster slot being migrated: {asked}") from asked
            raise ScriptsNotSent("Redis Cluster redirected the call too many times")
        except (ConnectionError, RedisTimeoutError, OSError):
            self._reload_slot_map()  # the node may be gone (a failover)
            raise

    MAX_REDIRECTS = 3

    def _reload_slot_map(self) -> None:
        """The next call asks the cluster for its slot map, as the cluster client does after a
        connection error of its own (redis-py's flag for it), and drops pipelines of nodes that
        left."""
        self.redis._initialize = True
        self._prune = True

    async def _node_pipeliner(self, key: str) -> ScriptPipeliner:
        """The pipeliner of the Redis Cluster node serving `key`'s slot (the slot map as the
        cluster client knows it; a call that lands on a node no longer serving it is redirected)."""
        cluster = self.redis
        try:
            await cluster.initialize()  # a no-op while the slot map is good
            node = cluster.get_node_from_key(key)
        except (RedisClusterException, ConnectionError, RedisTimeoutError, OSError) as exc:
            raise ScriptsNotSent(f"Redis Cluster unreachable: {exc}") from exc
        if self._prune:
            self._prune = False
            for name in set(self._node_pipeliners) - set(cluster.nodes_manager.nodes_cache):
                gone = self._node_pipeliners.pop(name)
                self._closing.add(task := asyncio.get_running_loop().create_task(gone.aclose()))
                task.add_done_callback(self._closing.discard)
        return self._pipeliner_of(node)

    def _pipeliner_of(self, node: ClusterNode) -> ScriptPipeliner:
        """The node's pipeliner, by its name (host:port, as the slot map names nodes); its
        connections are made as the cluster client makes the node's."""
        pipeliner = self._node_pipeliners.get(node.name)
        if pipeliner is None:
            pipeliner = self._node_pipeliners[node.name] = ScriptPipeliner(
                node.connection_class, node.connection_kwargs
            )
        return pipeliner

    async def aclose(self) -> None:
        """The pipelines' own Redis connections closed (the app's lifespan, at shutdown)."""
        for pipeliner in [self._pipeliner, *self._node_pipeliners.values()]:
            if pipeliner is not None:
                await pipeliner.aclose()
        await asyncio.gather(*self._closing, return_exceptions=True)

    async def commit(self, kind: str, reservation: Reservation) -> Any:
        """Write the reservation's row (group-committed); returns once it is committed, with the
        persister's result for it, if it gives one."""
        return await self.committer(kind).write(reservation)


def hotpath_of(state: Any) -> HotPath:
    """The app's HotPath, made on first use (bound to the app's current pools)."""
    write_pool = getattr(state, "hot_pool", None) or state.pool
    hotpath = getattr(state, "hotpath", None)
    if hotpath is None or hotpath.pool is not state.pool or hotpath.write_pool is not write_pool:
        hotpath = HotPath(state.pool, state.redis, write_pool=write_pool)
        state.hotpath = hotpath
    return hotpath

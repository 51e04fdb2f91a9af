"""Redis client and the Lua script registry (every */lua/*.lua loaded once)."""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path

import redis.asyncio as aioredis
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff
from redis.commands.core import AsyncScript

LUA_DIRS = [Path(__file__).parent / "lua", Path(__file__).parent.parent / "games" / "lua"]


def create_redis(url: str) -> aioredis.Redis:
    # hiredis parses replies when installed. redis-py's default 5 s socket timeout stays for
    # ordinary commands and for Cluster clients; the hot path's script pipeline applies it once per
    # batch instead (shop/hotpath/commit.py: the per-command wrapper costs ~8% CPU per command).
    if url.startswith("redis+cluster://"):
        from redis.asyncio.cluster import RedisCluster

        # No retries, as with one server: a cluster client would otherwise send a command again
        # after a connection error or a timeout (10 times by default), whether it ran or not, and
        # a purchase script or a quota change sent twice is applied twice. The failure is
        # answered instead (a 503; the buy call's `flash_sale.unconfirmed`), and the next command reloads
        # the slot map; MOVED and ASK redirects, after which a command has not run, are still followed.
        return RedisCluster.from_url(
            "redis://" + url.removeprefix("redis+cluster://"),
            decode_responses=True,
            retry=Retry(NoBackoff(), 0),
        )
    return aioredis.from_url(url, decode_responses=True, health_check_interval=30)


class Scripts:
    """script name (file stem) -> registered script; redis-py reloads on NOSCRIPT by itself."""

    def __init__(self, client: aioredis.Redis, dirs: Iterable[Path] = LUA_DIRS) -> None:
        self._scripts: dict[str, AsyncScript] = {}
        for folder in dirs:
            for path in sorted(folder.glob("*.lua")):
                if path.stem in self._scripts:
                    raise RuntimeError(f"two Lua scripts named {path.stem}")
                self._scripts[path.stem] = client.register_script(path.read_text())

    def __getattr__(self, name: str) -> AsyncScript:
        try:
            return self._scripts[name]
        except KeyError:
            raise AttributeError(f"no Lua script named {name}") from None

    def __contains__(self, name: str) -> bool:
        return name in self._scripts

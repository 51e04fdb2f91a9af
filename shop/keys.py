"""Every Redis key and TTL, in one place.

Keys of one activity share a hash tag (`{fs:42}`) so a script touching them runs on one
Redis Cluster shard. The prefix (SHOP_REDIS_PREFIX) lets several shops or test runs share
one Redis.
"""

from __future__ import annotations


class Keys:
    def __init__(self, prefix: str) -> None:
        self.prefix = prefix

    def _k(self, tag: str, *parts: object) -> str:
        return ":".join([f"{self.prefix}:{{{tag}}}", *map(str, parts)])

    # Readiness probe key (own tag; touched only by /readyz).
    def ping(self) -> str:
        return self._k("ping", "ready")

    # Login rate limiting: one bucket per client IP.
    def login_bucket(self, ip: str) -> str:
        return self._k(f"login:{ip}", "bucket")

    # Mini-program access token shared by every process (own tag per appid), and the lock that
    # lets one process refresh it while the others wait for the cached value.
    def wechat_access_token(self, appid: str) -> str:
        return self._k(f"wxtoken:{appid}", "token")

    def wechat_access_token_lock(self, appid: str) -> str:
        return self._k(f"wxtoken:{appid}", "lock")

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

    @staticmethod
    def activity_id(key: str) -> int:
        """The id in a key's hash tag (the first {…}, as Redis reads it): `shop:{cpn:42}:stream` -> 42."""
        return int(key[key.index("{") + 1 : key.index("}")].rsplit(":", 1)[1])

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

    # Hot paths (shop/hotpath): the streams of one kind the worker persists, one set per kind.
    def hotpath_streams(self, kind: str) -> str:
        return self._k(f"hotpath:{kind}", "streams")

    # Coupon claiming: one hash tag per template, so the claim script runs on one shard.
    def coupon_state(self, template_id: int) -> str:
        return self._k(f"cpn:{template_id}", "state")

    def coupon_users(self, template_id: int) -> str:
        return self._k(f"cpn:{template_id}", "users")

    def coupon_claim_key(self, template_id: int, user_id: int, idempotency_key: str | None) -> str:
        return self._k(f"cpn:{template_id}", "idem", user_id, idempotency_key or "-")

    def coupon_stream(self, template_id: int) -> str:
        return self._k(f"cpn:{template_id}", "stream")

    # Flash sales: every key of one event shares the hash tag {fs:<event>}, so the purchase
    # script (and every other script of the event) runs on one Redis Cluster shard.
    def flash_state(self, event_id: int) -> str:
        return self._k(f"fs:{event_id}", "state")

    def flash_item(self, event_id: int, item_id: int) -> str:
        return self._k(f"fs:{event_id}", "item", item_id)

    def flash_bought(self, event_id: int, item_id: int) -> str:
        return self._k(f"fs:{event_id}", "bought", item_id)

    def flash_idem(self, event_id: int, user_id: int, idempotency_key: str | None) -> str:
        return self._k(f"fs:{event_id}", "idem", user_id, idempotency_key or "-")

    def flash_user_rate(self, event_id: int, user_id: int) -> str:
        return self._k(f"fs:{event_id}", "rate", "u", user_id)

    def flash_ip_rate(self, event_id: int, ip: str) -> str:
        return self._k(f"fs:{event_id}", "rate", "ip", ip)

    def flash_stream(self, event_id: int) -> str:
        return self._k(f"fs:{event_id}", "stream")

    def flash_stream_event(self, stream: str) -> int | None:
        """The event whose `flash_stream` this is (None for any other key)."""
        head, tail = f"{self.prefix}:{{fs:", "}:stream"
        middle = stream[len(head) : -len(tail)] if stream.startswith(head) and stream.endswith(tail) else ""
        return int(middle) if middle.isdigit() else None

    def flash_returned(self, event_id: int, item_id: int) -> str:
        return self._k(f"fs:{event_id}", "returned", item_id)

    def flash_keyed(self, event_id: int) -> str:
        """Set: the shoppers holding an Idempotency-Key record in the event (its winners with a key)."""
        return self._k(f"fs:{event_id}", "keyed")

    def flash_buy(
        self, event_id: int, item_id: int, user_id: int, idempotency_key: str | None, ip: str
    ) -> list[str]:
        """KEYS of flash_buy.lua, in its order."""
        return [
            self.flash_state(event_id),
            self.flash_item(event_id, item_id),
            self.flash_bought(event_id, item_id),
            self.flash_idem(event_id, user_id, idempotency_key),
            self.flash_user_rate(event_id, user_id),
            self.flash_ip_rate(event_id, ip),
            self.flash_stream(event_id),
            self.flash_keyed(event_id),
        ]

    # Games (games/): every key of one game shares the hash tag {game:<id>}, so the draw script
    # runs on one Redis Cluster shard.
    def game_state(self, game_id: int) -> str:
        return self._k(f"game:{game_id}", "state")

    def game_users(self, game_id: int) -> str:
        return self._k(f"game:{game_id}", "users")

    def game_day(self, game_id: int, business_date: str) -> str:
        return self._k(f"game:{game_id}", "day", business_date)

    def game_idem(self, game_id: int, user_id: int, idempotency_key: str | None) -> str:
        return self._k(f"game:{game_id}", "idem", user_id, idempotency_key or "-")

    def game_stream(self, game_id: int) -> str:
        return self._k(f"game:{game_id}", "stream")

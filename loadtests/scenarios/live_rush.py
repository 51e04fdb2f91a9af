"""The live-stream rush: shoppers log in (dev provider), wait for "3, 2, 1, buy!", take a token and fire.

Each shopper wants `RUSH_PER_USER_LIMIT` units, one per press, and keeps pressing (double taps
included) until it has them or hears sold out / ended; a 429 is waited out (Retry-After). The
event is created by loadtests/rush.py, which passes it in RUSH_* environment variables.
"""

from __future__ import annotations

import os
import time
import uuid

import gevent
from locust import HttpUser, constant, task
from locust.exception import StopUser

SALE_ID = int(os.environ.get("RUSH_SALE_ID", "0"))
ITEM_ID = int(os.environ.get("RUSH_ITEM_ID", "0"))
STARTS_AT = float(os.environ.get("RUSH_STARTS_AT", "0"))
WANT = int(os.environ.get("RUSH_PER_USER_LIMIT", "1"))
DONE = {"flash_sale.sold_out", "flash_sale.ended", "flash_sale.limit_exceeded"}


class LiveStreamShopper(HttpUser):
    wait_time = constant(0)

    def on_start(self) -> None:
        r = self.client.post(
            "/api/v1/auth/login", json={"provider": "dev", "code": f"rush-{uuid.uuid4().hex}"}, name="login"
        )
        r.raise_for_status()
        self.auth = {"Authorization": f"Bearer {r.json()['access_token']}"}
        r = self.client.post(
            "/api/v1/me/addresses",
            json={
                "receiver": "张三",
                "phone": "13800138000",
                "province": "广东省",
                "city": "深圳市",
                "district": "南山区",
                "detail": "科技园 1 号",
                "is_default": True,
            },
            headers=self.auth,
            name="add address",
        )
        r.raise_for_status()
        self.address_id = r.json()["id"]
        self.bought = 0
        # Everyone waits for the host's countdown, then presses within the same instant.
        gevent.sleep(max(0.0, STARTS_AT - time.time()))
        self.token = self._token()

    def _token(self) -> str:
        while True:
            with self.client.get(
                f"/api/v1/flash-sales/{SALE_ID}/token", headers=self.auth, name="token", catch_response=True
            ) as r:
                if r.status_code == 200:
                    return r.json()["token"]
                if r.status_code == 409 and r.json()["error"]["code"] == "flash_sale.not_started":
                    r.success()  # a clock a little ahead of the server's: try again at once
                    gevent.sleep(0.05)
                    continue
                r.failure(f"token: {r.status_code} {r.text[:200]}")
                raise StopUser()

    @task
    def press_buy(self) -> None:
        with self.client.post(
            f"/api/v1/flash-sales/{SALE_ID}/items/{ITEM_ID}/orders",
            json={"qty": 1, "address_id": self.address_id, "token": self.token},
            headers={**self.auth, "Idempotency-Key": uuid.uuid4().hex},
            name="buy",
            catch_response=True,
        ) as r:
            if r.status_code == 201:
                r.success()  # recorded before StopUser leaves the block (else the wins go unreported)
                self.bought += 1
                if self.bought >= WANT:
                    raise StopUser()
                return
            if r.status_code == 429:
                r.success()  # anti-scalper limit: wait as told
                gevent.sleep(float(r.headers.get("Retry-After", "1")))
                return
            if r.status_code == 409 and r.json()["error"]["code"] in DONE:
                r.success()  # the expected answer of a rush: most shoppers lose
                raise StopUser()
            r.failure(f"buy: {r.status_code} {r.text[:200]}")
            raise StopUser()

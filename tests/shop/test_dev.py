"""`shop dev --embedded` end to end: starts its own PostgreSQL and Valkey, serves, stops everything.

Slow on purpose (about 20-40 s): it runs the real command twice as a subprocess, including
initdb of a throwaway PostgreSQL, because "nothing left behind" can only be checked that way.
"""

from __future__ import annotations

import contextlib
import os
import re
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest
import redis

pytestmark = pytest.mark.slow

SHOP = Path(sys.executable).with_name("shop")
READY_TIMEOUT = 90
STOP_TIMEOUT = 20


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _mentions(pid: int, text: bytes) -> bool:
    for part in ("cmdline", "environ"):
        try:
            if text in Path(f"/proc/{pid}/{part}").read_bytes():
                return True
        except OSError:
            pass
    return False


def _processes_mentioning(data_dir: Path) -> list[int]:
    """Processes whose command line or environment names the data dir (servers and our children)."""
    text = str(data_dir).encode()
    me = os.getpid()
    return [
        int(entry.name)
        for entry in Path("/proc").iterdir()
        if entry.name.isdigit() and int(entry.name) != me and _mentions(int(entry.name), text)
    ]


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    # A zombie is dead for our purposes (its parent has not reaped it yet).
    try:
        return Path(f"/proc/{pid}/stat").read_text().split(")")[-1].split()[0] != "Z"
    except OSError:
        return False


class DevRun:
    def __init__(self, data_dir: Path, port: int, log: Path) -> None:
        env = {k: v for k, v in os.environ.items() if not k.startswith("SHOP_")}
        env.update(SHOP_DATA_DIR=str(data_dir), SHOP_LOG_REQUESTS="false", SHOP_LOG_LEVEL="WARNING")
        self.base = f"http://127.0.0.1:{port}"
        self.log = log
        with open(log, "ab") as out:
            self.process = subprocess.Popen(
                [str(SHOP), "dev", "--embedded", "--port", str(port)],
                env=env,
                stdout=out,
                stderr=subprocess.STDOUT,
            )

    def wait_ready(self) -> None:
        deadline = time.monotonic() + READY_TIMEOUT
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                pytest.fail(f"shop dev exited with {self.process.returncode}:\n{self.log.read_text()}")
            try:
                if httpx.get(f"{self.base}/readyz", timeout=2).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.3)
        self.process.kill()
        pytest.fail(f"shop dev not ready within {READY_TIMEOUT}s:\n{self.log.read_text()}")

    def stop(self) -> int:
        self.process.send_signal(signal.SIGTERM)
        return self.process.wait(timeout=STOP_TIMEOUT)


def _wait_port_free(port: int, timeout: float = 10) -> None:
    deadline = time.monotonic() + timeout
    while True:
        with socket.socket() as sock:
            try:
                sock.bind(("127.0.0.1", port))
                return
            except OSError:
                if time.monotonic() > deadline:
                    raise
        time.sleep(0.1)


def _redis_url(log: Path) -> str:
    return re.findall(r"Redis +(redis://\S+)", log.read_text())[-1]


def _server_pids(data_dir: Path) -> tuple[int, int]:
    pg = int((data_dir / "pgdata" / "postmaster.pid").read_text().split("\n", 1)[0])
    valkey = int((data_dir / "valkey" / "valkey.pid").read_text().strip())
    return pg, valkey


def _admin_login(base: str) -> dict:
    from shop.seed import DEMO_ADMIN

    username, password = DEMO_ADMIN
    r = httpx.post(
        f"{base}/api/v1/admin/auth/login", json={"username": username, "password": password}, timeout=10
    )
    assert r.status_code == 200, r.text
    return r.json()


def _products(base: str) -> list[dict]:
    r = httpx.get(f"{base}/api/v1/products", params={"limit": 100}, timeout=10)
    assert r.status_code == 200, r.text
    return r.json()["items"]


@pytest.fixture
def data_dir(tmp_path):
    """The dev data folder; whatever a failed test left running there is killed afterwards."""
    folder = tmp_path / "data"
    yield folder
    for pid in _processes_mentioning(folder):
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)


def test_dev_serves_the_demo_store_stops_everything_and_keeps_its_data(data_dir, tmp_path):
    log = tmp_path / "dev.log"
    port = _free_port()

    first = DevRun(data_dir, port, log)
    try:
        first.wait_ready()
        banner = log.read_text()
        assert f"http://127.0.0.1:{port}/schema" in banner
        assert "demo admin" in banner
        assert "embedded" in banner
        products = _products(first.base)
        assert products, "the demo store has products"
        first_login = _admin_login(first.base)
        pg_pid, valkey_pid = _server_pids(data_dir)
        assert _alive(pg_pid) and _alive(valkey_pid)
        assert _processes_mentioning(data_dir)
        with redis.Redis.from_url(_redis_url(log)) as client:
            client.set("dev-test:kept", "yes")
    finally:
        if first.process.poll() is None:
            assert first.stop() == 0, log.read_text()

    assert not _alive(pg_pid), "PostgreSQL left running"
    assert not _alive(valkey_pid), "Valkey left running"
    assert _processes_mentioning(data_dir) == [], "a process of shop dev is still running"
    _wait_port_free(port, timeout=0)

    # Second start on the same folder: the same data, nothing seeded twice.
    second = DevRun(data_dir, port, log)
    try:
        second.wait_ready()
        assert [p["id"] for p in _products(second.base)] == [p["id"] for p in products]
        token = first_login["access_token"]
        me = httpx.get(
            f"{second.base}/api/v1/admin/auth/me", headers={"Authorization": f"Bearer {token}"}, timeout=10
        )
        assert me.status_code == 200, me.text
        # The first run's login time is still recorded: the admin row survived the restart.
        assert me.json()["last_login_at"] == first_login["admin"]["last_login_at"]
        with redis.Redis.from_url(_redis_url(log)) as client:
            assert client.get("dev-test:kept") == b"yes"  # Valkey's append-only file survived too
        pg_pid, valkey_pid = _server_pids(data_dir)
    finally:
        if second.process.poll() is None:
            assert second.stop() == 0, log.read_text()
    assert not _alive(pg_pid) and not _alive(valkey_pid)
    assert _processes_mentioning(data_dir) == []


def test_dev_recovers_servers_left_by_a_crashed_run(data_dir, tmp_path):
    log = tmp_path / "dev.log"
    port = _free_port()

    crashed = DevRun(data_dir, port, log)
    try:
        crashed.wait_ready()
    finally:
        crashed.process.kill()  # SIGKILL: no chance to stop anything
        crashed.process.wait()
    pg_pid, valkey_pid = _server_pids(data_dir)
    assert _alive(pg_pid) and _alive(valkey_pid), "the servers outlive a SIGKILLed shop dev"
    _wait_port_free(port)  # but its API and worker die with it

    again = DevRun(data_dir, port, log)
    try:
        again.wait_ready()
        assert _server_pids(data_dir)[0] == pg_pid  # the running PostgreSQL is reused
        assert not _alive(valkey_pid)  # the stray Valkey was stopped before a new one took its files
    finally:
        if again.process.poll() is None:
            assert again.stop() == 0, log.read_text()
    assert not _alive(pg_pid), "PostgreSQL of the crashed run left running"
    assert _processes_mentioning(data_dir) == []


def test_dev_refuses_a_busy_port_before_starting_anything(data_dir):
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        env = {k: v for k, v in os.environ.items() if not k.startswith("SHOP_")}
        result = subprocess.run(
            [str(SHOP), "dev", "--embedded", "--port", str(port)],
            env={**env, "SHOP_DATA_DIR": str(data_dir)},
            capture_output=True,
            text=True,
            timeout=30,
        )
    assert result.returncode == 1
    assert f"port {port} on 127.0.0.1 is in use" in result.stderr
    assert not data_dir.exists()  # no server was started

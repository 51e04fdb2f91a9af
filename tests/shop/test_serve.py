"""`shop serve` with several worker processes: metrics are summed over all of them."""

from __future__ import annotations

import os
import re
import signal
import socket
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest

pytestmark = pytest.mark.slow


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_metrics_are_aggregated_across_worker_processes(settings, tmp_path):
    port = free_port()
    metrics_dir = tmp_path / "prom"
    env = {
        **os.environ,
        "SHOP_DATABASE_URL": settings.database_url,
        "SHOP_REDIS_URL": settings.redis_url,
        "SHOP_REDIS_PREFIX": settings.redis_prefix,
        "SHOP_LOG_REQUESTS": "false",
        "PROMETHEUS_MULTIPROC_DIR": str(metrics_dir),
    }
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "shop.cli",
            "serve",
            "--host",
            "127.0.0.1",
            "--port",
            str(port),
            "--workers",
            "2",
        ],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
    )
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 60
        with httpx.Client(base_url=base, timeout=5) as probe:
            while True:
                try:
                    if probe.get("/readyz").status_code == 200:
                        break
                except httpx.TransportError:
                    pass
                assert time.monotonic() < deadline, "shop serve did not become ready"
                time.sleep(0.3)

        def burst(_: int) -> None:
            # Fresh connections from parallel threads, so the kernel spreads them over both workers.
            with httpx.Client(base_url=base, timeout=5) as c:
                for _ in range(5):
                    assert c.get("/healthz").status_code == 200

        with ThreadPoolExecutor(12) as pool:
            list(pool.map(burst, range(12)))
        # Each worker adds its requests to the shared metrics within a second.
        deadline = time.monotonic() + 10
        while True:
            with httpx.Client(base_url=base, timeout=5) as c:
                text = c.get("/metrics").text
            counts = re.findall(
                r'shop_http_requests_total\{method="GET",route="/healthz",status="200"\} ([0-9.]+)', text
            )
            if [float(n) for n in counts] == [60.0] or time.monotonic() > deadline:
                break
            time.sleep(0.3)
        assert [float(n) for n in counts] == [60.0]
        writers = {m.group(1) for f in metrics_dir.iterdir() if (m := re.search(r"_(\d+)\.db$", f.name))}
        assert len(writers) >= 2, writers
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            proc.kill()
            raise

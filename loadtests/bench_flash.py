"""Benchmark the flash-sale buy call against its ceilings, in one run, with wrk.

    python -m loadtests.bench_flash            # SHOP_DATABASE_URL / SHOP_REDIS_URL / SHOP_REDIS_PREFIX

Four apps, each served the same way (granian, ASGI, uvloop, 2 workers, one at a time on this
machine) and measured with the same wrk settings, in two phases of a sale:
- stock: a quota far larger than the run, so every request is a winner (ours: written to PostgreSQL);
- sold_out: every request loses.
Apps: `shop` (the real endpoint: auth, validation, token, rate limit, Lua, group commit),
`bare_evalsha` (decode + the same EVALSHA), `naive_for_update` (PostgreSQL SELECT … FOR UPDATE)
and, for the sold-out phase, `bare_jwt` (decode + JWT check only). Stop `shop worker` first: the
benchmark measures the API alone. Prints a Markdown table with req/s, p99 and the ratios.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import re
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx

from loadtests.reference.apps import NAIVE_SCHEMA
from loadtests.setup import make_shoppers, publish_sale
from shop.db import connect
from shop.redis import LUA_DIRS, create_redis
from shop.settings import load_settings, with_default_urls

HERE = Path(__file__).parent
ROOT = HERE.parent
VENV_BIN = Path(sys.executable).parent

APPS = {
    "shop": "shop.app:create_app",
    "bare_evalsha": "loadtests.reference.apps:bare_evalsha",
    "bare_jwt": "loadtests.reference.apps:bare_jwt",
    "naive_for_update": "loadtests.reference.apps:naive_for_update",
}


def start(app: str, port: int, workers: int, env: dict, apps: dict[str, str] = APPS) -> subprocess.Popen:
    """`shop serve`, or a reference app (by name in `apps`) under the same server and worker count."""
    if app == "shop":
        cmd = [
            sys.executable,
            "-m",
            "shop.cli",
            "serve",
            "--host",
            "127.0.0.1",
            "--port",
            str(port),
            "--workers",
            str(workers),
        ]
    else:
        cmd = [
            str(VENV_BIN / "granian"),
            "--interface",
            "asgi",
            "--factory",
            "--host",
            "127.0.0.1",
            "--port",
            str(port),
            "--workers",
            str(workers),
            "--loop",
            "uvloop",
            "--no-access-log",
            "--log-level",
            "warning",
            apps[app],
        ]
    return subprocess.Popen(
        cmd, env=env, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True
    )


def stop(proc: subprocess.Popen) -> None:
    try:
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(timeout=20)
    except (ProcessLookupError, subprocess.TimeoutExpired):
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()


def wait_ready(port: int, probe: str = "/api/v1/flash-sales/0/items/0/orders") -> None:
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        try:
            httpx.post(f"http://127.0.0.1:{port}{probe}", timeout=1)
            return
        except httpx.TransportError:
            time.sleep(0.3)
    raise RuntimeError(f"server on {port} did not start")


def wrk(port: int, path: str, shoppers: Path, args, script: Path = HERE / "wrk" / "buy.lua") -> dict:
    env = {**os.environ, "BENCH_PATH": path, "BENCH_SHOPPERS": str(shoppers)}
    base = [
        "wrk",
        f"-t{args.threads}",
        f"-c{args.connections}",
        "-s",
        str(script),
        "--latency",
    ]
    url = f"http://127.0.0.1:{port}{path}"
    subprocess.run([*base, "-d", f"{args.warmup}s", url], env=env, capture_output=True, check=True)
    before = cpu_by_process()
    out = subprocess.run(
        [*base, "-d", f"{args.duration}s", url], env=env, capture_output=True, text=True, check=True
    ).stdout
    cpu = cpu_spent(before, cpu_by_process())
    rps = float(re.search(r"Requests/sec:\s+([\d.]+)", out).group(1))
    p99_text = re.search(r"99%\s+([\d.]+)(us|ms|s)", out)
    p99 = float(p99_text.group(1)) * {"us": 0.001, "ms": 1, "s": 1000}[p99_text.group(2)]
    status = re.search(r"STATUS non2xx=(\d+) errors=(\d+)", out)
    total = int(re.search(r"(\d+) requests in", out).group(1))
    return {
        "rps": rps,
        "p99_ms": p99,
        "requests": total,
        "non2xx": int(status.group(1)),
        "errors": int(status.group(2)),
        # CPU per request (µs) by process group: steadier than req/s on a shared machine.
        "cpu_us": {group: seconds / total * 1e6 for group, seconds in cpu.items()},
    }


def buy_once(port: int, path: str, row) -> httpx.Response:
    """One buy call as the shopper `row` (user id, JWT, address id, purchase token), as wrk sends it."""
    uid, jwt, address, token = row
    return httpx.post(
        f"http://127.0.0.1:{port}{path}",
        json={"qty": 1, "address_id": address, "token": token},
        headers={"Authorization": f"Bearer {jwt}", "X-Bench-User": str(uid)},
        timeout=10,
    )


def check_answers(port: int, path: str, rows, app: str, phase: str) -> None:
    """What the load was answered with, sampled after the run: every answer a winner's 201 in
    stock, a 409 `flash_sale.sold_out` when sold out. A broken setup (say, every request a 401)
    would otherwise be measured as a fast sold-out phase."""
    want = (201, None) if phase == "stock" else (409, "flash_sale.sold_out")
    for row in rows[1:4]:
        r = buy_once(port, path, row)
        code = r.json().get("error", {}).get("code") if r.status_code >= 400 else None
        if (r.status_code, code) != want:
            raise SystemExit(f"{app} {phase}: expected {want}, got {r.status_code} {r.text[:200]}")


def server_env(settings) -> dict[str, str]:
    """The environment every benchmarked server runs with: the same stores, no request log."""
    return {
        **os.environ,
        "SHOP_DATABASE_URL": settings.database_url,
        "SHOP_REDIS_URL": settings.redis_url,
        "SHOP_REDIS_PREFIX": settings.redis_prefix,
        "SHOP_LOG_REQUESTS": "false",
        "SHOP_LOG_LEVEL": "WARNING",
    }


def cpu_by_process() -> dict[int, tuple[float, str]]:
    """pid -> (CPU seconds used so far, process group) for the processes a run involves."""
    tick = os.sysconf("SC_CLK_TCK")
    out = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            stat = Path(f"/proc/{entry}/stat").read_text()
            cmdline = (
                Path(f"/proc/{entry}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
            )
        except OSError:
            continue
        fields = stat.rsplit(")", 1)[1].split()
        group = (
            "postgres" if "postgres" in cmdline
            else "redis" if "redis-server" in cmdline or "valkey" in cmdline
            else "wrk" if cmdline.startswith("wrk")
            else "app" if "granian" in cmdline or "shop.cli serve" in cmdline
            else None
        )  # fmt: skip
        if group:
            out[int(entry)] = ((int(fields[11]) + int(fields[12])) / tick, group)
    return out


def cpu_spent(before: dict[int, tuple[float, str]], after: dict[int, tuple[float, str]]) -> dict[str, float]:
    spent: dict[str, float] = {}
    for pid, (seconds, group) in after.items():
        spent[group] = spent.get(group, 0.0) + seconds - before.get(pid, (0.0, group))[0]
    return spent


async def prepare(settings, users: int) -> dict:
    """Events for each app and phase, shoppers with tokens, the naive app's stock rows."""
    big = 1_000_000
    plan = {}
    for app in ("shop", "bare_evalsha"):
        for phase in ("stock", "sold_out"):
            quota = big if phase == "stock" else 1
            sale = await publish_sale(settings, quota=quota, per_user_limit=999, user_rate_limit=100_000)
            plan[(app, phase)] = sale
    redis = create_redis(settings.redis_url)
    try:
        for folder in LUA_DIRS:
            for path in folder.glob("flash_buy.lua"):
                await redis.script_load(path.read_text())
    finally:
        await redis.aclose()
    conn = await connect(settings)
    try:
        await conn.execute(NAIVE_SCHEMA)
        await conn.execute("truncate naive_orders")
        await conn.execute(
            "insert into naive_stock values (1, $1), (2, 0) on conflict (id) do update set stock = excluded.stock",
            big,
        )
    finally:
        await conn.close()
    shoppers = {}
    for key, sale in plan.items():
        shoppers[key] = await make_shoppers(settings, users, sale.id)
    return {"plan": plan, "shoppers": shoppers}


def write_shoppers(rows, path: Path) -> None:
    path.write_text("".join(f"{uid}|{jwt}|{address}|{token}\n" for uid, jwt, address, token in rows))


def bench_arguments(doc: str, port: int) -> argparse.ArgumentParser:
    """The options every benchmark here shares: server, wrk settings and shoppers."""
    parser = argparse.ArgumentParser(description=doc.splitlines()[0])
    parser.add_argument("--port", type=int, default=port)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--connections", type=int, default=64)
    parser.add_argument("--duration", type=int, default=10)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--users", type=int, default=2000)
    return parser


def _target(app: str, phase: str, plan: dict, shoppers: dict) -> tuple[str, list]:
    """The buy path an app serves in a phase, and the shoppers to send."""
    if app in ("shop", "bare_evalsha"):
        sale = plan[(app, phase)]
        return f"/api/v1/flash-sales/{sale.id}/items/{sale.item_id}/orders", shoppers[(app, phase)]
    return f"/api/v1/flash-sales/1/items/{1 if phase == 'stock' else 2}/orders", shoppers[("shop", phase)]


def _median(values: list[float]) -> float:
    ordered = sorted(values)
    middle = len(ordered) // 2
    return ordered[middle] if len(ordered) % 2 else (ordered[middle - 1] + ordered[middle]) / 2


def summary(runs: list[tuple[str, str]], results: dict[tuple[str, str], list[dict]]) -> str:
    """The Markdown table: per app and phase the median req/s over the rounds (its run's p99 and
    CPU), and the shop's ratio to it, as medians of the per-round ratios (each round's apps ran
    back to back, so a round's ratio shares the machine's state of the moment)."""
    lines = [
        "| phase | app | req/s (median) | p99 (ms) | CPU µs/request (app / postgres / redis) | non-2xx"
        " | shop ÷ app (median; per round) |",
        "|---|---|---|---|---|---|---|",
    ]
    for app, phase in runs:
        rounds = results[(app, phase)]
        middle = sorted(rounds, key=lambda r: r["rps"])[len(rounds) // 2]
        cpu = " / ".join(f"{middle['cpu_us'].get(g, 0.0):.0f}" for g in ("app", "postgres", "redis"))
        ratio = "-"
        shop = results.get(("shop", phase))
        if shop and app != "shop":
            per_round = [s["rps"] / r["rps"] for s, r in zip(shop, rounds, strict=False)]
            ratio = f"{_median(per_round):.2f}× ({', '.join(f'{x:.2f}' for x in per_round)})"
        non2xx = sum(r["non2xx"] for r in rounds)
        lines.append(
            f"| {phase} | {app} | {_median([r['rps'] for r in rounds]):.0f} | {middle['p99_ms']:.1f} | {cpu} "
            f"| {non2xx} | {ratio} |"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = bench_arguments(__doc__, 8400)
    parser.add_argument("--rounds", type=int, default=1, help="run the apps this many times, alternating")
    parser.add_argument(
        "--only",
        default="",
        help="comma-separated app:phase pairs to run (default: all), e.g. shop:stock,bare_evalsha:stock",
    )
    args = parser.parse_args(argv)

    settings = with_default_urls(load_settings())
    prepared = asyncio.run(prepare(settings, args.users))
    plan, shoppers = prepared["plan"], prepared["shoppers"]
    env = server_env(settings)
    tmp = Path(tempfile.mkdtemp(prefix="bench_flash_"))
    results: dict[tuple[str, str], list[dict]] = {}
    runs = [
        ("shop", "stock"),
        ("shop", "sold_out"),
        ("bare_evalsha", "stock"),
        ("bare_evalsha", "sold_out"),
        ("naive_for_update", "stock"),
        ("naive_for_update", "sold_out"),
        ("bare_jwt", "sold_out"),
    ]
    if args.only:
        wanted = {tuple(pair.split(":")) for pair in args.only.split(",")}
        runs = [r for r in runs if r in wanted]
    sold_first: set[str] = set()
    for _ in range(args.rounds):
        for app in dict.fromkeys(a for a, _ in runs):
            proc = start(app, args.port, args.workers, env)
            try:
                wait_ready(args.port)
                for _, phase in [r for r in runs if r[0] == app]:
                    path, rows = _target(app, phase, plan, shoppers)
                    if phase == "sold_out" and app in ("shop", "bare_evalsha") and app not in sold_first:
                        sold_first.add(app)  # sell the one unit first
                        buy_once(args.port, path, rows[0])
                    file = tmp / f"{app}_{phase}.txt"
                    write_shoppers(rows, file)
                    r = wrk(args.port, path, file, args)
                    check_answers(args.port, path, rows, app, phase)
                    results.setdefault((app, phase), []).append(r)
                    cpu = "  ".join(f"{g} {us:.0f}" for g, us in sorted(r["cpu_us"].items()))
                    print(
                        f"{app:17s} {phase:8s} {r['rps']:9.0f} req/s  p99 {r['p99_ms']:6.1f} ms  "
                        f"requests {r['requests']}  non-2xx {r['non2xx']}  socket errors {r['errors']}  "
                        f"CPU µs/request: {cpu}",
                        flush=True,
                    )
            finally:
                stop(proc)
    print()
    print(summary(runs, results))
    return 0


if __name__ == "__main__":
    sys.exit(main())

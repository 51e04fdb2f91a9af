"""Fairness of game_draw.lua: 200,000 draws with known weights and seeded random values (deterministic),
checked with a chi-square goodness-of-fit test; the out-of-stock policies shift weight as configured.

No scipy: the chi-square survival function for integer degrees of freedom has a short exact form
(Q(x; 2) = e^(-x/2), Q(x; 1) = erfc(sqrt(x/2)), Q(x; k+2) = Q(x; k) + (x/2)^(k/2) e^(-x/2) / Γ(k/2+1)),
so the test computes the p-value itself and requires p > 0.001.
"""

from __future__ import annotations

import math
import random
from datetime import datetime

import hiredis

from games import engine
from shop.keys import Keys
from tests.games.test_admin import THANKS, make_game

WEIGHTS = [3, 7, 10, 15, 25]  # then "thanks" with weight 40
PLAYERS = 250
BATCH = 1000


def chi2_sf(x: float, df: int) -> float:
    """P(X >= x) for X ~ chi-square(df), df a positive integer."""
    if df % 2 == 0:
        q, k = math.exp(-x / 2), 2
    else:
        q, k = math.erfc(math.sqrt(x / 2)), 1
    while k < df:
        q += math.exp((k / 2) * math.log(x / 2) - x / 2 - math.lgamma(k / 2 + 1))
        k += 2
    return q


def chi_square(observed: list[int], weights: list[int]) -> tuple[float, float]:
    """(statistic, p-value) of observed counts against probabilities proportional to weights."""
    n, total = sum(observed), sum(weights)
    stat = sum((o - n * w / total) ** 2 / (n * w / total) for o, w in zip(observed, weights, strict=True))
    return stat, chi2_sf(stat, len(weights) - 1)


def test_chi2_sf_matches_the_table():
    # Critical values at p = 0.001 from any chi-square table.
    for df, critical in ((1, 10.828), (4, 18.467), (5, 20.515), (6, 22.458)):
        assert abs(chi2_sf(critical, df) - 0.001) < 2e-6, df


async def draw_many(app, game_id: int, n: int, seed: int) -> list[int]:
    """n draws straight through the script, pipelined BATCH per round trip; counts per position."""
    settings, redis, script = app.state.settings, app.state.redis, app.state.scripts.game_draw
    keys = Keys(settings.redis_prefix)
    rng = random.Random(seed)
    now = engine.clock()
    day = engine.business_date(settings, now)
    state, users, day_key, stream = (
        keys.game_state(game_id), keys.game_users(game_id), keys.game_day(game_id, day.isoformat()), keys.game_stream(game_id),
    )  # fmt: skip
    await script(
        keys=[state, users, day_key, keys.game_idem(game_id, 1, None), stream], args=["0", *["x"] * 9]
    )
    counts: dict[int, int] = {}
    # Packed with hiredis and written on one connection: redis-py's pure-Python packing would
    # take most of this test's time.
    conn = await redis.connection_pool.get_connection()
    try:
        for start in range(0, n, BATCH):
            commands = []
            for i in range(start, min(start + BATCH, n)):
                uid = i % PLAYERS + 1
                args = engine.draw_args(
                    game_id=game_id, user_id=uid, rid=f"R{i}", rand=rng.getrandbits(engine.RAND_BITS),
                    mode="free", game_type="wheel", now=now, day=day,
                )  # fmt: skip
                idem = keys.game_idem(game_id, uid, None)
                commands.append(
                    hiredis.pack_command(
                        ("EVALSHA", script.sha, 5, state, users, day_key, idem, stream, *args)
                    )
                )
            await conn.send_packed_command(b"".join(commands))
            for _ in commands:
                reply = await conn.read_response()
                assert reply[0] == "ok", reply
                counts[int(reply[2])] = counts.get(int(reply[2]), 0) + 1
            await redis.delete(stream)  # the stream is not under test here: keep Redis small
    finally:
        await redis.connection_pool.release(conn)
    return [counts.get(pos, 0) for pos in range(max(counts) + 1)]


def prizes(stock_of_first: int | None = None) -> list[dict]:
    out = [{"name": f"奖品 {i}", "kind": "points", "points": 1, "weight": w} for i, w in enumerate(WEIGHTS)]
    out[0]["stock"] = stock_of_first
    return [*out, {**THANKS, "weight": 40}]


async def test_two_hundred_thousand_draws_follow_the_configured_weights(client, app, admin_headers):
    far = datetime(2099, 1, 1).astimezone().isoformat()
    game = await make_game(client, admin_headers, prizes=prizes(), free_per_day=1000, ends_at=far)
    observed = await draw_many(app, game["id"], 200_000, seed=20261126)
    stat, p = chi_square(observed, [*WEIGHTS, 40])
    assert p > 0.001, (observed, stat, p)
    # The same test does reject a skewed wheel: shifting 1% of the draws from the top prize away fails it.
    skewed = [observed[0] - 600, *observed[1:-1], observed[-1] + 600]
    assert chi_square(skewed, [*WEIGHTS, 40])[1] < 0.001


async def test_out_of_stock_policy_shifts_the_weight_as_configured(client, app, admin_headers):
    # Prize 0 has no stock. "thanks": its weight goes to "thanks for playing" (published odds unchanged
    # for the others); "redistribute": it is spread over the prizes left, in proportion to their weights.
    thanks = await make_game(client, admin_headers, prizes=prizes(stock_of_first=0), free_per_day=1000)
    observed = await draw_many(app, thanks["id"], 40_000, seed=1)
    assert observed[0] == 0
    assert chi_square(observed[1:], [*WEIGHTS[1:], 40 + WEIGHTS[0]])[1] > 0.001

    spread = await make_game(
        client, admin_headers, prizes=prizes(stock_of_first=0), free_per_day=1000, out_of_stock="redistribute"
    )
    observed = await draw_many(app, spread["id"], 40_000, seed=2)
    assert observed[0] == 0
    assert chi_square(observed[1:], [*WEIGHTS[1:], 40])[1] > 0.001
    # …and it is not the "thanks" policy: that distribution is rejected here.
    assert chi_square(observed[1:], [*WEIGHTS[1:], 40 + WEIGHTS[0]])[1] < 0.001

"""The fast paths: answers from a worker's own knowledge, and how that knowledge stays true."""

from __future__ import annotations

import asyncio
import time
from datetime import timedelta

import pytest
import redis.asyncio as aioredis
from conftest import campaign_toml, open_round, redis_now


async def grab(e, member: str, venue: str = "V01", rid: str = "R1",
               key: str | None = None) -> tuple[int, dict]:
    headers = e.member(member)
    if key:
        headers["Idempotency-Key"] = key
    resp = await e.client.post(f"/v1/rounds/{rid}/grab", json={"venue_id": venue},
                               headers=headers)
    return resp.status, await resp.json()


async def script_and_probe_calls(r: aioredis.Redis) -> int:
    """EVALSHA/EVAL/EXISTS calls the server has run: the hot path's commands."""
    stats = await r.info("commandstats")
    return sum(int(stats.get(f"cmdstat_{c}", {}).get("calls", 0))
               for c in ("evalsha", "eval", "exists"))


async def test_known_sold_out_and_not_open_cost_no_redis_call(make_engine, redis_url) -> None:
    now = redis_now(redis_url)
    later = {"id": "R2", "opens": now + timedelta(hours=2), "closes": now + timedelta(hours=3),
             "stock": {"V01": 5}}
    e = await make_engine(campaign_toml(rounds=[open_round(redis_url, stock={"V01": 1}),
                                                later]))
    assert (await grab(e, "first"))[0] == 201
    assert (await grab(e, "second"))[1]["error"]["code"] == "sold_out"  # learned here
    # The state poller records the sell-out once (mark_sold_out.lua, not the hot path):
    # wait for it, so that only the requests below are counted.
    deadline = time.monotonic() + 5
    while not await e.redis.hexists("cpn:{test-c}:soldout", "R1:V01"):
        assert time.monotonic() < deadline, "the poller never recorded the sell-out"
        await asyncio.sleep(0.05)
    before = await script_and_probe_calls(e.redis)
    for i in range(40):
        assert (await grab(e, f"crowd{i}"))[1]["error"]["code"] == "sold_out"
        assert (await grab(e, f"early{i}", rid="R2"))[1]["error"]["code"] == "round_not_open"
    assert await script_and_probe_calls(e.redis) == before


async def test_sold_out_flag_clears_on_another_workers_void(make_engine, redis_url) -> None:
    text = campaign_toml(rounds=[open_round(redis_url, stock={"V01": 1})])
    a = await make_engine(text)
    b = await make_engine(text)  # a second worker on the same Redis
    s, body = await grab(a, "holder")
    assert s == 201
    code = body["coupon"]["code"]
    assert (await grab(a, "late"))[1]["error"]["code"] == "sold_out"
    assert (await grab(b, "late"))[1]["error"]["code"] == "sold_out"
    resp = await b.client.delete(f"/v1/me/coupons/{code}", headers=b.member("holder"))
    assert resp.status == 200
    # Worker A hears of the restock over pub/sub (or at worst at its next poll).
    deadline = time.monotonic() + 2.0
    while True:
        s, body = await grab(a, "late")
        if s == 201:
            break
        assert body["error"]["code"] == "sold_out"
        assert time.monotonic() < deadline, "worker A still answers sold_out after a restock"
        await asyncio.sleep(0.02)
    assert (await grab(b, "later"))[1]["error"]["code"] == "sold_out"


async def test_a_sold_out_venue_is_not_sold_out_in_the_next_round(make_engine,
                                                                  redis_url) -> None:
    now = redis_now(redis_url)
    r1 = {"id": "R1", "opens": now - timedelta(minutes=5), "closes": now + timedelta(seconds=1),
          "stock": {"V01": 1}}
    r2 = {"id": "R2", "opens": now + timedelta(seconds=1.2), "closes": now + timedelta(hours=1),
          "stock": {"V01": 2}}
    e = await make_engine(campaign_toml(quota=5, rounds=[r1, r2]))
    assert (await grab(e, "m1"))[0] == 201
    assert (await grab(e, "m2"))[1]["error"]["code"] == "sold_out"
    while redis_now(redis_url) < r2["opens"]:
        await asyncio.sleep(0.05)
    assert (await grab(e, "m2", rid="R2"))[0] == 201


async def test_keyed_retry_at_a_sold_out_venue_still_finds_its_coupon(
        make_engine, redis_url) -> None:
    e = await make_engine(campaign_toml(rounds=[open_round(redis_url, stock={"V01": 1})]))
    s, first = await grab(e, "m", key="lost-reply")
    assert s == 201
    assert (await grab(e, "x"))[1]["error"]["code"] == "sold_out"
    assert await grab(e, "m", key="lost-reply") == (201, first)
    # A key that never granted gets the cached answer.
    assert (await grab(e, "y", key="fresh"))[1]["error"]["code"] == "sold_out"


@pytest.mark.parametrize("loop", ["poll_forever", "listen_forever"])
async def test_background_loops_end_on_stop_even_without_a_cancellation(
        make_engine, redis_url, loop: str) -> None:
    """A client library can swallow a cancellation that races its own timeout; the
    shutdown must not depend on it: stop() alone ends the poller within one poll, and
    the notify listener (whose read would otherwise block until the next message)
    within one tick of its subscription."""
    from engine.http.handlers import ENGINE
    e = await make_engine(campaign_toml(rounds=[open_round(redis_url)]))
    engine = e.client.server.app[ENGINE]
    task = asyncio.create_task(getattr(engine, loop)())
    await asyncio.sleep(0.3)
    assert not task.done()
    engine.stop()
    await asyncio.wait_for(task, timeout=3.0)


async def test_a_keyed_retry_after_the_close_still_gets_its_coupon(make_engine, redis_url) -> None:
    """The worker answers round_closed without Redis, but not to a keyed retry whose
    first attempt was granted: that retry replays the coupon."""
    closes = redis_now(redis_url) + timedelta(seconds=1.5)
    e = await make_engine(campaign_toml(rounds=[open_round(redis_url, closes=closes)]))
    headers = {**e.member("late"), "Idempotency-Key": "tap-1"}
    first = await e.client.post("/v1/rounds/R1/grab", headers=headers, json={"venue_id": "V01"})
    assert first.status == 201
    code = (await first.json())["coupon"]["code"]
    while redis_now(redis_url) < closes + timedelta(seconds=1.2):
        await asyncio.sleep(0.1)
    again = await e.client.post("/v1/rounds/R1/grab", headers=headers, json={"venue_id": "V01"})
    assert again.status == 201 and (await again.json())["coupon"]["code"] == code
    other = await e.client.post("/v1/rounds/R1/grab", headers=e.member("late2"),
                                json={"venue_id": "V01"})
    assert (other.status, (await other.json())["error"]["code"]) == (410, "round_closed")

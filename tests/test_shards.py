"""Stock shards (issue 9 part 2) on the session's redis-server: placement, loading,
journaled transfers and the sweeper, and shards that run out unevenly.

A single Redis holds every shard here (each in its own hash tag); tests/test_cluster.py
runs the same engine with its shards spread over a 3-primary cluster.
"""

from __future__ import annotations

import asyncio
from datetime import timedelta

import conftest
import pytest
from conftest import campaign_toml, open_round, redis_now

from engine import campaign as cmp
from engine import shards
from engine.config import Settings
from engine.store import Store, keys, load_campaign, shard_count

S = 3


def members_of(shard: int, n: int, prefix: str = "m") -> list[str]:
    return conftest.members_of(shard, n, S, prefix)


async def grab(e, member: str, venue: str = "V01", key: str | None = None):
    headers = e.member(member)
    if key is not None:
        headers["Idempotency-Key"] = key
    resp = await e.client.post("/v1/rounds/R1/grab", headers=headers, json={"venue_id": venue})
    return resp.status, await resp.json()


async def per_shard(redis, cid: str, name: str) -> list[dict[str, int]]:
    out = []
    for s in range(S):
        raw = await redis.hgetall(getattr(keys.Keys(cid, s), name))
        out.append({f: int(v) for f, v in raw.items()})
    return out


async def assert_shard_invariants(redis, cid: str) -> None:
    """Per shard and line: remaining = initial - issued + returned_open - out + in, no
    transfer left in flight, and every coupon lives in its code's and member's shard."""
    stock, stats = await per_shard(redis, cid, "stock"), await per_shard(redis, cid, "stats")
    for s in range(S):
        k = keys.Keys(cid, s)
        assert await redis.hlen(k.xfer_out) == 0, f"shard {s}: transfers in flight"
        for line, left in stock[s].items():
            st = stats[s]
            assert left >= 0
            assert left == (st.get(f"initial:{line}", 0) - st.get(f"issued:{line}", 0)
                            + st.get(f"returned_open:{line}", 0)
                            - st.get(f"xfer_out:{line}", 0) + st.get(f"xfer_in:{line}", 0)), \
                (s, line, st)
        async for key in redis.scan_iter(f"{k.tag}:coupon:*"):
            code = key.rsplit(":", 1)[1]
            member = await redis.hget(key, "member")
            assert shards.code_shard(code, S) == s
            assert shards.member_shard(member, S) == s
    # Transfers balance: what left the donors arrived at the receivers.
    for line in stock[0]:
        assert sum(st.get(f"xfer_out:{line}", 0) for st in stats) == \
            sum(st.get(f"xfer_in:{line}", 0) for st in stats)


# --- pure placement ------------------------------------------------------------

def test_split_is_even_and_sums() -> None:
    assert shards.split(10, 3) == [4, 3, 3]
    assert shards.split(2, 3) == [1, 1, 0]
    assert shards.split(-4, 3) == [-2, -1, -1]
    assert shards.split(7, 1) == [7]
    for n in range(0, 50):
        for s in range(1, 7):
            parts = shards.split(n, s)
            assert sum(parts) == n and max(parts) - min(parts) <= 1


def test_placement_is_stable_and_spreads() -> None:
    ids = [f"member-{i}" for i in range(3000)]
    counts = [0] * S
    for m in ids:
        assert shards.member_shard(m, S) == shards.member_shard(m, S)
        counts[shards.member_shard(m, S)] += 1
    assert min(counts) > 900, counts
    assert shards.member_shard("anyone", 1) == 0 and shards.code_shard("X" * 17, 1) == 0


def test_donors_fullest_first_then_by_distance() -> None:
    assert shards.donors(0, 3) == [1, 2]
    assert shards.donors(2, 3) == [0, 1]
    assert shards.donors(0, 4, {1: 1, 2: 0, 3: 9}) == [3, 1, 2]


# --- loading -------------------------------------------------------------------

async def test_load_splits_stock_and_copies_rounds(aredis, redis_url) -> None:
    text = campaign_toml(rounds=[open_round(redis_url, stock={"V01": 10, "V02": 2})])
    c = cmp.parse_campaign(text)
    await load_campaign(aredis, c, S)
    assert await shard_count(aredis, c.id) == S
    stock = await per_shard(aredis, c.id, "stock")
    assert [x["R1:V01"] for x in stock] == [4, 3, 3]
    assert [x["R1:V02"] for x in stock] == [1, 1, 0]
    for s in range(S):
        k = keys.Keys(c.id, s)
        assert await aredis.hget(k.campaign, "quota") == "3"
        assert await aredis.hget(k.campaign, "fingerprint") == c.fingerprint()
        assert await aredis.hget(k.round("R1"), "q") == "1"
    # The same file again changes nothing; another shard count is refused untouched.
    assert (await load_campaign(aredis, c, S)).noop
    before = await per_shard(aredis, c.id, "stock")
    with pytest.raises(cmp.CampaignError, match="3 stock shard"):
        await load_campaign(aredis, c, 2)
    assert await per_shard(aredis, c.id, "stock") == before


async def test_update_of_an_unopened_round_moves_each_share_once(aredis, redis_url) -> None:
    now = redis_now(redis_url)
    future = {"id": "R1", "opens": now + timedelta(hours=1), "closes": now + timedelta(hours=2),
              "stock": {"V01": 10}}
    c1 = cmp.parse_campaign(campaign_toml(rounds=[future]))
    await load_campaign(aredis, c1, S)
    c2 = cmp.parse_campaign(campaign_toml(rounds=[{**future, "stock": {"V01": 14}}]))
    # A crash after the other shards took the update and before shard 0 did: the
    # next load must finish shard 0 without applying shards 1 and 2 twice.
    from engine.store.loading import _load_other_shards
    plan = cmp.plan_update(c1, c2, 0)
    await _load_other_shards(aredis, c1, c2, plan, S)
    await load_campaign(aredis, c2, S)
    stock = await per_shard(aredis, c2.id, "stock")
    stats = await per_shard(aredis, c2.id, "stats")
    assert [x["R1:V01"] for x in stock] == shards.split(14, S) == [5, 5, 4]
    assert [x["initial:R1:V01"] for x in stats] == [5, 5, 4]
    c3 = cmp.parse_campaign(campaign_toml(rounds=[{**future, "stock": {"V01": 15}}]))
    await load_campaign(aredis, c3, S)
    assert [x["R1:V01"] for x in await per_shard(aredis, c3.id, "stock")] == [5, 5, 5]


# --- transfers and the sweeper -------------------------------------------------

async def sharded_store(aredis, redis_url, stock: int = 9) -> Store:
    c = cmp.parse_campaign(campaign_toml(rounds=[open_round(redis_url, stock={"V01": stock})]))
    await load_campaign(aredis, c, S)
    return Store(aredis, c, Settings(), shards=S)


async def test_transfer_moves_half_and_is_credited_once(aredis, redis_url) -> None:
    store = await sharded_store(aredis, redis_url)
    try:
        t = await store.transfers.take_from(1, 0, "R1:V01")
        assert t is not None and t.units == 2  # half of 3, rounded up
        # Taken, not yet credited: in flight, journaled in the donor.
        assert [x["R1:V01"] for x in await store.stock_by_shard()] == [3, 1, 3]
        pending = await store.transfers.pending()
        assert [p.id for p, _ in pending] == [t.id]
        assert await store.transfers.credit(t) is True
        assert await store.transfers.credit(t) is False  # a second delivery changes nothing
        assert [x["R1:V01"] for x in await store.stock_by_shard()] == [5, 1, 3]
        assert await store.transfers.pending() == []
        await assert_shard_invariants(aredis, store.campaign.id)
    finally:
        await store.wire.close()


async def test_sweeper_finishes_a_transfer_whose_worker_died(aredis, redis_url) -> None:
    store = await sharded_store(aredis, redis_url)
    try:
        t = await store.transfers.take_from(2, 0, "R1:V01")  # and the worker dies here
        assert t is not None
        assert await store.transfers.sweep() == 0  # younger than the grace: left alone
        assert sum(x["R1:V01"] for x in await store.stock_by_shard()) == 9 - t.units
        assert await store.transfers.sweep(grace_ms=0) == 1
        assert await store.transfers.sweep(grace_ms=0) == 0
        assert sum(x["R1:V01"] for x in await store.stock_by_shard()) == 9
        # The worker comes back late and delivers its transfer: no double credit.
        assert await store.transfers.credit(t) is False
        assert [x["R1:V01"] for x in await store.stock_by_shard()] == [3 + t.units, 3, 3 - t.units]
        await assert_shard_invariants(aredis, store.campaign.id)
    finally:
        await store.wire.close()


async def test_sweeper_after_credit_but_before_the_journal_entry_was_dropped(
        aredis, redis_url) -> None:
    store = await sharded_store(aredis, redis_url)
    try:
        t = await store.transfers.take_from(1, 2, "R1:V01")
        assert t is not None
        k = keys.Keys(store.campaign.id, 2)
        # Step 2 ran, the worker died before dropping the donor's entry.
        await aredis.evalsha(store.transfers._xfer_in.sha, 3, k.stock, k.xfer_in, k.stats,
                             t.line, t.id, t.units, t.donor, store.keys.notify_channel)
        assert await store.transfers.sweep(grace_ms=0) == 0  # already credited
        assert await store.transfers.pending() == []
        assert sum(x["R1:V01"] for x in await store.stock_by_shard()) == 9
        await assert_shard_invariants(aredis, store.campaign.id)
    finally:
        await store.wire.close()


async def test_an_empty_donor_gives_nothing_and_writes_nothing(aredis, redis_url) -> None:
    store = await sharded_store(aredis, redis_url, stock=1)  # shares 1, 0, 0
    try:
        k = keys.Keys(store.campaign.id, 1)
        assert await store.transfers.take_from(1, 0, "R1:V01") is None
        assert await aredis.exists(k.xfer_out) == 0
        assert "xfer_out:R1:V01" not in await aredis.hgetall(k.stats)
        # From shard 0, the only one with stock:
        assert await store.transfers.refill("R1:V01", 2) == 1
        assert [x["R1:V01"] for x in await store.stock_by_shard()] == [0, 0, 1]
        assert await store.transfers.refill("R1:V01", 1) == 1
        # Shard 1 now holds the only unit: asking the others for more finds nothing.
        assert await store.transfers.refill("R1:V01", 1) == 0
        assert [x["R1:V01"] for x in await store.stock_by_shard()] == [0, 1, 0]
    finally:
        await store.wire.close()


# --- through the engine: uneven run-out, refill, redeem, void --------------------

async def test_shards_run_out_unevenly_and_nobody_is_told_sold_out_early(
        make_engine, redis_url) -> None:
    """Every member maps to shard 0, which holds a third of the stock: the engine must
    move the other shards' stock to it, and exactly the surplus members hear sold_out."""
    e = await make_engine(campaign_toml(rounds=[open_round(redis_url, stock={"V01": 30})]),
                          stock_shards=S)
    ids = members_of(0, 45)
    results = await asyncio.gather(*(grab(e, m, key=f"k-{m}") for m in ids))
    statuses = sorted(s for s, _ in results)
    assert statuses.count(201) == 30, statuses
    assert [b["error"]["code"] for s, b in results if s != 201] == ["sold_out"] * 15
    await assert_shard_invariants(e.redis, e.campaign.id)
    stock = await per_shard(e.redis, e.campaign.id, "stock")
    assert [x["R1:V01"] for x in stock] == [0, 0, 0]
    stats = await per_shard(e.redis, e.campaign.id, "stats")
    assert stats[0]["issued:R1:V01"] == 30 and stats[0]["xfer_in:R1:V01"] == 20
    # A keyed retry of a granted member still finds its coupon after the sell-out.
    s, body = await grab(e, ids[0], key=f"k-{ids[0]}")
    assert s == 201 and body["coupon"]["member_id"] == ids[0]


async def test_mixed_shards_uneven_demand_exact_counts(make_engine, redis_url) -> None:
    """Demand from shards 0 and 1 only, in two venues, quota 2: no member over quota,
    exactly the stock granted, shard 2's stock all moved out."""
    e = await make_engine(
        campaign_toml(rounds=[open_round(redis_url, stock={"V01": 20, "V02": 7}, quota=2)]),
        stock_shards=S)
    ids = members_of(0, 12) + members_of(1, 12)
    calls = [grab(e, m, venue=v) for m in ids for v in ("V01", "V02", "V01")]
    results = await asyncio.gather(*calls)
    granted = [b["coupon"] for s, b in results if s == 201]
    by_venue = {v: sum(1 for c in granted if c["venue_id"] == v) for v in ("V01", "V02")}
    assert by_venue == {"V01": 20, "V02": 7}
    per_member: dict[str, int] = {}
    for c in granted:
        per_member[c["member_id"]] = per_member.get(c["member_id"], 0) + 1
    assert max(per_member.values()) <= 2
    refusals = {b["error"]["code"] for s, b in results if s != 201}
    assert refusals <= {"sold_out", "round_quota_exceeded"}
    await assert_shard_invariants(e.redis, e.campaign.id)
    assert [x["R1:V01"] for x in await per_shard(e.redis, e.campaign.id, "stock")] == [0, 0, 0]


async def test_redeem_void_and_lists_find_sharded_coupons(make_engine, redis_url) -> None:
    e = await make_engine(campaign_toml(rounds=[open_round(redis_url, stock={"V01": 6})]),
                          stock_shards=S)
    got = {}
    for s in range(S):
        m = members_of(s, 1, prefix=f"x{s}-")[0]
        status, body = await grab(e, m)
        assert status == 201
        got[m] = body["coupon"]["code"]
    venue = await e.venue("V01")
    for m, code in got.items():
        resp = await e.client.get(f"/v1/me/coupons/{code}/qr.svg", headers=e.member(m))
        assert resp.status == 200
        resp = await e.client.get(f"/v1/venue/coupons/{code}", headers=venue)
        assert (await resp.json())["coupon"]["member_id"] == m
        resp = await e.client.get("/v1/me/coupons", headers=e.member(m))
        assert [c["code"] for c in (await resp.json())["coupons"]] == [code]
    first, second, third = list(got.items())
    resp = await e.client.post("/v1/venue/redemptions", headers=venue, json={"code": first[1]})
    assert resp.status == 200
    resp = await e.client.post("/v1/venue/redemptions", headers=venue, json={"code": first[1]})
    assert (resp.status, (await resp.json())["error"]["code"]) == (409, "already_redeemed")
    resp = await e.client.post("/v1/venue/redemptions", headers=venue, json={"code": third[1]})
    assert resp.status == 200
    resp = await e.client.get("/v1/venue/redemptions", headers=venue)
    assert sorted(c["code"] for c in (await resp.json())["redemptions"]) == \
        sorted([first[1], third[1]])
    # A void puts the stock back into the member's own shard.
    resp = await e.client.delete(f"/v1/me/coupons/{second[1]}", headers=e.member(second[0]))
    assert resp.status == 200
    shard = shards.member_shard(second[0], S)
    stats = await per_shard(e.redis, e.campaign.id, "stats")
    assert stats[shard]["returned_open:R1:V01"] == 1
    await assert_shard_invariants(e.redis, e.campaign.id)


async def test_a_member_who_keeps_losing_refilled_stock_is_asked_to_retry_not_told_sold_out(
        make_engine, redis_url, monkeypatch) -> None:
    """After the bounded number of refill-and-grab tries, the answer is 503 with
    Retry-After (stock may remain), never a sold_out that could be false."""
    from engine import service
    e = await make_engine(campaign_toml(rounds=[open_round(redis_url, stock={"V01": 3})]),
                          stock_shards=S)
    ids = members_of(0, 2)
    assert (await grab(e, ids[0]))[0] == 201  # shard 0's one unit
    monkeypatch.setattr(service, "_REFILL_ATTEMPTS", 0)
    resp = await e.client.post("/v1/rounds/R1/grab", headers=e.member(ids[1]),
                               json={"venue_id": "V01"})
    assert resp.status == 503 and resp.headers["Retry-After"] == "1"
    assert (await resp.json())["error"]["code"] == "unavailable"
    monkeypatch.setattr(service, "_REFILL_ATTEMPTS", 32)
    assert (await grab(e, ids[1]))[0] == 201

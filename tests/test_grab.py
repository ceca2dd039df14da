"""Member and public routes against a real redis-server: every error code,
exact counts under concurrency, idempotency."""

from __future__ import annotations

import asyncio
from datetime import timedelta

import jwt
from conftest import SECRET, campaign_toml, open_round, redis_now


async def grab(e, member: str, venue: str = "V01", round_id: str = "R1",
               key: str | None = None, body: object = None):
    headers = e.member(member)
    if key is not None:
        headers["Idempotency-Key"] = key
    resp = await e.client.post(f"/v1/rounds/{round_id}/grab", headers=headers,
                               json=body if body is not None else {"venue_id": venue})
    return resp.status, await resp.json()


async def test_grant_shape_and_my_coupons(make_engine, redis_url) -> None:
    e = await make_engine(campaign_toml(rounds=[open_round(redis_url, quota=2)]))
    status, body = await grab(e, "m1")
    assert status == 201
    c = body["coupon"]
    assert set(c) == {"code", "campaign_id", "round_id", "venue_id", "member_id", "status",
                      "issued_at", "valid_from", "valid_until", "face_value_fen",
                      "member_price_fen", "redeemed_at"}
    assert c["status"] == "issued" and c["redeemed_at"] is None and c["member_id"] == "m1"
    assert c["face_value_fen"] == 10000 and c["member_price_fen"] == 100
    assert len(c["code"]) == 21 and c["issued_at"].endswith("+08:00")
    status, body2 = await grab(e, "m1", venue="V02")
    assert status == 201
    resp = await e.client.get("/v1/me/coupons", headers=e.member("m1"))
    codes = [x["code"] for x in (await resp.json())["coupons"]]
    assert codes == [body2["coupon"]["code"], c["code"]]  # newest first


async def test_my_coupons_read_a_pre_issue_19_code_list(make_engine, redis_url) -> None:
    # Before issue 19 grab.lua kept a member's codes in the list cpn:{C}:mcoupons:<M>;
    # now in the member hash's c. A member granted before an upgrade keeps the older
    # codes, listed after the newer ones.
    e = await make_engine(campaign_toml(rounds=[open_round(redis_url, quota=2)]))
    first = (await grab(e, "m1"))[1]["coupon"]["code"]
    old = first.replace("-", "")
    assert await e.redis.hget("cpn:{test-c}:member:m1", "c") == old
    await e.redis.hdel("cpn:{test-c}:member:m1", "c")
    await e.redis.rpush("cpn:{test-c}:mcoupons:m1", old)
    second = (await grab(e, "m1", venue="V02"))[1]["coupon"]["code"]
    resp = await e.client.get("/v1/me/coupons", headers=e.member("m1"))
    assert [x["code"] for x in (await resp.json())["coupons"]] == [second, first]


async def test_every_member_error_code_leaves_the_store_unchanged(make_engine, redis_url) -> None:
    now = redis_now(redis_url)
    rounds = [
        {"id": "R0", "opens": now - timedelta(hours=3), "closes": now - timedelta(hours=2),
         "stock": {"V01": 5}},
        open_round(redis_url, stock={"V01": 2, "V02": 0}),
        {"id": "R2", "opens": now + timedelta(hours=2), "closes": now + timedelta(hours=3),
         "stock": {"V01": 5}},
    ]
    e = await make_engine(campaign_toml(rounds=rounds, venues=("V01", "V02", "V03"), quota=3))
    assert (await grab(e, "holder", key="k1"))[0] == 201
    snap = await e.snapshot()

    async def expect(status: int, code: str, **kw) -> dict:
        s, body = await grab(e, **kw)
        assert (s, body["error"]["code"]) == (status, code), body
        assert await e.snapshot() == snap, code
        return body

    await expect(400, "invalid_request", member="m", body={"venue_id": "V01", "extra": 1})
    await expect(400, "invalid_request", member="m", body={"venue": "V01"})
    await expect(400, "invalid_request", member="m", body={"venue_id": "bad id!"})
    await expect(400, "invalid_request", member="m", body=[1, 2])
    await expect(404, "round_not_found", member="m", round_id="nope")
    await expect(404, "venue_not_found", member="m", venue="V99")
    await expect(404, "venue_not_found", member="m", venue="V03")  # no stock line in R1
    body = await expect(409, "round_not_open", member="m", round_id="R2")
    assert body["error"]["opens_at"].endswith("+08:00")
    await expect(410, "round_closed", member="m", round_id="R0")
    await expect(410, "sold_out", member="m", venue="V02")
    await expect(409, "round_quota_exceeded", member="holder", venue="V01")
    await expect(422, "idempotency_key_reused", member="holder", venue="V02", key="k1")
    resp = await e.client.post("/v1/rounds/R1/grab", json={"venue_id": "V01"})
    assert resp.status == 401 and (await resp.json())["error"]["code"] == "unauthorized"
    for token in ["x.y.z", jwt.encode({"sub": "m"}, SECRET, algorithm="HS256"),
                  jwt.encode({"sub": "m", "exp": 1}, SECRET, algorithm="HS256"),
                  jwt.encode({"sub": "m", "exp": 2**40}, "other", algorithm="HS256"),
                  jwt.encode({"sub": "m", "exp": 2**40}, None, algorithm="none")]:
        resp = await e.client.post("/v1/rounds/R1/grab", json={"venue_id": "V01"},
                                   headers={"Authorization": f"Bearer {token}"})
        assert resp.status == 401, token
    assert await e.snapshot() == snap
    resp = await e.client.post("/v1/rounds/R1/grab", data=b"{" * 10000, headers=e.member("m"))
    assert resp.status == 400
    assert await e.snapshot() == snap


async def test_campaign_quota_holds_across_rounds(make_engine, redis_url) -> None:
    now = redis_now(redis_url)
    edge = now + timedelta(seconds=1.5)
    r1 = {"id": "R1", "opens": now - timedelta(minutes=5), "closes": edge, "quota": 2,
          "stock": {"V01": 5, "V02": 5}}
    r2 = {"id": "R2", "opens": edge, "closes": now + timedelta(hours=1), "quota": 2,
          "stock": {"V01": 5}}
    e = await make_engine(campaign_toml(rounds=[r1, r2], quota=2))
    assert (await grab(e, "m"))[0] == 201
    assert (await grab(e, "m", venue="V02"))[0] == 201
    while redis_now(redis_url) < edge + timedelta(milliseconds=100):
        await asyncio.sleep(0.05)
    s, body = await grab(e, "m", round_id="R2")
    assert (s, body["error"]["code"]) == (409, "campaign_quota_exceeded")
    assert (await grab(e, "other", round_id="R2"))[0] == 201


async def test_exact_stock_under_concurrency(make_engine, redis_url) -> None:
    e = await make_engine(campaign_toml(rounds=[open_round(redis_url, stock={"V01": 137})]))
    results = await asyncio.gather(*[grab(e, f"m{i % 1000}") for i in range(2000)])
    granted = [b["coupon"]["code"] for s, b in results if s == 201]
    assert len(granted) == 137 and len(set(granted)) == 137
    refused = {b["error"]["code"] for s, b in results if s != 201}
    assert refused <= {"sold_out", "round_quota_exceeded"}
    assert await e.redis.hget("cpn:{test-c}:stock", "R1:V01") == "0"
    assert await e.redis.hget("cpn:{test-c}:stats", "issued:R1:V01") == "137"
    assert await e.redis.xlen("cpn:{test-c}:events") == 137


async def test_one_member_hundred_concurrent_grabs_get_one(make_engine, redis_url) -> None:
    e = await make_engine(campaign_toml(rounds=[open_round(redis_url, stock={"V01": 50})]))
    results = await asyncio.gather(*[grab(e, "solo") for _ in range(100)])
    assert sum(1 for s, _ in results if s == 201) == 1
    assert {b["error"]["code"] for s, b in results if s != 201} == {"round_quota_exceeded"}


async def test_same_idempotency_key_fifty_times(make_engine, redis_url) -> None:
    e = await make_engine(campaign_toml(rounds=[open_round(redis_url)]))
    results = await asyncio.gather(*[grab(e, "m", key="same-key") for _ in range(50)])
    assert {s for s, _ in results} == {201}
    assert len({repr(b) for _, b in results}) == 1
    assert len(await e.redis.hget("cpn:{test-c}:member:m", "c") or "") == 17  # one code


async def test_idempotency_key_is_per_member(make_engine, redis_url) -> None:
    e = await make_engine(campaign_toml(rounds=[open_round(redis_url)]))
    s1, b1 = await grab(e, "alice", key="shared")
    s2, b2 = await grab(e, "bob", key="shared")
    assert s1 == s2 == 201
    assert b1["coupon"]["member_id"] == "alice" and b2["coupon"]["member_id"] == "bob"
    assert b1["coupon"]["code"] != b2["coupon"]["code"]


async def test_replay_after_sell_out_still_returns_the_grant(make_engine, redis_url) -> None:
    e = await make_engine(campaign_toml(rounds=[open_round(redis_url, stock={"V01": 1})]))
    s, first = await grab(e, "m", key="k")
    assert s == 201
    assert (await grab(e, "x"))[1]["error"]["code"] == "sold_out"  # worker now knows
    s, again = await grab(e, "m", key="k")
    assert (s, again) == (201, first)


async def test_round_edges_follow_redis_time(make_engine, redis_url) -> None:
    now = redis_now(redis_url)
    r = {"id": "R1", "opens": now + timedelta(seconds=1.5), "closes": now + timedelta(seconds=3),
         "stock": {"V01": 10}}
    e = await make_engine(campaign_toml(rounds=[r]))
    assert (await grab(e, "a"))[1]["error"]["code"] == "round_not_open"
    while redis_now(redis_url) < r["opens"]:
        await asyncio.sleep(0.05)
    assert (await grab(e, "b"))[0] == 201
    while redis_now(redis_url) < r["closes"]:
        await asyncio.sleep(0.05)
    assert (await grab(e, "c"))[1]["error"]["code"] == "round_closed"


async def test_rate_limited_with_retry_after(make_engine, redis_url) -> None:
    e = await make_engine(campaign_toml(rounds=[open_round(redis_url)]), member_rate=1.0,
                          member_burst=2)
    statuses = [(await grab(e, "busy", venue="V99"))[0] for _ in range(4)]
    assert statuses[:2] == [404, 404] and 429 in statuses[2:]
    resp = await e.client.post("/v1/rounds/R1/grab", json={"venue_id": "V01"},
                               headers=e.member("busy"))
    assert resp.status == 429 and int(resp.headers["Retry-After"]) >= 1
    assert (await resp.json())["error"]["code"] == "rate_limited"


async def test_public_rounds_and_probes(make_engine, redis_url) -> None:
    e = await make_engine(campaign_toml(rounds=[open_round(redis_url, stock={"V01": 3})]))
    await grab(e, "m")
    await asyncio.sleep(0.6)  # remaining may lag by up to one poll
    body = await (await e.client.get("/v1/rounds/R1")).json()
    r = body["round"]
    assert r["state"] == "open" and r["member_round_quota"] == 1
    v01 = next(v for v in r["venues"] if v["venue_id"] == "V01")
    assert (v01["stock"], v01["remaining"], v01["kind"]) == (3, 2, "ski")
    assert len((await (await e.client.get("/v1/rounds")).json())["rounds"]) == 1
    resp = await e.client.get("/v1/rounds/none")
    assert resp.status == 404 and (await resp.json())["error"]["code"] == "round_not_found"
    assert (await e.client.get("/healthz")).status == 200
    assert (await e.client.get("/readyz")).status == 200
    stats = await (await e.client.get("/v1/admin/rounds/R1/stats", headers=e.admin)).json()
    assert stats["totals"]["issued"] == 1 and stats["totals"]["remaining"] == 2
    assert (await e.client.get("/v1/admin/rounds/R1/stats", headers=e.member("m"))).status == 401
    doc = await (await e.client.get("/openapi.json")).json()
    assert doc["openapi"].startswith("3.") and "/v1/rounds/{round_id}/grab" in doc["paths"]

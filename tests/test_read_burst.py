"""Reads never answer 503 while Redis is healthy (issue 14, item 2).

``serve --workers 2`` against a redis-server this test owns (unix socket, its own
directory). Bursts of 800 concurrent requests of each read the clients make (a
member's coupons, a venue's lookup, a venue key check, ``/readyz``, the operator's
stats) must all answer 200: a worker queues for a Redis connection within the
request's time budget instead of refusing when its pool is busy. Then the Redis is
restarted (its data kept), and once it is back no request fails: every pooled
connection the restart killed is replaced, not handed to a request.
"""

from __future__ import annotations

import asyncio
import collections
import time
from pathlib import Path

import aiohttp
import redis.asyncio as aioredis
from conftest import campaign_toml, open_round
from servekit import serve

from engine import campaign as cmp
from engine.config import Settings
from engine.store import Store
from engine.store.embedded import EmbeddedRedis

BURST = 800
MEMBERS = 40
VENUES = ("V01", "V02", "V03", "V04")


async def mint_keys(url: str, campaign: cmp.Campaign, n: int) -> list[str]:
    """``n`` fresh venue keys (fresh: a worker caches a checked key for 5 s)."""
    client = aioredis.Redis.from_url(url, decode_responses=True)
    try:
        store = Store(client, campaign, Settings())
        return [await store.add_venue_key(VENUES[i % len(VENUES)]) for i in range(n)]
    finally:
        await client.aclose()


async def burst(base: str, requests: list[tuple[str, dict[str, str]]]) -> collections.Counter:
    """All of ``requests`` (path, headers) at once, each on its own connection."""
    conn = aiohttp.TCPConnector(limit=0, force_close=True)
    timeout = aiohttp.ClientTimeout(total=60)
    async with aiohttp.ClientSession(connector=conn, timeout=timeout) as http:
        async def one(path: str, headers: dict[str, str]) -> int | str:
            try:
                async with http.get(base + path, headers=headers) as resp:
                    await resp.read()
                    return resp.status
            except aiohttp.ClientError as exc:
                return type(exc).__name__

        return collections.Counter(await asyncio.gather(*(one(p, h) for p, h in requests)))


def test_read_bursts_and_a_redis_restart_never_answer_503(tmp_path: Path) -> None:
    redis_dir = tmp_path / "redis"
    rs = EmbeddedRedis(redis_dir)
    rs.start()
    try:
        text = campaign_toml(venues=VENUES, quota=3, rounds=[open_round(
            rs.url, quota=3, stock={v: 1000 for v in VENUES})])
        campaign = cmp.parse_campaign(text)
        with serve(tmp_path, rs.url, text, workers=2,
                   COUPON_VENUE_BAD_CODE_LIMIT="100000") as s:
            shares = asyncio.run(_drive(s, rs, campaign))
        # What the issue asks to report: the worst 503 share of any burst.
        print("503 share per burst:", shares)
    finally:
        rs.stop()


async def _drive(s, rs: EmbeddedRedis, campaign: cmp.Campaign) -> dict[str, float]:
    members = [f"m{i}" for i in range(MEMBERS)]
    coupons: list[tuple[str, str]] = []  # (code, venue)
    async with aiohttp.ClientSession() as http:
        for i, m in enumerate(members):
            venue = VENUES[i % len(VENUES)]
            async with http.post(s.base + "/v1/rounds/R1/grab", json={"venue_id": venue},
                                 headers=s.member(m)) as resp:
                assert resp.status == 201, await resp.text()
                coupons.append(((await resp.json())["coupon"]["code"], venue))
    lookup_keys = {v: k for k, v in zip(await mint_keys(rs.url, campaign, len(VENUES)),
                                        VENUES)}
    member_headers = [s.member(m) for m in members]
    shares: dict[str, float] = {}
    answers: dict[str, dict[int | str, int]] = {}

    async def all_reads(label: str) -> None:
        keys = await mint_keys(rs.url, campaign, BURST)
        kinds = {
            "me/coupons": [("/v1/me/coupons", member_headers[i % MEMBERS])
                           for i in range(BURST)],
            "venue lookup": [(f"/v1/venue/coupons/{coupons[i % MEMBERS][0]}",
                              {"Authorization": "Bearer "
                               + lookup_keys[coupons[i % MEMBERS][1]]})
                             for i in range(BURST)],
            "venue key check": [("/v1/venue/me", {"Authorization": f"Bearer {k}"})
                                for k in keys],
            "readyz": [("/readyz", {})] * BURST,
            "admin stats": [("/v1/admin/rounds/R1/stats", s.admin)] * BURST,
        }
        for kind, reqs in kinds.items():
            got = await burst(s.base, reqs)
            shares[f"{label} {kind}"] = got.get(503, 0) / BURST
            answers[f"{label} {kind}"] = dict(got)

    await all_reads("healthy")
    # Restart the Redis: SIGTERM (fsync, exit), then the same directory again.
    rs.stop()
    rs.start()
    # Back: the first requests after it find every pooled connection dead. A minute
    # later would be the same; what matters is that no request sees one.
    t0 = time.monotonic()
    await all_reads("after restart")
    assert time.monotonic() - t0 < 120
    print("answers per burst:", answers)
    assert answers == {k: {200: BURST} for k in answers}, answers
    # Redis kept everything: the members' coupons are still there.
    async with aiohttp.ClientSession() as http:
        async with http.get(s.base + "/v1/me/coupons", headers=member_headers[0]) as resp:
            assert len((await resp.json())["coupons"]) == 1
    return shares

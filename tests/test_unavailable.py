"""Redis gone: 503 `unavailable` quickly with Retry-After; back: served again,
without restarting the engine, and the AOF kept every acknowledged grant."""

from __future__ import annotations

import time
from pathlib import Path

import redis.asyncio as aioredis
from aiohttp.test_utils import TestClient, TestServer

from engine import campaign as cmp
from engine.app import create_app
from engine.auth import mint_member_token
from engine.config import Settings
from engine.embedded import EmbeddedRedis
from engine.store import load_campaign

from conftest import ADMIN, SECRET, campaign_toml, open_round


async def test_redis_down_then_back(tmp_path: Path) -> None:
    server = EmbeddedRedis(tmp_path / "r")
    server.start()
    try:
        client = aioredis.Redis.from_url(server.url, decode_responses=True)
        await load_campaign(client, cmp.parse_campaign(
            campaign_toml(rounds=[open_round(server.url, quota=5)])))
        await client.aclose()
        settings = Settings(data_dir=tmp_path / "var", member_jwt_secret=SECRET,
                            admin_token=ADMIN, redis_timeout=0.5, member_rate=100.0,
                            member_burst=100)
        http = TestClient(TestServer(create_app(settings, server.url)))
        await http.start_server()
        auth = {"Authorization": "Bearer " + mint_member_token(SECRET, "m")}
        granted = []
        resp = await http.post("/v1/rounds/R1/grab", json={"venue_id": "V01"}, headers=auth)
        assert resp.status == 201
        granted.append((await resp.json())["coupon"]["code"])

        server.kill()
        t0 = time.monotonic()
        resp = await http.post("/v1/rounds/R1/grab", json={"venue_id": "V01"}, headers=auth)
        elapsed = time.monotonic() - t0
        body = await resp.json()
        assert resp.status == 503 and body["error"]["code"] == "unavailable"
        assert resp.headers["Retry-After"] == "1" and elapsed < 2.0
        assert (await http.get("/readyz")).status == 503
        assert (await http.get("/healthz")).status == 200

        server.start()  # same directory: replays the append-only file
        for _ in range(50):
            resp = await http.post("/v1/rounds/R1/grab", json={"venue_id": "V01"},
                                   headers=auth)
            if resp.status != 503:
                break
            time.sleep(0.1)
        assert resp.status == 201
        granted.append((await resp.json())["coupon"]["code"])
        mine = await (await http.get("/v1/me/coupons", headers=auth)).json()
        assert sorted(c["code"] for c in mine["coupons"]) == sorted(granted)
        await http.close()
    finally:
        server.stop()

"""Shared fixtures: one throwaway redis-server per test session, on a unix socket.

The tests flush only this server, which they started themselves.
"""

from __future__ import annotations

import shutil
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from dataclasses import field as dc_field
from datetime import UTC, datetime, timedelta, timezone
from pathlib import Path

import pytest
import redis
import redis.asyncio as aioredis
from aiohttp import web
from aiohttp.test_utils import TestClient, TestServer

from engine import campaign as cmp
from engine.auth import mint_member_token
from engine.config import Settings
from engine.http.app import create_app
from engine.http.hot import EngineRunner
from engine.store import load_campaign
from engine.store.embedded import EmbeddedRedis


class EngineTestServer(TestServer):
    """aiohttp's test server on the workers' runner, so tests meet the hot path."""

    async def _make_runner(self, **kwargs: object) -> web.BaseRunner:
        assert isinstance(self.app, web.Application)
        return EngineRunner(self.app, **kwargs)  # type: ignore[arg-type]


@pytest.fixture(scope="session")
def redis_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[EmbeddedRedis]:
    if shutil.which("redis-server") is None:
        pytest.fail("redis-server is not installed (apt-get install redis-server)")
    server = EmbeddedRedis(tmp_path_factory.mktemp("redis"))
    server.start()
    yield server
    server.stop()


@pytest.fixture
def redis_url(redis_server: EmbeddedRedis) -> Iterator[str]:
    client = redis.Redis.from_url(redis_server.url)
    client.flushall()
    client.close()
    yield redis_server.url


@pytest.fixture
async def aredis(redis_url: str) -> AsyncIterator[aioredis.Redis]:
    client = aioredis.Redis.from_url(redis_url, decode_responses=True)
    yield client
    await client.aclose()


def redis_now(url: str) -> datetime:
    c = redis.Redis.from_url(url)
    sec, usec = c.time()
    c.close()
    return datetime.fromtimestamp(sec + usec / 1e6, tz=UTC)


def iso(dt: datetime) -> str:
    return dt.astimezone(timezone(timedelta(hours=8))).isoformat(timespec="milliseconds")


def campaign_toml(*, cid: str = "test-c", quota: int = 3, budget: int = 10**9,
                  venues: tuple[str, ...] = ("V01", "V02"),
                  rounds: list[dict] | None = None) -> str:
    """A campaign file; each round dict has id, opens, closes (datetimes), quota, stock,
    and optionally valid_from / valid_until."""
    out = [
        "[campaign]", f'id = "{cid}"', 'name = "测试活动"', 'timezone = "Asia/Shanghai"',
        f"budget_fen = {budget}", "face_value_fen = 10000", "member_price_fen = 100",
        "settlement_fen = 9900", f"member_campaign_quota = {quota}", "",
    ]
    for v in venues:
        out += ["[[venues]]", f'id = "{v}"', f'name = "场馆{v}"', 'kind = "ski"',
                'city = "吉林市"', ""]
    for r in rounds or []:
        vf = r.get("valid_from", r["opens"] - timedelta(hours=1))
        vu = r.get("valid_until", r["closes"] + timedelta(days=30))
        out += ["[[rounds]]", f'id = "{r["id"]}"', f"opens_at = {iso(r['opens'])}",
                f"closes_at = {iso(r['closes'])}",
                f"member_round_quota = {r.get('quota', 1)}",
                f"valid_from = {iso(vf)}", f"valid_until = {iso(vu)}", "[rounds.stock]"]
        # A venue id with dots is quoted: TOML reads a bare dotted key as nested keys.
        out += [(f'"{v}"' if "." in v else v) + f" = {n}" for v, n in r["stock"].items()]
        out.append("")
    return "\n".join(out)


@pytest.fixture
def write_campaign(tmp_path: Path):
    def write(text: str, name: str = "campaign.toml") -> Path:
        p = tmp_path / name
        p.write_text(text, encoding="utf-8")
        return p
    return write


# --- an in-process engine against the session's redis-server -----------------


SECRET = "test-member-secret-0123456789abcdef"
ADMIN = "test-admin-token"


@dataclass
class EngineUnderTest:
    client: TestClient
    redis: aioredis.Redis
    campaign: cmp.Campaign
    venue_tokens: dict[str, str] = dc_field(default_factory=dict)

    def member(self, member_id: str, ttl: int = 3600) -> dict[str, str]:
        return {"Authorization": "Bearer " + mint_member_token(SECRET, member_id, ttl)}

    async def venue(self, venue_id: str) -> dict[str, str]:
        if venue_id not in self.venue_tokens:
            from engine.store import Store
            store = Store(self.redis, self.campaign, Settings())
            self.venue_tokens[venue_id] = await store.add_venue_key(venue_id)
        return {"Authorization": "Bearer " + self.venue_tokens[venue_id]}

    admin = {"Authorization": f"Bearer {ADMIN}"}

    async def snapshot(self) -> dict[str, object]:
        """Every key and value in Redis, to assert that a refusal changed nothing."""
        out: dict[str, object] = {}
        for key in sorted(await self.redis.keys("*")):
            if key.endswith(":soldout"):
                continue  # the state pollers' monitoring record (keys.sold_out)
            kind = await self.redis.type(key)
            if kind == "hash":
                out[key] = await self.redis.hgetall(key)
            elif kind == "list":
                out[key] = await self.redis.lrange(key, 0, -1)
            elif kind == "string":
                out[key] = await self.redis.get(key)
            elif kind == "zset":
                out[key] = await self.redis.zrange(key, 0, -1, withscores=True)
            elif kind == "stream":
                out[key] = await self.redis.xlen(key)
        return out


@pytest.fixture
async def make_engine(redis_url: str, tmp_path: Path, aredis: aioredis.Redis):
    clients: list[TestClient] = []

    async def make(text: str, **settings_kw: object) -> EngineUnderTest:
        c = cmp.parse_campaign(text)
        await load_campaign(aredis, c, int(settings_kw.get("stock_shards", 1)))  # type: ignore[call-overload]
        # A generous Redis timeout: these tests are about answers, not about a stalled
        # Redis (the fault suite sets its own), and with appendfsync always one fsync on
        # a loaded CI disk has taken over the default second (a 503 mid-test).
        kw: dict[str, object] = {"member_rate": 1000.0, "member_burst": 1000,
                                 "redis_timeout": 5.0}
        kw.update(settings_kw)
        settings = Settings(data_dir=tmp_path / "var", redis_url=redis_url,
                            member_jwt_secret=SECRET, admin_token=ADMIN, **kw)  # type: ignore[arg-type]
        client = TestClient(EngineTestServer(create_app(settings, redis_url)))
        await client.start_server()
        clients.append(client)
        return EngineUnderTest(client, aredis, c)

    yield make
    for c in clients:
        await c.close()


def open_round(url: str, rid: str = "R1", stock: dict[str, int] | None = None,
               quota: int = 1, **kw: object) -> dict:
    now = redis_now(url)
    return {"id": rid, "opens": now - timedelta(minutes=5), "closes": now + timedelta(hours=1),
            "quota": quota, "stock": stock or {"V01": 10, "V02": 10}, **kw}


def members_of(shard: int, n: int, shards: int, prefix: str = "m") -> list[str]:
    """``n`` member ids that the engine maps to stock shard ``shard`` of ``shards``."""
    from engine.shards import member_shard
    out, i = [], 0
    while len(out) < n:
        if member_shard(f"{prefix}{i}", shards) == shard:
            out.append(f"{prefix}{i}")
        i += 1
    return out

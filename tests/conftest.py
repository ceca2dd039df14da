"""Shared fixtures: one throwaway redis-server per test session, on a unix socket.

The tests flush only this server, which they started themselves.
"""

from __future__ import annotations

import shutil
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import AsyncIterator, Iterator

import pytest
import redis
import redis.asyncio as aioredis

from engine.embedded import EmbeddedRedis


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
    return datetime.fromtimestamp(sec + usec / 1e6, tz=timezone.utc)


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
        out += [f"{v} = {n}" for v, n in r["stock"].items()]
        out.append("")
    return "\n".join(out)


@pytest.fixture
def write_campaign(tmp_path: Path):
    def write(text: str, name: str = "campaign.toml") -> Path:
        p = tmp_path / name
        p.write_text(text, encoding="utf-8")
        return p
    return write

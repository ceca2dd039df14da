"""Reversed redemptions and settlement: money paid is never left without its redemption.

`settle` marks what it pays in Redis (only coupons still redeemed), the archiver marks
what a settle recorded while Redis was away, reverse.lua refuses a marked code; the one
window left (settle without Redis, then a reverse before the archiver's next pass) is
recorded by the ledger and flagged by the statement and the reconciliation.
"""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
from pathlib import Path

import redis.asyncio as aioredis
from conftest import campaign_toml, open_round

from engine import codes
from engine.config import Settings
from engine.ledger import Ledger, archiver, reconcile
from engine.ledger.cli import _marker

ROOT = Path(__file__).resolve().parent.parent
K = "cpn:{test-c}"


async def granted_and_redeemed(e, member: str) -> str:
    resp = await e.client.post("/v1/rounds/R1/grab", json={"venue_id": "V01"},
                               headers=e.member(member))
    code = (await resp.json())["coupon"]["code"]
    resp = await e.client.post("/v1/venue/redemptions", json={"code": code},
                               headers=await e.venue("V01"))
    assert resp.status == 200
    return code


async def reverse(e, code: str) -> tuple[int, dict]:
    resp = await e.client.post(f"/v1/admin/redemptions/{code}/reverse",
                               json={"reason": "wrong member"}, headers=e.admin)
    return resp.status, await resp.json()


def claims(tmp: Path, name: str, *codes_: str) -> Path:
    p = tmp / f"{name}.csv"
    p.write_text("code,redeemed_at,amount_fen\n" + "".join(
        f"{c},2024-12-20T10:00:00+08:00,10000\n" for c in codes_), encoding="utf-8")
    return p


async def settled_mark(r: aioredis.Redis, code: str) -> str | None:
    return await r.hget(f"{K}:coupon:{codes.normalize(code)}", "settled")


async def test_settle_marks_what_it_pays_and_skips_a_redemption_reversed_meanwhile(
        make_engine, redis_url: str, aredis: aioredis.Redis, tmp_path: Path) -> None:
    e = await make_engine(campaign_toml(rounds=[open_round(redis_url)]))
    a, b = await granted_and_redeemed(e, "a"), await granted_and_redeemed(e, "b")
    with Ledger(tmp_path / "ledger.sqlite3") as led:
        await archiver.archive_once(aredis, led)
        # Reversed in Redis after the ledger last heard of it: the ledger still says
        # redeemed, Redis knows better, and settle asks Redis before it pays.
        assert (await reverse(e, a))[0] == 200
        mark = _marker(Settings(redis_url=redis_url), redis_url)
        summary = await asyncio.to_thread(reconcile.settle, led, "V01",
                                          claims(tmp_path, "c", a, b), tmp_path / "out",
                                          None, mark)
        assert summary["counts"]["matched"] == 1 and summary["counts"]["not_redeemed"] == 1
        assert summary["settled_codes"] == 1 and summary["payable_fen"] == 9900
        assert led.settled_at("test-c").keys() == {codes.normalize(b)}
    assert await settled_mark(aredis, a) is None
    assert await settled_mark(aredis, b) is not None
    s, body = await reverse(e, b)
    assert (s, body["error"]["code"]) == (409, "already_settled")
    rows = (tmp_path / "out" / "reconciliation.csv").read_text("utf-8-sig")
    assert "reversed in Redis before it could be paid" in rows


def run_cli(*args: str, data: Path) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if not k.startswith("COUPON_")}
    env["PYTHONPATH"] = str(ROOT)
    return subprocess.run([sys.executable, "-m", "engine.cli", *args, "--data-dir", str(data)],
                          env=env, capture_output=True, text=True, timeout=60)


async def test_a_settle_without_redis_is_marked_by_the_archiver(
        make_engine, redis_url: str, aredis: aioredis.Redis, tmp_path: Path) -> None:
    e = await make_engine(campaign_toml(rounds=[open_round(redis_url)]))
    c = await granted_and_redeemed(e, "c")
    data = tmp_path / "data"
    with Ledger(data / "ledger.sqlite3") as led:
        await archiver.archive_once(aredis, led)
    # Redis unreachable for settle: it pays from the ledger and says it could not mark.
    p = run_cli("settle", "--venue", "V01", "--claims", str(claims(tmp_path, "c", c)),
                "--out", str(tmp_path / "out"), "--redis-url", "redis://127.0.0.1:1",
                data=data)
    assert p.returncode == 0, p.stderr
    assert json.loads(p.stdout)["settled_codes"] == 1
    assert "marked settled there by the archiver's next pass" in p.stderr
    assert await settled_mark(aredis, c) is None
    with Ledger(data / "ledger.sqlite3") as led:
        await archiver.archive_once(aredis, led)  # the next pass marks it
    assert await settled_mark(aredis, c) is not None
    s, body = await reverse(e, c)
    assert (s, body["error"]["code"]) == (409, "already_settled")


async def test_the_residual_window_is_recorded_and_flagged(
        make_engine, redis_url: str, aredis: aioredis.Redis, tmp_path: Path) -> None:
    e = await make_engine(campaign_toml(rounds=[open_round(redis_url)]))
    d = await granted_and_redeemed(e, "d")
    with Ledger(tmp_path / "ledger.sqlite3") as led:
        await archiver.archive_once(aredis, led)
        # Settled with Redis away, then reversed before the archiver's next pass.
        await asyncio.to_thread(reconcile.settle, led, "V01", claims(tmp_path, "d", d),
                                tmp_path / "s1")
        assert (await reverse(e, d))[0] == 200
        await archiver.archive_once(aredis, led)
        assert led.coupons_by_code([codes.normalize(d)])[codes.normalize(d)].status == "issued"
        doc = await asyncio.to_thread(reconcile.statement, led, tmp_path / "st")
        assert doc["settled_not_redeemed"] == [{"code": d, "venue_id": "V01",
                                                "status": "issued"}]
        v01 = next(v for v in doc["venues"] if v["venue_id"] == "V01")
        assert (v01["redeemed"], v01["settled"], v01["settled_not_redeemed"],
                v01["unclaimed"], v01["outstanding_fen"]) == (0, 1, 1, 0, -9900)
        assert f"WARNING: {d}" in reconcile.statement_text(doc)
        summary = await asyncio.to_thread(reconcile.reconcile, led, "V01",
                                          claims(tmp_path, "d2", d), tmp_path / "r1")
        assert summary["settled_not_redeemed"] == [d]
        assert summary["counts"]["duplicate_claim"] == 1 and summary["payable_fen"] == 0
    # The archiver marked it: it cannot be reversed again, and redeemed once more it is
    # paid no second time.
    assert (await reverse(e, d))[0] == 409
    resp = await e.client.post("/v1/venue/redemptions", json={"code": d},
                               headers=await e.venue("V01"))
    assert resp.status == 200
    with Ledger(tmp_path / "ledger.sqlite3") as led:
        await archiver.archive_once(aredis, led)
        doc = await asyncio.to_thread(reconcile.statement, led, tmp_path / "st2")
        assert doc["settled_not_redeemed"] == []
        summary = await asyncio.to_thread(reconcile.settle, led, "V01",
                                          claims(tmp_path, "d3", d), tmp_path / "s2")
        assert summary["counts"]["duplicate_claim"] == 1 and summary["settled_codes"] == 0
        assert "settled_not_redeemed" not in summary

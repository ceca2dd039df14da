"""`coupon-engine restore` replays the operators' actions: after Redis lost everything, a
paused round comes back paused, a cancelled (closed early) round closed, added stock and
reversed redemptions as they were, settled codes still marked settled; key for key the
state the scripts had left, on one stock shard and on three.
"""

from __future__ import annotations

import os
import subprocess
import sys
from datetime import timedelta
from pathlib import Path

import pytest
import redis.asyncio as aioredis
from conftest import campaign_toml, redis_now
from test_restore import assert_same_state, grab, granted, redeem, run_restore, snapshot
from test_restore import without_venue_keys as no_vkeys

from engine.ledger import Ledger, archiver
from engine.store import keys

ROOT = Path(__file__).resolve().parent.parent


async def control(e, path: str, body: dict | None = None) -> dict:
    resp = await e.client.post(f"/v1/admin/{path}", json=body or {"reason": "test"},
                               headers=e.admin)
    got = await resp.json()
    assert resp.status == 200, got
    return got


def settle(url: str, data: Path, venue: str, code: str, out: Path) -> None:
    claims = out.with_suffix(".csv")
    claims.write_text(f"code,redeemed_at,amount_fen\n{code},2024-12-20T10:00:00+08:00,10000\n",
                      encoding="utf-8")
    env = {k: v for k, v in os.environ.items() if not k.startswith("COUPON_")}
    env["PYTHONPATH"] = str(ROOT)
    p = subprocess.run([sys.executable, "-m", "engine.cli", "settle", "--venue", venue,
                        "--claims", str(claims), "--out", str(out), "--redis-url", url,
                        "--data-dir", str(data)], env=env, capture_output=True, text=True,
                       timeout=60)
    assert p.returncode == 0, p.stderr


def summed(snap: dict[str, tuple], suffix: str, skip: tuple[str, ...] = ()) -> dict[str, int]:
    out: dict[str, int] = {}
    for key, (_, value, _) in snap.items():
        if key.endswith(suffix):
            for f, v in value.items():
                if not f.startswith(skip):
                    out[f] = out.get(f, 0) + int(v)
    return out


@pytest.mark.parametrize("shards", [1, 3])
async def test_restore_brings_back_every_control(make_engine, redis_url: str,
                                                 aredis: aioredis.Redis, tmp_path: Path,
                                                 shards: int) -> None:
    now = redis_now(redis_url)
    rounds = [{"id": "R1", "opens": now - timedelta(minutes=5), "closes": now + timedelta(hours=1),
               "stock": {"V01": 6, "V02": 4}},
              {"id": "R2", "opens": now + timedelta(hours=2), "closes": now + timedelta(hours=3),
               "stock": {"V01": 5}}]
    text = campaign_toml(cid="ctl-c", rounds=rounds)
    e = await make_engine(text, stock_shards=shards)
    data = tmp_path / "var"
    reversed_, again, settled = (await granted(e, "m1", "V01", "R1", key="k1"),
                                 await granted(e, "m2", "V01", "R1"),
                                 await granted(e, "m3", "V02", "R1"))
    for code, venue in ((reversed_, "V01"), (again, "V01"), (settled, "V02")):
        assert (await redeem(e, venue, code))[0] == 200
    await control(e, f"redemptions/{reversed_}/reverse")
    await control(e, f"redemptions/{again}/reverse")
    assert (await redeem(e, "V01", again))[0] == 200
    settle(redis_url, data, "V02", settled, tmp_path / "settled")
    await control(e, "rounds/R1/stock", {"venue_id": "V01", "add": 3, "reason": "short"})
    await control(e, "rounds/R2/stock", {"venue_id": "V01", "add": 2, "reason": "more"})
    await control(e, "rounds/R1/pause")
    await control(e, "rounds/R1/resume")
    assert await granted(e, "m4", "V01", "R1")
    paused = await control(e, "rounds/R1/pause", {"reason": "bots on V01"})
    await control(e, "rounds/R2/close", {"reason": "cancelled"})
    with Ledger(data / "ledger.sqlite3") as led:
        await archiver.archive_once(aredis, led)
        assert led.audit_count() == 8
    before = no_vkeys(await snapshot(aredis))
    k = keys.Keys("ctl-c")
    assert before[k.round("R1")][1]["p"] == str(
        int(before[k.round("R1")][1]["pa"]))  # paused, since its last pause

    await aredis.flushall()  # total loss
    p = run_restore(redis_url, data)
    assert p.returncode == 0, p.stderr
    assert "8 operator action(s)" in p.stdout and "2 reversed" in p.stdout
    after = await snapshot(aredis)
    if shards == 1:
        assert_same_state(before, after)
    else:
        # Stock is split evenly over the shards again (docs/ledger.md, "Restore"): compare
        # everything else key for key, stock and stats summed over the shards.
        def rest(snap: dict[str, tuple]) -> dict[str, tuple]:
            return {key: v for key, v in snap.items() if not key.endswith((":stock", ":stats"))}
        assert_same_state(rest(before), rest(after))
        assert summed(after, ":stock") == summed(before, ":stock")
        assert summed(after, ":stats", ("xfer_",)) == summed(before, ":stats", ("xfer_",))

    # The restored engine: R1 paused, R2 closed, stock and reversals as they were.
    e = await make_engine(text, stock_shards=shards)
    s, b = await grab(e, "n1", "V01", "R1")
    assert (s, b["error"]["code"]) == (409, "round_paused")
    s, b = await grab(e, "m1", "V01", "R1", key="k1")  # a keyed retry still replays
    assert (s, b["coupon"]["code"]) == (201, reversed_)
    s, b = await grab(e, "n1", "V01", "R2")
    assert (s, b["error"]["code"]) == (410, "round_closed")
    resp = await e.client.get("/v1/rounds/R1")
    v01 = next(v for v in (await resp.json())["round"]["venues"] if v["venue_id"] == "V01")
    assert (v01["stock"], v01["remaining"]) == (9, 6)
    stats = await (await e.client.get("/v1/admin/rounds/R1/stats", headers=e.admin)).json()
    assert stats["paused"] is True
    row = next(v for v in stats["venues"] if v["venue_id"] == "V01")
    assert (row["added"], row["reversed"], row["redeemed"], row["issued"]) == (3, 2, 1, 3)
    resp = await e.client.post(f"/v1/admin/redemptions/{settled}/reverse",
                               json={"reason": "x"}, headers=e.admin)
    assert (await resp.json())["error"]["code"] == "already_settled"
    assert (await redeem(e, "V01", reversed_))[0] == 200  # redeemable once more
    resumed = await control(e, "rounds/R1/resume", {"reason": "after the restore"})
    assert resumed["audit"]["before"]["paused_at_ms"] == paused["audit"]["after"]["paused_at_ms"]
    assert (await grab(e, "n1", "V01", "R1"))[0] == 201

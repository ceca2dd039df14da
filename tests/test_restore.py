"""`coupon-engine restore`: Redis loses everything; the ledger rebuilds it exactly.

The end-to-end tests run real traffic through the engine (grants with and
without Idempotency-Key, voids in an open and in a closed round, redemptions,
refusals), archive it, snapshot every key of the campaign, FLUSHALL the test's
own redis-server, run the CLI, and compare. Then they keep trading on the
restored state. The unit tests drive ``restore.build`` without Redis.
"""

from __future__ import annotations

import asyncio
import os
import signal
import sqlite3
import subprocess
import sys
from dataclasses import dataclass, field
from datetime import UTC, timedelta
from pathlib import Path

import pytest
import redis.asyncio as aioredis
from conftest import campaign_toml, redis_now

from engine import campaign as cmp
from engine import codes
from engine.ledger import EventRow, Ledger, archiver, restore
from engine.store import keys, streams

ROOT = Path(__file__).resolve().parent.parent
CLOSE_S = 2.5          # round R1 closes this long after the campaign is written
EXPIRY_TOLERANCE_MS = 250
TTL_S = 86_400


# -- helpers -----------------------------------------------------------------------


async def grab(e, member: str, venue: str, round_id: str, key: str | None = None):
    headers = e.member(member)
    if key is not None:
        headers["Idempotency-Key"] = key
    resp = await e.client.post(f"/v1/rounds/{round_id}/grab", headers=headers,
                               json={"venue_id": venue})
    return resp.status, await resp.json()


async def granted(e, member: str, venue: str, round_id: str, key: str | None = None) -> str:
    status, body = await grab(e, member, venue, round_id, key)
    assert status == 201, body
    return body["coupon"]["code"]


async def void(e, member: str, code: str) -> dict:
    resp = await e.client.delete(f"/v1/me/coupons/{code}", headers=e.member(member))
    return await resp.json()


async def redeem(e, venue: str, code: str):
    resp = await e.client.post("/v1/venue/redemptions", json={"code": code},
                               headers=await e.venue(venue))
    return resp.status, await resp.json()


async def snapshot(r: aioredis.Redis) -> dict[str, tuple]:
    """Every key: (type, contents, absolute expiry ms or -1). No DUMP: a restored
    key must have the same contents, not the same encoding."""
    out: dict[str, tuple] = {}
    async for key in r.scan_iter(count=1000):
        if key.endswith(":soldout"):
            continue  # the pollers' monitoring record, not rebuilt (docs/ledger.md, "Restore")
        kind = await r.type(key)
        if kind == "hash":
            value: object = await r.hgetall(key)
        elif kind == "list":
            value = await r.lrange(key, 0, -1)
        elif kind == "string":
            value = await r.get(key)
        elif kind == "zset":
            value = await r.zrange(key, 0, -1, withscores=True)
        elif kind == "stream":
            info = await r.xinfo_stream(key)
            groups = await r.xinfo_groups(key)
            value = {
                "entries": await r.xrange(key),
                "info": {f: info.get(f) for f in ("length", "last-generated-id",
                                                  "max-deleted-entry-id", "entries-added")},
                "groups": [{f: g.get(f) for f in ("name", "last-delivered-id", "entries-read",
                                                   "lag", "pending")} for g in groups]}
        else:
            raise AssertionError(f"unexpected key type {kind} for {key}")
        out[key] = (kind, value, int(await r.execute_command("PEXPIRETIME", key)))
    return out


def assert_same_state(before: dict[str, tuple], after: dict[str, tuple]) -> None:
    """Equal key sets and contents; expiry times equal within a tolerance."""
    assert sorted(after) == sorted(before)
    for key, (kind, value, expiry) in before.items():
        kind2, value2, expiry2 = after[key]
        assert (kind2, value2) == (kind, value), key
        if expiry == -1:
            assert expiry2 == -1, key
        else:
            assert abs(expiry2 - expiry) <= EXPIRY_TOLERANCE_MS, (key, expiry, expiry2)


def without_venue_keys(snap: dict[str, tuple]) -> dict[str, tuple]:
    return {k: v for k, v in snap.items() if ":vkeys:" not in k}


def run_restore(url: str, data_dir: Path, *extra: str, crash: str | None = None
                ) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if not k.startswith("COUPON_")}
    env["PYTHONPATH"] = str(ROOT)
    if crash:
        env[restore.CRASH_ENV] = crash
    return subprocess.run(
        [sys.executable, "-m", "engine.cli", "restore", "--redis-url", url,
         "--data-dir", str(data_dir), *extra],
        env=env, cwd=ROOT, capture_output=True, text=True, timeout=120)


async def wait_until_redis_ms(r: aioredis.Redis, at_ms: int) -> None:
    deadline = asyncio.get_running_loop().time() + CLOSE_S + 10
    while True:
        sec, usec = await r.time()
        now = sec * 1000 + usec // 1000
        if now >= at_ms:
            return
        assert asyncio.get_running_loop().time() < deadline, "Redis clock did not advance"
        await asyncio.sleep(min(0.2, (at_ms - now) / 1000 + 0.01))


@dataclass
class Scenario:
    text: str
    campaign: cmp.Campaign
    data_dir: Path
    codes: dict[str, str] = field(default_factory=dict)
    archived: int = 0
    before: dict[str, tuple] = field(default_factory=dict)

    @property
    def ledger_path(self) -> Path:
        return self.data_dir / "ledger.sqlite3"


async def run_traffic(make_engine, redis_url: str, aredis: aioredis.Redis, tmp_path: Path,
                      closed_round: bool = True, shards: int = 1) -> Scenario:
    """Grants (keyed and not), replays, voids while open and after close,
    redemptions and refusals; then the archiver drains the stream."""
    now = redis_now(redis_url)
    closes = now + timedelta(seconds=CLOSE_S) if closed_round else now + timedelta(hours=1)
    rounds = [
        {"id": "R1", "opens": now - timedelta(minutes=5), "closes": closes, "quota": 2,
         "stock": {"V01": 6, "V02": 4}},
        {"id": "R2", "opens": closes, "closes": closes + timedelta(hours=1), "quota": 2,
         "stock": {"V01": 5, "V02": 2, "V03": 3},
         "valid_from": now - timedelta(hours=1)},
    ]
    text = campaign_toml(cid="restore-c", quota=3, venues=("V01", "V02", "V03"), rounds=rounds)
    e = await make_engine(text, stock_shards=shards)
    s = Scenario(text, e.campaign, tmp_path / "var")
    c = s.codes
    # Round R1, open.
    c["m1a"] = await granted(e, "m1", "V01", "R1", key="k-m1-a")
    assert await granted(e, "m1", "V01", "R1", key="k-m1-a") == c["m1a"]      # replay
    c["m1b"] = await granted(e, "m1", "V02", "R1")                             # no key
    c["m2a"] = await granted(e, "m2", "V01", "R1", key="tap")
    c["m3a"] = await granted(e, "m3", "V01", "R1", key="tap")  # same key, other member
    c["m4a"] = await granted(e, "m4", "V02", "R1")
    c["m5a"] = await granted(e, "m5", "V01", "R1", key="k5")
    c["m4b"] = await granted(e, "m4", "V01", "R1", key="k4:with:colons")
    assert (await grab(e, "m1", "V01", "R1"))[1]["error"]["code"] == "round_quota_exceeded"
    assert (await void(e, "m2", c["m2a"]))["coupon"]["status"] == "void"     # open: restocked
    assert (await redeem(e, "V01", c["m1a"]))[0] == 200
    assert (await redeem(e, "V02", c["m1b"]))[0] == 200
    if closed_round:
        await wait_until_redis_ms(aredis, e.campaign.round("R1").closes_at_ms + 20)
        assert (await void(e, "m5", c["m5a"]))["coupon"]["status"] == "void"  # closed: counted only
        assert (await void(e, "m4", c["m4a"]))["coupon"]["status"] == "void"
        # Round R2, open now.
        c["m1c"] = await granted(e, "m1", "V03", "R2", key="k-m1-c")  # m1 at campaign quota
        c["m2b"] = await granted(e, "m2", "V02", "R2", key="r2")
        c["m2c"] = await granted(e, "m2", "V03", "R2")                         # m2 at round quota
        c["m3b"] = await granted(e, "m3", "V02", "R2")                         # V02 sold out
        assert (await grab(e, "m7", "V02", "R2"))[1]["error"]["code"] == "sold_out"
        assert (await void(e, "m3", c["m3b"]))["coupon"]["status"] == "void"  # open: back
        c["m6a"] = await granted(e, "m6", "V02", "R2", key="x")                # sold out again
        assert (await redeem(e, "V02", c["m2b"]))[0] == 200
        assert (await redeem(e, "V03", c["m1c"]))[0] == 200
        assert (await grab(e, "m1", "V01", "R2"))[1]["error"]["code"] == "campaign_quota_exceeded"
    with Ledger(s.ledger_path) as led:
        s.archived = await archiver.archive_once(aredis, led)
    s.before = await snapshot(aredis)
    return s


# -- end to end ------------------------------------------------------------------------


async def test_restore_after_total_loss_rebuilds_exactly_and_keeps_trading(
        make_engine, redis_url: str, aredis: aioredis.Redis, tmp_path: Path) -> None:
    s = await run_traffic(make_engine, redis_url, aredis, tmp_path)
    k = keys.Keys(s.campaign.id)
    assert s.archived == 20  # 12 grants, 4 voids, 4 redemptions
    # Sanity: the snapshot holds every kind of key the engine keeps.
    kinds = {key.split(":")[2] for key in s.before if key != keys.ACTIVE}
    assert kinds == {"campaign", "round", "stock", "stats", "member", "coupon",
                     "idem", "vredeemed", "vkeys", "events", "archived"}
    assert int(s.before[k.stats][1]["returned_open:R1:V01"]) == 1
    assert int(s.before[k.stats][1]["returned_closed:R1:V01"]) == 1
    assert int(s.before[k.stats][1]["returned_closed:R1:V02"]) == 1
    assert int(s.before[k.stats][1]["returned_open:R2:V02"]) == 1

    await aredis.flushall()  # the session's throwaway redis-server: total loss
    assert await aredis.dbsize() == 0
    p = run_restore(redis_url, s.data_dir)
    assert p.returncode == 0, p.stderr
    assert "8 idempotency record(s)" in p.stdout
    assert "venue API keys are not in the ledger" in p.stdout
    after = await snapshot(aredis)
    assert_same_state(without_venue_keys(s.before), after)

    # The engine carries on over the restored state (venue keys re-issued).
    e = await make_engine(s.text)
    c = s.codes
    # Keyed retries of earlier grants replay the same coupon, whatever it became.
    for member, venue, rnd, key, name in (("m1", "V01", "R1", "k-m1-a", "m1a"),
                                          ("m2", "V01", "R1", "tap", "m2a"),
                                          ("m3", "V01", "R1", "tap", "m3a"),
                                          ("m4", "V01", "R1", "k4:with:colons", "m4b"),
                                          ("m1", "V03", "R2", "k-m1-c", "m1c"),
                                          ("m6", "V02", "R2", "x", "m6a")):
        status, body = await grab(e, member, venue, rnd, key)
        assert (status, body["coupon"]["code"], body["coupon"]["status"]) == \
            (201, c[name], "issued"), name
    status, body = await grab(e, "m1", "V02", "R1", "k-m1-a")
    assert (status, body["error"]["code"]) == (422, "idempotency_key_reused")
    # Quotas still hold.
    assert (await grab(e, "m1", "V01", "R2"))[1]["error"]["code"] == "campaign_quota_exceeded"
    assert (await grab(e, "m2", "V01", "R2"))[1]["error"]["code"] == "round_quota_exceeded"
    # Stock limits still hold: R2:V02 is out, R2:V03 has 1 left, R2:V01 all 5.
    assert (await grab(e, "n0", "V02", "R2"))[1]["error"]["code"] == "sold_out"
    new = [await granted(e, "n1", "V03", "R2")]
    assert (await grab(e, "n2", "V03", "R2"))[1]["error"]["code"] == "sold_out"
    new += [await granted(e, f"p{i}", "V01", "R2") for i in range(5)]
    assert (await grab(e, "p5", "V01", "R2"))[1]["error"]["code"] == "sold_out"
    # Restored coupons keep their state.
    status, body = await redeem(e, "V01", c["m1a"])
    assert (status, body["error"]["code"]) == (409, "already_redeemed")
    assert (await void(e, "m2", c["m2a"]))["error"]["code"] == "already_void"
    assert (await redeem(e, "V01", c["m4b"]))[0] == 200
    # The archiver takes only the new events: no restored event twice.
    last_before = s.before[k.events][1]["info"]["last-generated-id"]
    with Ledger(s.ledger_path) as led:
        assert await archiver.archive_once(aredis, led) == len(new) + 1
        ids = led.event_ids(s.campaign.id)
        assert len(ids) == len(set(ids)) == s.archived + len(new) + 1
        marks = ",".join("?" * len(new))
        fresh = [r[0] for r in led.db.execute(
            f"SELECT event_id FROM events WHERE code IN ({marks})"
            " OR (code = ? AND type = 'redeem')",
            [codes.normalize(x) for x in new] + [codes.normalize(c["m4b"])])]
        assert len(fresh) == len(new) + 1
        assert all(_id(x) > _id(last_before) for x in fresh)
        grants = led.db.execute("SELECT count(*), count(DISTINCT code) FROM events"
                                " WHERE type = 'grant'").fetchone()
        assert grants == (12 + len(new), 12 + len(new))
    assert await streams.lag(aredis, s.campaign.id) == 0


def _by_shard_field(snap: dict[str, tuple], prefix: str) -> dict[str, int]:
    """Per '<shard tag> <field>', the integer fields of the ``prefix`` hashes."""
    return {f"{key} {f}": int(v) for key, (_, h, _) in snap.items()
            if key.endswith(prefix) for f, v in h.items()}


async def test_restore_of_a_sharded_campaign_rebuilds_every_shard_and_keeps_trading(
        make_engine, redis_url: str, aredis: aioredis.Redis, tmp_path: Path) -> None:
    """The same traffic on 3 stock shards. Every key comes back in its shard, equal,
    except where stock stood after transfers (not in the ledger): each line's
    remaining stock is split evenly, and each shard's arithmetic still holds."""
    n = 3
    s = await run_traffic(make_engine, redis_url, aredis, tmp_path, shards=n)
    assert s.archived == 20
    ks = [keys.Keys(s.campaign.id, sh) for sh in range(n)]
    tags = {key[key.index("{"):key.index("}") + 1] for key in s.before if key != keys.ACTIVE}
    assert tags == {k.tag[k.tag.index("{"):] for k in ks}  # traffic reached every shard

    def moved(key: str) -> bool:
        return key.endswith((":stock", ":stats", ":xfer_in", ":xfer_out"))

    await aredis.flushall()
    p = run_restore(redis_url, s.data_dir)  # the count comes from the ledger
    assert p.returncode == 0, p.stderr
    assert "3 stock shards" in p.stdout
    after = await snapshot(aredis)
    assert_same_state({k: v for k, v in without_venue_keys(s.before).items() if not moved(k)},
                      {k: v for k, v in after.items() if not moved(k)})
    # Stats equal shard by shard, but for the transfers; stock equal line by line.
    def counts(snap: dict[str, tuple]) -> dict[str, int]:
        return {k: v for k, v in _by_shard_field(snap, ":stats").items() if " xfer_" not in k}
    assert counts(after) == counts(s.before)
    for line in [f"{r.id}:{v}" for r in s.campaign.rounds for v in r.stock]:
        assert sum(int(after[k.stock][1][line]) for k in ks) == \
            sum(int(s.before[k.stock][1][line]) for k in ks), line
        for k in ks:
            st = {f: int(v) for f, v in after[k.stats][1].items()}
            assert int(after[k.stock][1][line]) == (
                st[f"initial:{line}"] - st.get(f"issued:{line}", 0)
                + st.get(f"returned_open:{line}", 0)
                - st.get(f"xfer_out:{line}", 0) + st.get(f"xfer_in:{line}", 0)), (k.tag, line)
    assert after[ks[0].campaign][1]["shards"] == "3"

    # The engine carries on: replays, quotas, stock limits, and the archiver takes
    # only new events, from every shard.
    e = await make_engine(s.text, stock_shards=n)
    for member, venue, rnd, key, name in (("m1", "V01", "R1", "k-m1-a", "m1a"),
                                          ("m3", "V01", "R1", "tap", "m3a"),
                                          ("m6", "V02", "R2", "x", "m6a")):
        status, body = await grab(e, member, venue, rnd, key)
        assert status == 201 and body["coupon"]["code"] == s.codes[name], (name, status, body)
    assert (await grab(e, "m1", "V01", "R2"))[1]["error"]["code"] == "campaign_quota_exceeded"
    assert (await grab(e, "n0", "V02", "R2"))[1]["error"]["code"] == "sold_out"
    new = [await granted(e, f"p{i}", "V01", "R2") for i in range(5)]
    assert (await grab(e, "p5", "V01", "R2"))[1]["error"]["code"] == "sold_out"
    with Ledger(s.ledger_path) as led:
        assert await archiver.archive_once(aredis, led) == len(new)
        ids = led.event_ids(s.campaign.id)
        assert len(ids) == len(set(ids)) == s.archived + len(new)
    assert await streams.lag(aredis, s.campaign.id) == 0


def _id(event_id: str) -> tuple[int, int]:
    ms, _, seq = event_id.partition("-")
    return int(ms), int(seq)


async def test_restore_refuses_a_redis_that_holds_the_campaign(
        make_engine, redis_url: str, aredis: aioredis.Redis, tmp_path: Path) -> None:
    s = await run_traffic(make_engine, redis_url, aredis, tmp_path, closed_round=False)
    p = run_restore(redis_url, s.data_dir)
    assert p.returncode == 2
    assert p.stderr.startswith("coupon-engine: this Redis already holds campaign 'restore-c'")
    assert p.stderr.count("\n") == 1
    assert await snapshot(aredis) == s.before
    # A grant nobody archived yet: --force archives the stream before replacing.
    e = await make_engine(s.text)
    late = await granted(e, "late", "V02", "R1", key="late-key")
    before = await snapshot(aredis)
    p = run_restore(redis_url, s.data_dir, "--force")
    assert p.returncode == 0, p.stderr
    assert "archived 1 new event(s)" in p.stdout
    after = await snapshot(aredis)
    # Venue keys still present are kept; the stream is now fully archived.
    k = keys.Keys(s.campaign.id)
    assert before[k.events][1]["info"]["length"] == 1
    late_id = before[k.events][1]["entries"][0][0]
    assert (after[k.events][1]["info"]["length"], after[k.archived][1]) == (0, late_id)
    before.pop(k.events), after.pop(k.events), before.pop(k.archived), after.pop(k.archived)
    assert_same_state(before, after)
    assert any(":vkeys:" in key for key in after)
    assert (await grab(e, "late", "V02", "R1", key="late-key"))[1]["coupon"]["code"] == late


async def test_restore_refuses_another_campaign_and_a_differing_file(
        make_engine, redis_url: str, aredis: aioredis.Redis, tmp_path: Path,
        write_campaign) -> None:
    s = await run_traffic(make_engine, redis_url, aredis, tmp_path, closed_round=False)
    await aredis.flushall()
    await aredis.set(keys.ACTIVE, "other")
    p = run_restore(redis_url, s.data_dir, "--force")
    assert p.returncode == 2 and "serves campaign 'other'" in p.stderr
    await aredis.flushall()
    changed = write_campaign(s.text.replace('name = "测试活动"', 'name = "改过"'))
    p = run_restore(redis_url, s.data_dir, "--campaign", str(changed))
    assert p.returncode == 2 and "differs from the ledger's copy" in p.stderr
    assert await aredis.dbsize() == 0
    same = write_campaign(s.text, "same.toml")
    p = run_restore(redis_url, s.data_dir, "--campaign", str(same))
    assert p.returncode == 0, p.stderr
    assert_same_state(without_venue_keys(s.before), await snapshot(aredis))
    p = run_restore(redis_url, tmp_path / "nowhere")
    assert p.returncode == 2 and "no ledger at" in p.stderr


@pytest.mark.parametrize("crash", ["after_clear", "after_batch:2"])
async def test_rerun_after_a_crash_mid_restore(
        make_engine, redis_url: str, aredis: aioredis.Redis, tmp_path: Path,
        crash: str) -> None:
    s = await run_traffic(make_engine, redis_url, aredis, tmp_path, closed_round=False)
    await aredis.flushall()
    p = run_restore(redis_url, s.data_dir, "--batch", "3", crash=crash)
    assert p.returncode == -signal.SIGKILL
    # Half-written: marked, and not a loaded campaign a worker could serve.
    assert await aredis.exists(restore.marker_key(s.campaign.id))
    assert await aredis.get(keys.ACTIVE) is None
    assert not await aredis.exists(keys.Keys(s.campaign.id).stock)
    if crash.startswith("after_batch"):
        assert await aredis.dbsize() > 3
    p = run_restore(redis_url, s.data_dir, "--batch", "3")  # no --force needed
    assert p.returncode == 0, p.stderr
    assert "did not finish; starting over" in p.stdout
    assert_same_state(without_venue_keys(s.before), await snapshot(aredis))


async def test_dry_run_touches_nothing(make_engine, redis_url: str, aredis: aioredis.Redis,
                                       tmp_path: Path) -> None:
    s = await run_traffic(make_engine, redis_url, aredis, tmp_path, closed_round=False)
    await aredis.flushall()
    p = run_restore(redis_url, s.data_dir, "--dry-run")
    assert p.returncode == 0, p.stderr
    assert "dry run, nothing written" in p.stdout and "7 coupon(s)" in p.stdout
    assert await aredis.dbsize() == 0


async def test_grant_events_carry_the_idempotency_key(make_engine, redis_url: str,
                                                      aredis: aioredis.Redis) -> None:
    now = redis_now(redis_url)
    e = await make_engine(campaign_toml(rounds=[{
        "id": "R1", "opens": now - timedelta(minutes=1), "closes": now + timedelta(hours=1),
        "quota": 2, "stock": {"V01": 5}}]))
    await granted(e, "a", "V01", "R1", key="a:b:idem:a:c")
    await granted(e, "a", "V01", "R1")
    entries = await aredis.xrange(keys.Keys("test-c").events)
    assert [f["idem"] for _, f in entries] == ["a:b:idem:a:c", ""]


# -- pure: restore.build -------------------------------------------------------------


def _campaign() -> cmp.Campaign:
    from datetime import datetime
    t0 = datetime(2024, 12, 20, 2, 0, tzinfo=UTC)
    return cmp.parse_campaign(campaign_toml(cid="u", quota=3, rounds=[
        {"id": "R1", "opens": t0, "closes": t0 + timedelta(hours=1), "quota": 2,
         "stock": {"V01": 3, "V02": 1}}]))


C = _campaign()
R1 = C.round("R1")
OPEN = R1.opens_at_ms + 1000
AFTER = R1.closes_at_ms + 1000


def ev(n: int, etype: str, code: str, member: str = "m", at: int = OPEN, venue: str = "V01",
       restocked: int | None = None, idem: str | None = "", rnd: str = "R1") -> EventRow:
    return EventRow(f"{1000 + n}-0", etype, code, rnd, venue, member, at,
                    restocked if etype == "void" else None, idem if etype == "grant" else None)


A, B, D = "A" * 17, "B" * 17, "D" * 17


def test_build_replays_the_scripts_rules() -> None:
    events = [ev(1, "grant", A, idem="k1"), ev(2, "grant", B, at=OPEN + 5),
              ev(3, "grant", D, member="n", venue="V02", idem="k1"),
              ev(4, "void", A, at=OPEN + 9, restocked=1), ev(5, "redeem", B, at=OPEN + 20),
              ev(6, "void", D, member="n", venue="V02", at=AFTER, restocked=None)]
    t = restore.build(C, events, now_ms=OPEN + 100, idempotency_ttl_s=TTL_S)
    k = keys.Keys("u")
    assert t.final_hashes[k.stock] == {"R1:V01": "2", "R1:V02": "0"}
    assert t.final_hashes[k.stats] == {
        "initial:R1:V01": "3", "initial:R1:V02": "1", "issued:R1:V01": "2",
        "issued:R1:V02": "1", "void:R1:V01": "1", "returned_open:R1:V01": "1",
        "redeemed:R1:V01": "1", "void:R1:V02": "1", "returned_closed:R1:V02": "1"}
    assert t.hashes[k.member("m")] == {"total": "2", "r:R1": "2", "c": B + A}  # newest first
    assert t.lists == {}
    assert t.hashes[k.coupon(A)]["status"] == "void"
    assert t.hashes[k.coupon(A)]["voided_at"] == str(OPEN + 9)
    assert t.hashes[k.coupon(B)] == {
        "round": "R1", "venue": "V01", "member": "m", "status": "redeemed",
        "issued_at": str(OPEN + 5), "valid_from": str(R1.valid_from_ms),
        "valid_until": str(R1.valid_until_ms), "closes_at": str(R1.closes_at_ms),
        "redeemed_at": str(OPEN + 20)}
    assert t.zsets == {k.venue_redemptions("V01"): {B: OPEN + 20}}
    assert t.expiring == {
        k.idempotency("m", "k1"): (f"R1/V01|{A}|{OPEN}|{R1.valid_from_ms}|{R1.valid_until_ms}",
                                   OPEN + TTL_S * 1000),
        k.idempotency("n", "k1"): (f"R1/V02|{D}|{OPEN}|{R1.valid_from_ms}|{R1.valid_until_ms}",
                                   OPEN + TTL_S * 1000)}
    assert t.streams == [restore.Stream(k.events, "1006-0", 6)]


def test_build_skips_expired_idempotency_and_counts_unrecorded_keys() -> None:
    events = [ev(1, "grant", A, idem="old"), ev(2, "grant", B, at=OPEN + 10, idem=None)]
    t = restore.build(C, events, now_ms=OPEN + 5 + TTL_S * 1000, idempotency_ttl_s=TTL_S)
    assert t.expiring == {}
    assert t.report.idempotency_expired == 1
    assert t.report.grants_without_key_record == 1


def test_build_rejects_histories_the_scripts_cannot_produce() -> None:
    bad = {
        "no grant of this code": [ev(1, "redeem", A)],
        "redeemed while void": [ev(1, "grant", A), ev(2, "void", A, restocked=1),
                                ev(3, "redeem", A)],
        "voided while redeemed": [ev(1, "grant", A), ev(2, "redeem", A), ev(3, "void", A)],
        "code granted twice": [ev(1, "grant", A), ev(2, "grant", A)],
        "no stock line R1:V03": [ev(1, "grant", A, venue="V03")],
        "differ from the code's grant": [ev(1, "grant", A), ev(2, "void", A, member="x")],
        "not in stream order": [ev(2, "grant", A), ev(1, "grant", B)],
    }
    for reason, events in bad.items():
        with pytest.raises(restore.RestoreError, match=reason):
            restore.build(C, events, OPEN, TTL_S)


def test_oversold_history_is_restored_with_a_warning() -> None:
    events = [ev(1, "grant", A, venue="V02"), ev(2, "grant", B, member="n", venue="V02")]
    t = restore.build(C, events, OPEN, TTL_S)
    assert t.final_hashes[keys.Keys("u").stock]["R1:V02"] == "-1"
    assert "R1:V02 is -1" in t.report.warnings[0]


def test_refusal_rules() -> None:
    E = restore.Existing
    assert restore.check_target(E(None, False, 0), "u", False) is None
    assert "already holds" in restore.check_target(E("u", False, 9), "u", False)
    assert "already holds" in restore.check_target(E(None, False, 1), "u", False)
    assert restore.check_target(E("u", False, 9), "u", True) is None
    assert restore.check_target(E(None, True, 50), "u", False) is None
    assert "serves campaign 'v'" in restore.check_target(E("v", False, 0), "u", True)


# -- the ledger: idem_key column, order, migration -------------------------------------


def test_ledger_stores_idem_and_sorts_stream_ids_numerically(tmp_path: Path) -> None:
    base = {"code": A, "round": "R1", "venue": "V01", "member": "m", "at": "5"}
    with Ledger(tmp_path / "l.sqlite3") as led:
        led.insert_events("u", [("1000-0", {**base, "type": "redeem", "at": "9"}),
                                ("999-1", {**base, "type": "grant", "idem": "k"}),
                                ("999-0", {**base, "code": B, "type": "grant"})])
        rows = led.events_of("u")
    assert [r.event_id for r in rows] == ["999-0", "999-1", "1000-0"]
    assert [r.idem_key for r in rows] == [None, "k", None]


def test_an_old_ledger_file_is_migrated(tmp_path: Path) -> None:
    path = tmp_path / "old.sqlite3"
    db = sqlite3.connect(path)
    db.executescript("""
        CREATE TABLE events (event_id TEXT PRIMARY KEY, campaign_id TEXT NOT NULL,
            type TEXT NOT NULL, code TEXT NOT NULL, round_id TEXT NOT NULL,
            venue_id TEXT NOT NULL, member_id TEXT NOT NULL, at_ms INTEGER NOT NULL,
            restocked INTEGER);
        INSERT INTO events VALUES ('1-0', 'u', 'grant', 'AAAAAAAAAAAAAAAAA', 'R1', 'V01', 'm',
            5, NULL);
    """)
    db.commit()
    db.close()
    with Ledger(path) as led:
        assert [r.idem_key for r in led.events_of("u")] == [None]
        led.insert_events("u", [("2-0", {"type": "grant", "code": B, "round": "R1",
                                         "venue": "V01", "member": "m", "at": "6",
                                         "idem": ""})])
        assert [r.idem_key for r in led.events_of("u")] == [None, ""]
    with Ledger(path) as led:  # opening again is a no-op
        assert led.event_count() == 2

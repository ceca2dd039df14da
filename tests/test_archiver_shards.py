"""The archiver with S > 1 stock shards: one stream per shard, each archived exactly once.

The streams are written the way the scripts write them (XADD * with the same
fields, on the stream of the shard that owns the coupon's code); the campaign
hash of shard 0 says how many shards there are, as ``campaign load`` leaves it.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import redis
import redis.asyncio as aioredis
from test_ledger import BASE_MS, make_campaign
from test_restore import run_restore

from engine import campaign as cmp
from engine import codes, shards
from engine.ledger import archiver, restore
from engine.ledger.db import EventRow, Ledger, event_id_key, ledger_event_id
from engine.store import keys, streams

ROOT = Path(__file__).resolve().parent.parent
S = 3


class ShardedWorld:
    """A campaign loaded with S stock shards, and events in each shard's stream."""

    def __init__(self, url: str, n_shards: int = S) -> None:
        self.r = redis.Redis.from_url(url, decode_responses=True)
        self.c = make_campaign()
        self.k = keys.Keys(self.c.id)
        self.n = n_shards
        self.r.set(keys.ACTIVE, self.c.id)
        self.r.hset(self.k.campaign, mapping={"doc": cmp.to_json(self.c).decode(),
                                              "quota": self.c.member_campaign_quota,
                                              "shards": n_shards})
        # shard -> ledger ids expected from it, in stream order
        self.expected: dict[int, list[str]] = {s: [] for s in range(n_shards)}

    def stream(self, shard: int) -> str:
        return self.k.of_shard(shard).events

    def _code(self, shard: int) -> str:
        while True:
            code = codes.new_code()
            if shards.code_shard(code, self.n) == shard:
                return code

    def xadd(self, shard: int, fields: dict[str, object], entry_id: str = "*") -> str:
        eid = self.r.xadd(self.stream(shard), fields, id=entry_id)
        self.expected[shard].append(ledger_event_id(shard, eid))
        return eid

    def coupon_life(self, shard: int, member: str, i: int) -> None:
        """A grant in ``shard``, redeemed when i is even, voided when i % 3 == 1."""
        code = self._code(shard)
        base = {"code": code, "round": "R1", "venue": "V01", "member": member}
        self.xadd(shard, {**base, "type": "grant", "at": BASE_MS + i, "idem": ""})
        if i % 2 == 0:
            self.xadd(shard, {**base, "type": "redeem", "at": BASE_MS + 60_000 + i})
        elif i % 3 == 1:
            self.xadd(shard, {**base, "type": "void", "at": BASE_MS + 30_000 + i,
                              "restocked": 1})

    def seed(self, per_shard: dict[int, int], tag: str = "m") -> None:
        for shard, n in per_shard.items():
            for i in range(n):
                self.coupon_life(shard, f"{tag}{shard}-{i}", i)

    def all_expected(self) -> list[str]:
        return [eid for ids in self.expected.values() for eid in ids]

    def close(self) -> None:
        self.r.close()


@pytest.fixture
def world(redis_url: str) -> Iterator[ShardedWorld]:
    w = ShardedWorld(redis_url)
    yield w
    w.close()


def _cursors(led: Ledger, w: ShardedWorld) -> list[str | None]:
    """The ledger's cursor per shard; None for a shard nothing was committed of."""
    return [led.cursor(w.c.id, s) for s in range(w.n)]


async def _lengths(aredis: aioredis.Redis, w: ShardedWorld) -> list[int]:
    return [int(await aredis.xlen(w.stream(s))) for s in range(w.n)]


async def test_every_shard_is_archived_exactly_once(world: ShardedWorld, aredis: aioredis.Redis,
                                                    tmp_path: Path) -> None:
    world.seed({0: 20, 1: 30, 2: 40})
    expected = world.all_expected()
    assert any(eid.startswith("1/") for eid in expected)
    with Ledger(tmp_path / "l.sqlite3") as led:
        assert await archiver.archive_once(aredis, led, batch=16) == len(expected)
        got = led.event_ids(world.c.id)
        assert len(got) == len(set(got)) == len(expected)
        assert set(got) == set(expected)
        assert await archiver.archive_once(aredis, led, batch=16) == 0
        assert led.event_count() == len(expected)
        # Coupons of every shard are derived, not only shard 0's.
        led.derive_coupons()
        n_coupons = led.db.execute("SELECT count(*) FROM coupons").fetchone()[0]
        assert n_coupons == 20 + 30 + 40
        assert led.shard_count(world.c.id) == S
        last = [world.expected[s][-1].rpartition("/")[2] for s in range(S)]
        assert _cursors(led, world) == last
    assert await _lengths(aredis, world) == [0, 0, 0]
    assert [await aredis.get(world.k.of_shard(s).archived) for s in range(S)] == last


async def test_identical_stream_ids_in_two_shards_both_land(
        world: ShardedWorld, aredis: aioredis.Redis, tmp_path: Path) -> None:
    for shard in range(S):
        world.coupon_life(shard, f"m{shard}", 0)  # grant + redeem, ids forced equal below
    for shard in range(S):
        code = world._code(shard)
        base = {"code": code, "round": "R1", "venue": "V02", "member": f"x{shard}"}
        world.xadd(shard, {**base, "type": "grant", "at": BASE_MS, "idem": ""},
                   entry_id="99999999999999-0")
    with Ledger(tmp_path / "l.sqlite3") as led:
        assert await archiver.archive_once(aredis, led) == 3 * S
        got = set(led.event_ids())
        assert {"99999999999999-0", "1/99999999999999-0", "2/99999999999999-0"} <= got
        assert got == set(world.all_expected())
        led.derive_coupons()
        venues = led.db.execute(
            "SELECT count(*) FROM coupons WHERE venue_id = 'V02'").fetchone()[0]
        assert venues == S


@pytest.mark.parametrize("crash,archived_before", [("after_read:2", 10),
                                                   ("after_commit:2", 35)])
async def test_crash_mid_shard_then_rerun_duplicates_nothing(
        world: ShardedWorld, aredis: aioredis.Redis, redis_url: str, tmp_path: Path,
        crash: str, archived_before: int) -> None:
    # Shard 0: 5 coupons = 10 events (i even: grant+redeem, i=1: grant+void, i=3: grant)
    # -> batch 1. Shard 1 fills batch 2, the one the archiver dies on.
    world.seed({0: 6, 1: 40, 2: 30})
    assert len(world.expected[0]) == 10
    script = ("import asyncio, sys, redis.asyncio as r\n"
              "from engine.ledger import archiver\nfrom engine.ledger import Ledger\n"
              "async def main():\n"
              "    c = r.Redis.from_url(sys.argv[1], decode_responses=True)\n"
              "    await archiver.archive_once(c, Ledger(sys.argv[2]), batch=25,"
              f" crash_point={crash!r})\n"
              "asyncio.run(main())\n")
    path = tmp_path / "l.sqlite3"
    p = subprocess.run([sys.executable, "-c", script, redis_url, str(path)], cwd=ROOT,
                       env={**os.environ, "PYTHONPATH": str(ROOT)}, timeout=60)
    assert p.returncode == -signal.SIGKILL
    lengths = [len(world.expected[s]) for s in range(S)]
    with Ledger(path) as led:
        assert led.event_count() == archived_before
        # Shard 0 done and trimmed; shard 1's batch committed (cursor moved) or not, and
        # in Redis either way (the trim comes after the commit); shard 2 not reached.
        shard1 = world.expected[1][24].rpartition("/")[2] if archived_before == 35 else None
        assert _cursors(led, world) == [world.expected[0][-1], shard1, None]
    assert await _lengths(aredis, world) == [0, lengths[1], lengths[2]]
    # Events keep arriving in every shard while the archiver is down.
    world.seed({0: 3, 1: 3, 2: 3}, tag="late")
    expected = world.all_expected()
    with Ledger(path) as led:
        assert await archiver.archive_once(aredis, led) == len(expected) - archived_before
        got = led.event_ids()
        assert len(got) == len(set(got)) == len(expected)
        assert set(got) == set(expected)
    assert await _lengths(aredis, world) == [0, 0, 0]
    assert await streams.lag(aredis, world.c.id) == 0


async def test_lag_sums_over_shards_and_reaches_zero(
        world: ShardedWorld, aredis: aioredis.Redis, tmp_path: Path) -> None:
    world.seed({0: 2, 1: 3, 2: 4})
    n = [len(world.expected[s]) for s in range(S)]
    # Never archived: everything in the streams is lag.
    assert await streams.lag(aredis, world.c.id) == sum(n)
    with Ledger(tmp_path / "l.sqlite3") as led:
        await archiver.archive_once(aredis, led)
        assert await streams.lag(aredis, world.c.id) == 0
        world.seed({1: 1, 2: 3}, tag="more")
        added = len(world.all_expected()) - sum(n)
        assert await streams.lag(aredis, world.c.id) == added
        await archiver.archive_once(aredis, led)
        assert await streams.lag(aredis, world.c.id) == 0
        assert led.event_count() == len(world.all_expected())


async def test_trimming_is_per_shard(world: ShardedWorld, aredis: aioredis.Redis,
                                     tmp_path: Path) -> None:
    world.seed({0: 2, 1: 2, 2: 2})
    with Ledger(tmp_path / "l.sqlite3") as led:
        await archiver.archive_once(aredis, led, trim=False)
        before = await _lengths(aredis, world)
        assert all(before)
        world.seed({0: 3, 1: 0, 2: 1}, tag="new")
        new = [len(world.expected[s]) - before[s] for s in range(S)]
        removed = await archiver.trim_campaign(aredis, led, world.c.id)
        # Each shard loses what its own cursor covers, and keeps what came after.
        assert await _lengths(aredis, world) == new
        assert removed == sum(before)
        assert await archiver.trim_campaign(aredis, led, world.c.id) == 0


class NodeDown:
    """A client whose calls on one stream fail as if that cluster node were down."""

    def __init__(self, client: aioredis.Redis, stream: str) -> None:
        self.client, self.stream = client, stream

    def __getattr__(self, name: str) -> Any:
        call = getattr(self.client, name)

        async def maybe_down(*args: Any, **kw: Any) -> Any:
            named = [*args, *kw.values()]
            if self.stream in named or any(isinstance(a, dict) and self.stream in a
                                           for a in named):
                raise redis.ConnectionError(f"node of {self.stream} is down")
            return await call(*args, **kw)
        return maybe_down


async def test_one_unreachable_shard_does_not_hold_back_the_others(
        world: ShardedWorld, aredis: aioredis.Redis, tmp_path: Path) -> None:
    world.seed({0: 3, 1: 3, 2: 3})
    down = NodeDown(aredis, world.stream(1))
    with Ledger(tmp_path / "l.sqlite3") as led:
        with pytest.raises(redis.ConnectionError, match="is down"):
            await archiver.archive_once(down, led)  # type: ignore[arg-type]
        assert set(led.event_ids()) == set(world.expected[0] + world.expected[2])
        assert await archiver.archive_once(aredis, led) == len(world.expected[1])
        assert set(led.event_ids()) == set(world.all_expected())


def test_ledger_ids_name_the_shard_and_sort_by_stream_order(tmp_path: Path) -> None:
    assert ledger_event_id(0, "5-1") == "5-1"
    assert ledger_event_id(2, "5-1") == "2/5-1"
    ids = ["1000-0", "1/999-5", "2/1000-0", "1/1000-0", "10/1000-0", "999-6"]
    assert sorted(ids, key=event_id_key) == [
        "1/999-5", "999-6", "1000-0", "1/1000-0", "2/1000-0", "10/1000-0"]
    base = {"round": "R1", "venue": "V01", "member": "m", "at": "5", "type": "grant"}
    with Ledger(tmp_path / "l.sqlite3") as led:
        led.insert_events("u", [(eid, {**base, "code": f"{i:017d}"})
                                for i, eid in enumerate(ids)])
        assert [r.event_id for r in led.events_of("u")] == sorted(ids, key=event_id_key)
        assert led.event_shards("u") == 11
        assert led.event_shards("other") == 1


# -- restore: which shard count, and events that cannot be from their shard ----------------


def test_build_refuses_events_that_cannot_be_from_their_shard() -> None:
    c = make_campaign()
    member = "m"
    code = next(x for x in (codes.new_code() for _ in range(1000))
                if shards.code_shard(x, 3) == shards.member_shard(member, 3))
    shard = shards.member_shard(member, 3)
    grant = EventRow(ledger_event_id(shard, "1000-0"), "grant", code, "R1", "V01", member,
                     BASE_MS, None, "")
    assert restore.build(c, [grant], BASE_MS, 86_400, shards=3).report.coupons == 1
    # More shards in the ledger than restored.
    far = EventRow("3/1000-0", "grant", code, "R1", "V01", member, BASE_MS, None, "")
    with pytest.raises(restore.RestoreError, match="from stock shard 3, restoring 3"):
        restore.build(c, [far], BASE_MS, 86_400, shards=3)
    # An event in a shard its member and code do not belong to.
    wrong = EventRow(ledger_event_id((shard + 1) % 3, "1000-0"), "grant", code, "R1", "V01",
                     member, BASE_MS, None, "")
    with pytest.raises(restore.RestoreError, match="its code and member belong to shards"):
        restore.build(c, [wrong], BASE_MS, 86_400, shards=3)


def test_resolve_shards_takes_the_count_every_source_agrees_on() -> None:
    r = restore.resolve_shards
    assert r("c", {"the ledger": 1, "Redis": 1}, 1, None) == 1
    assert r("c", {"the ledger": 3, "Redis": 1}, 1, None) == 3     # Redis lost it
    assert r("c", {"the ledger": 1, "Redis": 3}, 3, None) == 3     # ledger predates the record
    assert r("c", {"the ledger": 1, "Redis": 1}, 2, 4) == 4        # the operator says
    with pytest.raises(restore.RestoreError, match="disagree.*3 per the ledger.*2 per --shards"):
        r("c", {"the ledger": 3, "Redis": 1}, 1, 2)
    with pytest.raises(restore.RestoreError, match="disagree"):
        r("c", {"the ledger": 2, "Redis": 3}, 1, None)
    with pytest.raises(restore.RestoreError, match="events of stock shard 2.*pass --shards"):
        r("c", {"the ledger": 1, "Redis": 1}, 3, None)


def _ledger_with_hint(data_dir: Path, how: str) -> None:
    """A ledger holding one shard-0 grant of a campaign, plus one hint of 3 shards."""
    c = make_campaign()
    base = {"code": "A" * 17, "round": "R1", "venue": "V01", "member": "m",
            "at": str(BASE_MS), "type": "grant", "idem": ""}
    with Ledger(data_dir / "ledger.sqlite3") as led:
        led.save_campaign(c)
        led.insert_events(c.id, [("1000-0", base)])
        if how == "ledger":
            led.save_shard_count(c.id, 3)
        elif how == "event ids":
            led.insert_events(c.id, [("2/1000-0", {**base, "code": "B" * 17})])


# A dry run reads no Redis, so Redis's count is checked by a real run only.
@pytest.mark.parametrize("how,extra,why", [
    ("ledger", ["--shards", "2"], "disagree"),
    ("ledger", ["--shards", "2", "--dry-run"], "disagree"),
    ("event ids", [], "pass --shards"),
    ("event ids", ["--dry-run"], "pass --shards"),
    ("Redis", ["--shards", "2"], "disagree"),
    ("ledger", [], "belong to shards")])   # 3 shards agreed, but A... is not shard 0's
async def test_restore_refuses_what_it_cannot_rebuild_and_writes_nothing(
        redis_url: str, aredis: aioredis.Redis, tmp_path: Path, how: str,
        extra: list[str], why: str) -> None:
    data = tmp_path / "var"
    data.mkdir()
    _ledger_with_hint(data, how)
    if how == "Redis":
        await aredis.hset(keys.Keys(make_campaign().id).campaign, "shards", 3)
    before = sorted(await aredis.keys("*"))
    p = run_restore(redis_url, data, *extra)
    assert p.returncode == 2, p.stdout + p.stderr
    assert why in p.stderr, p.stderr
    assert sorted(await aredis.keys("*")) == before


def test_restore_rejects_a_bad_shard_count(redis_url: str, tmp_path: Path) -> None:
    data = tmp_path / "var"
    data.mkdir()
    _ledger_with_hint(data, "none")
    p = run_restore(redis_url, data, "--shards", "0")
    assert p.returncode == 2 and "--shards must be 1.." in p.stderr, p.stderr
    p = run_restore(redis_url, data, "--shards", "1", "--dry-run")
    assert p.returncode == 0, p.stderr

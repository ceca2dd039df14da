"""The archiver moves the event stream into the ledger exactly once, crashes included."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
import redis
import redis.asyncio as aioredis
from conftest import campaign_toml

from engine import campaign as cmp
from engine import codes
from engine.campaign import Campaign
from engine.ledger import Ledger, LedgerError, archiver
from engine.ledger import db as ledger_db
from engine.store import keys, streams

ROOT = Path(__file__).resolve().parent.parent
BASE_MS = int(datetime(2024, 12, 20, 10, 0, tzinfo=UTC).timestamp() * 1000)


def make_campaign(venues: tuple[str, ...] = ("V01", "V02", "V03"), stock: int = 5000) -> Campaign:
    opens = datetime(2024, 12, 20, 2, 0, tzinfo=UTC)
    rounds = [{"id": "R1", "opens": opens, "closes": opens + timedelta(hours=12),
               "stock": {v: stock for v in venues}},
              {"id": "R2", "opens": opens + timedelta(days=1),
               "closes": opens + timedelta(days=1, hours=12), "stock": {v: stock for v in venues}}]
    return cmp.parse_campaign(campaign_toml(venues=venues, rounds=rounds))


class World:
    """Writes Redis state the way the Lua scripts do: XADD * on the event stream
    with the same fields, and the same stats counters."""

    def __init__(self, url: str, campaign: Campaign) -> None:
        self.r = redis.Redis.from_url(url, decode_responses=True)
        self.c = campaign
        self.k = keys.Keys(campaign.id)
        self.coupons: dict[str, dict[str, str]] = {}
        self.r.set(keys.ACTIVE, campaign.id)
        self.r.hset(self.k.campaign, mapping={"doc": cmp.to_json(campaign).decode(),
                                              "quota": campaign.member_campaign_quota})
        for rnd in campaign.rounds:
            for vid, n in rnd.stock.items():
                self.r.hset(self.k.stats, f"initial:{rnd.id}:{vid}", n)
        self.pipe = self.r.pipeline(transaction=False)

    def _event(self, etype: str, code: str, at: int, **extra: object) -> None:
        c = self.coupons[code]
        self.pipe.xadd(self.k.events, {"type": etype, "code": code, "round": c["round"],
                                       "venue": c["venue"], "member": c["member"], "at": at,
                                       **extra})
        field = {"grant": "issued", "redeem": "redeemed", "void": "void"}[etype]
        self.pipe.hincrby(self.k.stats, f"{field}:{c['round']}:{c['venue']}", 1)

    def grant(self, venue: str, member: str, round_id: str = "R1", at: int = BASE_MS) -> str:
        code = codes.new_code()
        self.coupons[code] = {"round": round_id, "venue": venue, "member": member}
        self._event("grant", code, at)
        return code

    def redeem(self, code: str, at: int) -> None:
        self._event("redeem", code, at)

    def void(self, code: str, at: int, restocked: int = 1) -> None:
        self._event("void", code, at, restocked=restocked)
        rv = f"{self.coupons[code]['round']}:{self.coupons[code]['venue']}"
        returned = "returned_open" if restocked else "returned_closed"
        self.pipe.hincrby(self.k.stats, f"{returned}:{rv}", 1)

    def flush(self) -> None:
        self.pipe.execute()

    def stream_ids(self) -> list[str]:
        return [eid for eid, _ in self.r.xrange(self.k.events)]

    def close(self) -> None:
        self.r.close()


def seed(world: World, n_coupons: int, venues: tuple[str, ...] = ("V01", "V02")) -> None:
    """Grants, with every third redeemed and every seventh voided."""
    for i in range(n_coupons):
        code = world.grant(venues[i % len(venues)], f"m{i}", "R1" if i % 2 else "R2",
                           BASE_MS + i)
        if i % 3 == 0:
            world.redeem(code, BASE_MS + 3_600_000 + i)
        elif i % 7 == 0:
            world.void(code, BASE_MS + 60_000 + i, restocked=i % 2)
    world.flush()


@pytest.fixture
def world(redis_url: str):
    w = World(redis_url, make_campaign())
    yield w
    w.close()


async def test_archive_once_moves_everything_once(world: World, aredis: aioredis.Redis,
                                                  tmp_path: Path) -> None:
    seed(world, 300)
    ids = world.stream_ids()
    with Ledger(tmp_path / "ledger.sqlite3") as led:
        assert await archiver.archive_once(aredis, led, batch=64) == len(ids)
        assert sorted(led.event_ids()) == sorted(ids)
        assert await archiver.archive_once(aredis, led) == 0
        assert await streams.lag(aredis, world.c.id) == 0
        # Archived and acknowledged entries are trimmed away.
        assert await aredis.xlen(world.k.events) == 0
        led.derive_coupons()
        statuses = dict(led.db.execute("SELECT status, count(*) FROM coupons GROUP BY status"))
        assert statuses["redeemed"] == 100
        assert sum(statuses.values()) == 300
        assert led.campaign() == world.c


def _ev(i: int, etype: str, code: str, **extra: str) -> tuple[str, dict[str, str]]:
    f = {"type": etype, "code": code * 17, "round": "R1", "venue": "V01", "member": code,
         "at": str(100 + i), **extra}
    return f"{i}-0", f


# A mixed batch, one partly delivered again, and one with an operator's reverse in it.
_FIRST = [_ev(1, "grant", "A", idem=""), _ev(2, "grant", "B", idem="k"), _ev(3, "redeem", "A"),
          _ev(4, "void", "B", restocked="1"), _ev(5, "grant", "C", idem=""),
          _ev(6, "void", "A", restocked="0")]
_AGAIN = _FIRST[4:] + [_ev(7, "redeem", "C"), _ev(8, "grant", "D", idem="")]
_AUDIT = [_ev(9, "reverse", "C", actor="op", reason="r"), _ev(10, "grant", "E", idem=""),
          _ev(11, "redeem", "E"), _ev(12, "pause", "", actor="op", reason="p")]


def _reference(batches: list[list[tuple[str, dict[str, str]]]]) -> dict[str, tuple]:
    """The coupons table the contract's rules give, applying each new event in order."""
    seen: set[str] = set()
    out: dict[str, list] = {}
    for batch in batches:
        for eid, f in batch:
            if eid in seen or f["type"] not in ("grant", "redeem", "void", "reverse"):
                continue
            seen.add(eid)
            row = out.setdefault(f["code"], [f["round"], f["venue"], f["member"], None,
                                             None, None, None, None])
            at = int(f["at"])
            if f["type"] == "grant":
                row[3] = row[3] or "issued"
                row[4] = at
            elif f["type"] == "redeem":
                row[3], row[5] = "redeemed", at
            elif f["type"] == "void":
                row[3], row[6] = ("redeemed" if row[3] == "redeemed" else "void"), at
            else:
                if row[3] == "redeemed":
                    row[3], row[5] = "issued", None
                row[3] = row[3] or "issued"
                row[7] = at
    return {code: tuple(r) for code, r in out.items()}


def _coupons(led: Ledger) -> dict[str, tuple]:
    return {r[0]: tuple(r[1:]) for r in led.db.execute(
        "SELECT code, round_id, venue_id, member_id, status, issued_at_ms, redeemed_at_ms,"
        " voided_at_ms, reversed_at_ms FROM coupons")}


@pytest.mark.parametrize("chunk", [50_000, 2])
def test_coupons_derived_from_appended_events(tmp_path: Path, monkeypatch, chunk: int) -> None:
    """The archiver only appends events; coupons is derived from them when read, each
    event applied once and in order (a derivation in chunks of 2 too), and a batch
    delivered again changes nothing."""
    monkeypatch.setattr(ledger_db, "DERIVE_CHUNK", chunk)
    with Ledger(tmp_path / "a.sqlite3") as led:
        assert [led.insert_events("c", b) for b in (_FIRST, _AGAIN, _AUDIT)] == [6, 2, 4]
        assert led.event_count() == 11 and led.audit_count() == 2
        assert _coupons(led) == {}, "the archiver wrote coupons rows"
        assert led.coupons_behind() == 11
        # A reader derives first: coupons_by_code here.
        got = led.coupons_by_code(["A" * 17, "Z" * 17])
        assert got["A" * 17].status == "redeemed" and "Z" * 17 not in got
        assert led.coupons_behind() == 0
        assert _coupons(led) == _reference([_FIRST, _AGAIN, _AUDIT])
        assert led.derive_coupons() == 0
        # Events archived after a derivation are applied next time, the earlier not again.
        more = [_ev(13, "redeem", "D"), _ev(14, "void", "C", restocked="0"),
                _ev(15, "reverse", "D", actor="op", reason="r")]
        assert led.insert_events("c", more + _FIRST) == 3
        assert led.derive_coupons() == 3
        assert _coupons(led) == _reference([_FIRST, _AGAIN, _AUDIT, more])


def test_derivation_lets_an_archiver_commit_between_its_chunks(tmp_path: Path,
                                                              monkeypatch) -> None:
    """Outside a transaction each chunk commits on its own: an archiver that cannot wait
    for the lock (busy timeout 0) still commits between chunks, and what it archived
    meanwhile is derived before the derivation returns."""
    monkeypatch.setattr(ledger_db, "DERIVE_CHUNK", 2)
    path = tmp_path / "l.sqlite3"
    with Ledger(path) as led, Ledger(path) as archiving:
        archiving.db.execute("PRAGMA busy_timeout=0")
        led.insert_events("c", _FIRST)
        late = iter([[_ev(40 + i, "grant", f"{chr(71 + i)}", idem="")] for i in range(3)])
        commit, landed = led.commit, []

        def commit_then_archive() -> None:
            commit()
            batch = next(late, None)
            if batch is not None:
                landed.append(archiving.insert_events("c", batch))
        monkeypatch.setattr(led, "commit", commit_then_archive)
        assert led.derive_coupons() == 6 + 3
        assert landed == [1, 1, 1]
        assert led.coupons_behind() == 0
        assert {"G" * 17, "H" * 17, "I" * 17} <= set(_coupons(led))


def test_a_ledger_from_before_v6_is_not_derived_again(tmp_path: Path) -> None:
    """A v5 ledger kept coupons in step with its events: opened by this version, its
    events count as applied (a second application would move e.g. issued_at)."""
    path = tmp_path / "v5.sqlite3"
    with Ledger(path) as led:
        led.insert_events("c", _FIRST)
        led.derive_coupons()
        led.db.execute("DELETE FROM meta WHERE key = 'coupons_through'")  # as v5 wrote it
        led.db.execute("UPDATE coupons SET issued_at_ms = 7")  # marks what v5 derived
    with Ledger(path) as led:
        assert led.coupons_behind() == 0
        led.insert_events("c", [_ev(20, "redeem", "C")])
        assert led.derive_coupons() == 1
        rows = _coupons(led)
        assert {r[4] for r in rows.values()} == {7}
        assert rows["C" * 17][3] == "redeemed"


def test_read_snapshot_derives_what_was_archived_meanwhile(tmp_path: Path,
                                                           monkeypatch) -> None:
    """An archiver commits between the derivation and the snapshot's BEGIN: the snapshot
    is taken again, so coupons and events agree inside it."""
    path = tmp_path / "l.sqlite3"
    with Ledger(path) as led, Ledger(path) as archiving:
        led.insert_events("c", _FIRST)
        derive = Ledger.derive_coupons
        extra = iter([[_ev(30, "grant", "F", idem="")], [_ev(31, "redeem", "F")]])

        def derive_then_archive(self: Ledger) -> int:
            n = derive(self)
            batch = next(extra, None)
            if batch is not None:
                archiving.insert_events("c", batch)  # lands before the BEGIN below
            return n
        monkeypatch.setattr(Ledger, "derive_coupons", derive_then_archive)
        led.read_snapshot()
        try:
            assert led.coupons_behind() == 0
            assert led.coupons_by_code(["F" * 17])["F" * 17].status == "redeemed"
        finally:
            led.rollback()


def test_coupons_read_in_a_stale_transaction_is_refused(tmp_path: Path) -> None:
    """A reader inside a transaction that did not derive gets an error, not stale rows."""
    with Ledger(tmp_path / "l.sqlite3") as led:
        led.insert_events("c", _FIRST)
        led.db.execute("BEGIN")
        try:
            with pytest.raises(LedgerError, match="did not derive"):
                led.venue_redemptions("c", "V01")
        finally:
            led.rollback()


def test_events_code_index_is_dropped_on_open(tmp_path: Path) -> None:
    """v4: a ledger written by an older version loses its (unused) events_code index."""
    path = tmp_path / "old.sqlite3"
    with Ledger(path) as led:
        led.db.execute("CREATE INDEX events_code ON events (code)")
    with Ledger(path) as led:
        names = {r[0] for r in led.db.execute("SELECT name FROM sqlite_master"
                                              " WHERE type = 'index'")}
        assert "events_code" not in names
        assert "events_venue_type" in names


def test_redelivery_is_harmless(tmp_path: Path) -> None:
    entries = [("1-0", {"type": "grant", "code": "A" * 17, "round": "R1", "venue": "V01",
                        "member": "m", "at": "5"}),
               ("2-0", {"type": "redeem", "code": "A" * 17, "round": "R1", "venue": "V01",
                        "member": "m", "at": "9"})]
    with Ledger(tmp_path / "l.sqlite3") as led:
        assert led.insert_events("c", entries) == 2
        assert led.insert_events("c", entries) == 0
        assert led.insert_events("c", entries[:1]) == 0
        led.derive_coupons()
        row = led.db.execute("SELECT status, issued_at_ms, redeemed_at_ms FROM coupons").fetchall()
        assert row == [("redeemed", 5, 9)]
        assert led.event_count() == 2


def _run_cli_archive(url: str, data_dir: Path, crash: str | None) -> int:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    env.pop("COUPON_ARCHIVER_CRASH_POINT", None)
    if crash:
        env["COUPON_ARCHIVER_CRASH_POINT"] = crash
    p = subprocess.run([sys.executable, "-m", "engine.ledger.cli", "archive", "--redis-url", url,
                        "--data-dir", str(data_dir)], env=env, cwd=ROOT, capture_output=True,
                       timeout=60)
    return p.returncode


B = archiver.BATCH


@pytest.mark.parametrize("crash,archived_before", [("after_read:2", B),
                                                   ("after_commit:2", 2 * B)])
async def test_sigkill_mid_archive_loses_and_duplicates_nothing(
        world: World, aredis: aioredis.Redis, redis_url: str, tmp_path: Path, crash: str,
        archived_before: int) -> None:
    n_coupons = 9 * B // 5  # with redeems and voids: more than two batches of entries
    seed(world, n_coupons)
    ids = world.stream_ids()
    assert len(ids) > 2 * B
    rc = _run_cli_archive(redis_url, tmp_path, crash)
    assert rc == -signal.SIGKILL
    with Ledger(tmp_path / "ledger.sqlite3") as led:
        assert led.event_count() == archived_before
        # The cursor moved with the last commit, and only that batch left Redis.
        assert led.cursor(world.c.id, 0) == ids[archived_before - 1]
        assert await aredis.xlen(world.k.events) == len(ids) - B
        # Trimming now must keep everything after the cursor.
        await archiver.trim_archived(aredis, led, world.c.id, 0)
        assert await aredis.xlen(world.k.events) == len(ids) - archived_before
    # Events keep arriving while the archiver is down.
    for i in range(10):
        world.grant("V01", f"late{i}")
    world.flush()
    ids = ids + world.stream_ids()[-10:]
    assert _run_cli_archive(redis_url, tmp_path, None) == 0
    with Ledger(tmp_path / "ledger.sqlite3") as led:
        got = led.event_ids()
        assert len(got) == len(set(got)) == len(ids)
        assert set(got) == set(ids)
        led.derive_coupons()
        grants = led.db.execute("SELECT count(*) FROM coupons").fetchone()[0]
        assert grants == n_coupons + 10
        assert led.cursor(world.c.id, 0) == ids[-1]
    assert await aredis.xlen(world.k.events) == 0
    assert await streams.lag(aredis, world.c.id) == 0
    assert await aredis.get(world.k.archived) == ids[-1]


def _archive_in_child(url: str, path: Path, crash: str, batch: int) -> int:
    script = ("import asyncio, sys, redis.asyncio as r\n"
              "from engine.ledger import archiver\nfrom engine.ledger import Ledger\n"
              "async def main():\n"
              "    c = r.Redis.from_url(sys.argv[1], decode_responses=True)\n"
              f"    await archiver.archive_once(c, Ledger(sys.argv[2]), batch={batch},"
              f" crash_point={crash!r})\n"
              "asyncio.run(main())\n")
    p = subprocess.run([sys.executable, "-c", script, url, str(path)], cwd=ROOT,
                       env={**os.environ, "PYTHONPATH": str(ROOT)}, timeout=60)
    return p.returncode


async def test_a_batch_committed_but_not_trimmed_is_trimmed_by_the_next_pass(
        world: World, aredis: aioredis.Redis, redis_url: str, tmp_path: Path) -> None:
    """A crash between a commit and its XTRIM leaves that batch in Redis, behind the
    cursor: the next pass must drop it even when nothing new arrived, or the lag
    (the streams' length) would stay up and the entries would never leave Redis."""
    seed(world, 40)
    ids = world.stream_ids()
    last = (len(ids) - 1) // 20 + 1  # the batch with the stream's last entries
    path = tmp_path / "l.sqlite3"
    assert _archive_in_child(redis_url, path, f"after_commit:{last}", 20) == -signal.SIGKILL
    assert await streams.lag(aredis, world.c.id) == len(ids) - 20 * (last - 1)
    with Ledger(path) as led:
        assert led.event_count() == len(ids)
        assert await archiver.archive_once(aredis, led, batch=20) == 0
        assert sorted(led.event_ids()) == sorted(ids)
    assert await aredis.xlen(world.k.events) == 0
    assert await streams.lag(aredis, world.c.id) == 0


async def test_upgrade_from_the_consumer_group_archives_everything_once(
        world: World, aredis: aioredis.Redis, tmp_path: Path) -> None:
    """A deployment archived by the version that read through the consumer group
    'ledger': a dead consumer left a batch pending, and another archiver committed and
    acknowledged entries after it. The ledger has no cursor yet; the new archiver must
    take the pending batch too (it is below the ledger's last event), nothing twice."""
    seed(world, 60)
    ids = world.stream_ids()
    s, group = world.k.events, streams.LEGACY_GROUP
    await aredis.xgroup_create(s, group, id="0")
    with Ledger(tmp_path / "l.sqlite3") as led:
        led.save_campaign(world.c)

        async def old_archiver_reads(consumer: str, n: int, commit: bool) -> None:
            got = (await aredis.xreadgroup(group, consumer, {s: ">"}, count=n))[0][1]
            if commit:
                led.insert_events(world.c.id, got)
                await aredis.xack(s, group, *[eid for eid, _ in got])

        await old_archiver_reads("ledger-archiver", 25, True)
        await old_archiver_reads("dead-one", 25, False)
        await old_archiver_reads("ledger-archiver", 20, True)
        # What the old archiver's trim left: from the oldest pending entry on.
        await aredis.xtrim(s, minid=ids[25], approximate=False)
        assert led.cursor(world.c.id, 0) is None
        assert await archiver.archive_once(aredis, led, batch=16) == len(ids) - 45
        got = led.event_ids()
        assert len(got) == len(set(got)) == len(ids)
        assert set(got) == set(ids)
        assert led.cursor(world.c.id, 0) == ids[-1]
    assert await aredis.xlen(s) == 0
    assert await aredis.xinfo_groups(s) == []  # the old group is gone
    assert await streams.lag(aredis, world.c.id) == 0


def test_the_cursor_commits_with_its_events_and_only_moves_forward(tmp_path: Path) -> None:
    def ev(eid: str, etype: str = "grant") -> tuple[str, dict[str, str]]:
        return eid, {"type": etype, "code": eid.replace("-", "x").rjust(17, "A"),
                     "round": "R1", "venue": "V01", "member": "m", "at": "5", "idem": ""}
    with Ledger(tmp_path / "l.sqlite3") as led:
        with pytest.raises(LedgerError, match="unknown type"):
            led.insert_events("c", [ev("5-0"), ev("6-0", "bogus")], cursor=(0, "6-0"))
        assert led.cursor("c", 0) is None and led.event_count() == 0
        assert led.insert_events("c", [ev("999-5"), ev("1000-0")], cursor=(0, "1000-0")) == 2
        # An archiver that read an older batch commits after: the cursor stays ('999-5'
        # sorts after '1000-0' as text, not as a stream id).
        assert led.insert_events("c", [ev("999-5")], cursor=(0, "999-5")) == 0
        assert led.cursor("c", 0) == "1000-0"
        assert led.cursor("c", 1) is None and led.cursor("other", 0) is None
        led.insert_events("c", [ev("3/1000-1")], cursor=(3, "1000-1"))
        assert (led.cursor("c", 0), led.cursor("c", 3)) == ("1000-0", "1000-1")


async def test_follow_archives_until_stopped(world: World, aredis: aioredis.Redis,
                                             redis_url: str, tmp_path: Path) -> None:
    stop = asyncio.Event()
    path = tmp_path / "ledger.sqlite3"
    task = asyncio.create_task(archiver.run_in_background(redis_url, path, stop,
                                                          interval_s=0.05))
    seed(world, 30)
    ids = world.stream_ids()
    with Ledger(path) as led:
        for _ in range(100):
            if led.event_count() == len(ids):
                break
            await asyncio.sleep(0.05)
        assert sorted(led.event_ids()) == sorted(ids)
    stop.set()
    assert await asyncio.wait_for(task, 5) == len(ids)


async def test_archive_without_campaign_is_a_noop(aredis: aioredis.Redis, tmp_path: Path) -> None:
    with Ledger(tmp_path / "l.sqlite3") as led:
        assert await archiver.archive_once(aredis, led) == 0
        assert led.campaign() is None

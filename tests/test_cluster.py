"""The engine on a real 3-primary Redis Cluster (tests/clusterkit.py).

Concurrency, idempotency, redemption, the ledger, pub/sub, the CLI and the
safety check against the cluster; the hot-path ClusterWire following MOVED and
ASK through a real slot migration; and a primary SIGKILLed mid-burst.
"""

from __future__ import annotations

import asyncio
import contextlib
import random
import time
from collections import Counter
from collections.abc import AsyncIterator, Iterator
from datetime import UTC
from pathlib import Path

import conftest
import pytest
from aiohttp.test_utils import TestClient
from clusterkit import LocalCluster
from conftest import ADMIN, SECRET, EngineTestServer, campaign_toml

from engine import campaign as cmp
from engine import cli, shards
from engine.auth import mint_member_token
from engine.config import Settings
from engine.http.app import create_app
from engine.http.handlers import ENGINE
from engine.ledger import Ledger, archiver
from engine.store import Store, check_safety, keys, load_campaign, scripts, streams
from engine.store.clusterwire import ClusterWire, CrossSlotError, slot_of
from engine.store.connection import open_client
from engine.store.wire import Address, ReplyError, framed

CID = "snow-cl"
K = keys.Keys(CID)


@pytest.fixture(scope="session")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalCluster]:
    c = LocalCluster(tmp_path_factory.mktemp("cluster"))
    try:
        c.start()
        yield c
    finally:
        c.stop()


@pytest.fixture
def cluster_url(cluster: LocalCluster) -> str:
    cluster.wait_ok()
    cluster.flush()
    return cluster.url


@pytest.fixture
async def cclient(cluster_url: str) -> AsyncIterator[object]:
    client = open_client(cluster_url, timeout=5.0)
    yield client
    await client.aclose()


def crossslot_errors(cluster: LocalCluster) -> int:
    """CROSSSLOT replies every node has sent since it started (INFO errorstats)."""
    total = 0
    for n in cluster.nodes:
        with cluster.client(n) as c:
            stats = c.info("errorstats")
        total += int(stats.get("errorstat_CROSSSLOT", {}).get("count", 0))
    return total


def redis_now(cluster: LocalCluster) -> object:
    from datetime import datetime
    with cluster.client(cluster.owner_of(K.campaign)) as c:
        sec, usec = c.time()
    return datetime.fromtimestamp(sec + usec / 1e6, tz=UTC)


def campaign_text(cluster: LocalCluster, stock: dict[str, int], quota: int = 1,
                  cid: str = CID) -> str:
    from datetime import timedelta
    now = redis_now(cluster)
    return campaign_toml(cid=cid, quota=3, venues=tuple(stock), rounds=[
        {"id": "R1", "opens": now - timedelta(minutes=5), "closes": now + timedelta(hours=1),
         "quota": quota, "stock": stock}])


def member(mid: str) -> dict[str, str]:
    return {"Authorization": "Bearer " + mint_member_token(SECRET, mid, 3600)}


@contextlib.asynccontextmanager
async def engine(cluster_url: str, tmp_path: Path, text: str,
                 **kw: object) -> AsyncIterator[tuple[TestClient, object, cmp.Campaign]]:
    """An in-process engine (one worker) on the cluster, with the campaign loaded."""
    c = cmp.parse_campaign(text)
    client = open_client(cluster_url, timeout=5.0)
    await load_campaign(client, c, int(kw.get("stock_shards", 1)))  # type: ignore[call-overload]
    settings = Settings(data_dir=tmp_path / "var", redis_url=cluster_url,
                        member_jwt_secret=SECRET, admin_token=ADMIN, member_rate=1e6,
                        member_burst=10**6, **kw)  # type: ignore[arg-type]
    http = TestClient(EngineTestServer(create_app(settings, cluster_url)))
    await http.start_server()
    try:
        yield http, client, c
    finally:
        await http.close()
        await client.aclose()


async def grab(http: TestClient, mid: str, venue: str, key: str | None = None):
    headers = member(mid)
    if key:
        headers["Idempotency-Key"] = key
    r = await http.post("/v1/rounds/R1/grab", json={"venue_id": venue}, headers=headers)
    return r.status, await r.json()


# --- stock shards spread over the primaries (docs/cluster.md) ---------------------

SHARDS = 3


def spread_campaign_id(cluster: LocalCluster) -> str:
    """A campaign id whose three stock shards are served by three different primaries."""
    for i in range(1000):
        cid = f"snow-sh{i}"
        owners = {cluster.owner_of(keys.Keys(cid, s).campaign).port for s in range(SHARDS)}
        if len(owners) == SHARDS:
            return cid
    raise AssertionError("no campaign id spreads over the three primaries")


def members_of(shard: int, n: int, prefix: str = "m") -> list[str]:
    return conftest.members_of(shard, n, SHARDS, prefix)


async def check_sharded_invariants(r: object, cid: str, initial: dict[str, int],
                                   granted: dict[str, str]) -> None:
    """Per line: the shards' stock + issued = initial; no transfer in flight; every
    granted code in its member's shard with that member; nobody over quota 1."""
    store_keys = [keys.Keys(cid, s) for s in range(SHARDS)]
    for k in store_keys:
        assert await r.hlen(k.xfer_out) == 0  # type: ignore[attr-defined]
    for vid, n in initial.items():
        line = f"R1:{vid}"
        left = [int(await r.hget(k.stock, line)) for k in store_keys]  # type: ignore[attr-defined]
        issued = [int(await r.hget(k.stats, f"issued:{line}") or 0)  # type: ignore[attr-defined]
                  for k in store_keys]
        assert min(left) >= 0 and sum(left) + sum(issued) == n, (vid, left, issued)
    for m, code in granted.items():
        k = store_keys[shards.member_shard(m, SHARDS)]
        assert shards.code_shard(code, SHARDS) == k.shard
        rec = await r.hgetall(k.coupon(code))  # type: ignore[attr-defined]
        assert rec["member"] == m and rec["status"] == "issued"
        assert int(await r.hget(k.member(m), "total")) == 1  # type: ignore[attr-defined]


# --- the engine on a cluster -------------------------------------------------------


async def test_burst_grants_exactly_the_stock_and_no_member_exceeds_quota(
        cluster: LocalCluster, cluster_url: str, tmp_path: Path) -> None:
    before = crossslot_errors(cluster)
    stock = {"V01": 40, "V02": 25}
    async with engine(cluster_url, tmp_path, campaign_text(cluster, stock)) as (http, r, _):
        members = [f"m{i}" for i in range(150)]
        # Every member asks twice for each venue: quota 1 per round.
        asks = [(m, v, f"{m}-{v}-{j}") for m in members for v in stock for j in range(2)]
        random.Random(7).shuffle(asks)
        results = await asyncio.gather(*(grab(http, m, v, key) for m, v, key in asks))
        wins = [(m, body["coupon"]) for (m, _, _), (st, body) in zip(asks, results)
                if st == 201]
        refusals = Counter(body["error"]["code"] for st, body in results if st != 201)
        assert set(refusals) <= {"sold_out", "round_quota_exceeded"}, refusals
        assert len(wins) == sum(stock.values())
        per_member = Counter(m for m, _ in wins)
        assert max(per_member.values()) == 1
        assert Counter(c["venue_id"] for _, c in wins) == Counter(stock)
        assert await r.hgetall(K.stock) == {"R1:V01": "0", "R1:V02": "0"}
        for m, c in wins:
            rec = await r.hgetall(K.coupon(c["code"].replace("-", "")))
            assert rec["member"] == m and rec["status"] == "issued"
        stats = await r.hgetall(K.stats)
        assert stats["issued:R1:V01"] == "40" and stats["issued:R1:V02"] == "25"
        # Every call went straight to the right primary.
        assert http.server.app[ENGINE].store.wire.redirects == 0
    assert crossslot_errors(cluster) == before


@pytest.mark.parametrize("n_shards", [1, 3])
async def test_idempotent_replay_redeem_once_void_and_every_route(
        cluster: LocalCluster, cluster_url: str, tmp_path: Path, n_shards: int) -> None:
    before = crossslot_errors(cluster)
    cid = CID if n_shards == 1 else spread_campaign_id(cluster)
    async with engine(cluster_url, tmp_path, campaign_text(
            cluster, {"V01": 5, "V02": 5}, quota=2, cid=cid),
            stock_shards=n_shards) as (http, r, c):
        st, first = await grab(http, "alice", "V01", "tap-1")
        assert st == 201
        st, again = await grab(http, "alice", "V01", "tap-1")
        assert st == 201 and again == first
        st, other = await grab(http, "alice", "V02", "tap-1")
        assert st == 422 and other["error"]["code"] == "idempotency_key_reused"
        code = first["coupon"]["code"]

        store = Store(r, c, Settings(), shards=n_shards)
        vkey = await store.add_venue_key("V01")
        await store.wire.close()
        venue = {"Authorization": f"Bearer {vkey}"}
        resps = await asyncio.gather(*(
            http.post("/v1/venue/redemptions", json={"code": code}, headers=venue)
            for _ in range(20)))
        statuses = Counter(x.status for x in resps)
        assert statuses == Counter({200: 1, 409: 19})
        canonical = code.replace("-", "")
        where = store.shard_keys[store.code_shard(canonical)].coupon(canonical)
        assert (await r.hget(where, "status")) == "redeemed"

        # The rest of the API, so that every Redis call the engine makes runs once.
        st, second = await grab(http, "alice", "V02", "tap-2")
        assert st == 201
        d = await http.delete(f"/v1/me/coupons/{second['coupon']['code']}",
                              headers=member("alice"))
        assert d.status == 200 and (await d.json())["coupon"]["status"] == "void"
        mine = await (await http.get("/v1/me/coupons", headers=member("alice"))).json()
        assert [x["status"] for x in mine["coupons"]] == ["void", "redeemed"]
        look = await http.get(f"/v1/venue/coupons/{code}", headers=venue)
        assert look.status == 200
        red = await (await http.get("/v1/venue/redemptions", headers=venue)).json()
        assert [x["code"] for x in red["redemptions"]] == [code]
        s = await http.get("/v1/admin/rounds/R1/stats",
                           headers={"Authorization": f"Bearer {ADMIN}"})
        assert s.status == 200
        assert (await http.get("/readyz")).status == 200
        assert (await http.get("/v1/rounds")).status == 200
        # The state poll (stock, TIME on the campaign's primary, fingerprint, stats,
        # ledger lag) runs against the cluster.
        eng = http.server.app[ENGINE]
        await eng.refresh()
        assert eng.state.remaining == {"R1:V01": 4, "R1:V02": 5}
        assert abs(eng.state.clock_offset_ms) < 5_000
        text = await (await http.get("/metrics")).text()
        assert "coupon" in text
    assert crossslot_errors(cluster) == before


async def test_ledger_drains_the_stream_and_equals_redis(
        cluster: LocalCluster, cluster_url: str, tmp_path: Path) -> None:
    async with engine(cluster_url, tmp_path, campaign_text(
            cluster, {"V01": 30, "V02": 30}, quota=1)) as (http, r, c):
        results = await asyncio.gather(*(grab(http, f"m{i}", ("V01", "V02")[i % 2], f"k{i}")
                                         for i in range(50)))
        codes_ = [b["coupon"]["code"].replace("-", "") for st, b in results if st == 201]
        assert len(codes_) == 50
        store = Store(r, c, Settings())
        for code in codes_[:10]:
            rec = await r.hgetall(K.coupon(code))
            res = await store.redeem(rec["venue"], code)
            assert res.outcome.name == "REDEEMED"
        for code in codes_[10:15]:
            rec = await r.hgetall(K.coupon(code))
            assert (await store.void(rec["member"], code)).outcome.name == "VOIDED"
        await store.wire.close()

        with Ledger(tmp_path / "ledger.sqlite3") as ledger:
            n = await archiver.archive_once(r, ledger)
            assert n == 65
            assert await archiver.archive_once(r, ledger) == 0  # each event once
            assert await streams.lag(r, CID) == 0
            rows = ledger.coupons_by_code(codes_)
            for code in codes_:
                rec = await r.hgetall(K.coupon(code))
                row = rows[code]
                assert (row.member_id, row.venue_id, row.status) == (
                    rec["member"], rec["venue"], rec["status"])
            totals = ledger.venue_totals(CID)
            stats = await r.hgetall(K.stats)
            for v in ("V01", "V02"):
                assert totals[v]["issued"] == int(stats[f"issued:R1:{v}"])
                assert totals[v]["redeemed"] == int(stats.get(f"redeemed:R1:{v}", 0))
                assert totals[v]["void"] == int(stats.get(f"void:R1:{v}", 0))
            # The CLI's archive command reaches the same cluster.
            assert await asyncio.to_thread(cli.main, [
                "archive", "--redis-url", cluster_url, "--data-dir", str(tmp_path)]) == 0


async def test_a_void_reaches_the_notify_subscriber(
        cluster: LocalCluster, cluster_url: str, cclient: object) -> None:
    c = cmp.parse_campaign(campaign_text(cluster, {"V01": 1}))
    await load_campaign(cclient, c)
    store = Store(cclient, c, Settings())
    got: asyncio.Queue[str] = asyncio.Queue()

    async def listen() -> None:
        async for msg in store.subscribe_notifications():
            if msg is not None:
                await got.put(msg)

    task = asyncio.create_task(listen())
    try:
        res = await store.grab("R1", "V01", "bob", None)
        assert res.outcome.name == "GRANTED"
        await asyncio.sleep(0.3)  # subscribed
        assert (await store.void("bob", res.code)).restocked
        assert await asyncio.wait_for(got.get(), 5) == "restock R1:V01"
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
        await store.wire.close()


def test_cli_load_check_token_and_serve_safety_on_the_cluster(
        cluster: LocalCluster, cluster_url: str, tmp_path: Path,
        capsys: pytest.CaptureFixture[str]) -> None:
    f = tmp_path / "c.toml"
    f.write_text(campaign_text(cluster, {"V01": 3}), encoding="utf-8")
    assert cli.main(["campaign", "check", str(f)]) == 0
    assert cli.main(["campaign", "load", str(f), "--redis-url", cluster_url]) == 0
    # The --redis-cluster flag with a plain URL means the same.
    seed = cluster.seed_url
    assert cli.main(["campaign", "load", str(f), "--redis-url", seed, "--redis-cluster"]) == 0
    assert "unchanged" in capsys.readouterr().out
    other = tmp_path / "other.toml"
    other.write_text(campaign_text(cluster, {"V01": 3}).replace(CID, "other-c"), "utf-8")
    assert cli.main(["campaign", "load", str(other), "--redis-url", cluster_url]) == 2
    assert "holds campaign" in capsys.readouterr().err
    assert cli.main(["token", "venue", "V01", "--redis-url", cluster_url,
                     "--data-dir", str(tmp_path)]) == 0
    token = capsys.readouterr().out.strip()
    assert token.startswith("vk.V01.")
    with cluster.client(cluster.owner_of(K.campaign)) as rc:
        assert len(rc.hkeys(K.venue_keys("V01"))) == 1
    with cluster.client(cluster.owner_of(keys.ACTIVE)) as rc:
        assert rc.get(keys.ACTIVE) == CID

    async def safety() -> list[str]:
        client = open_client(cluster_url)
        try:
            return await check_safety(client)
        finally:
            await client.aclose()

    assert asyncio.run(safety()) == []
    weak = cluster.nodes[2]
    with cluster.client(weak) as rc:
        rc.config_set("appendfsync", "everysec")
    try:
        problems = asyncio.run(safety())
        assert problems == [f"127.0.0.1:{weak.port}: appendfsync is 'everysec', the engine"
                            " needs 'always'"]
    finally:
        with cluster.client(weak) as rc:
            rc.config_set("appendfsync", "always")


def test_serve_with_redis_cluster_needs_a_url(tmp_path: Path,
                                              capsys: pytest.CaptureFixture[str]) -> None:
    assert cli.main(["serve", "--redis-cluster", "--data-dir", str(tmp_path)]) == 2
    assert "--redis-cluster needs --redis-url" in capsys.readouterr().err
    f = tmp_path / "c.toml"
    from datetime import datetime, timedelta
    opens = datetime(2030, 1, 1, tzinfo=UTC)
    f.write_text(campaign_toml(cid=CID, rounds=[
        {"id": "R1", "opens": opens, "closes": opens + timedelta(hours=1),
         "stock": {"V01": 1}}]), encoding="utf-8")
    assert cli.main(["campaign", "load", str(f), "--redis-cluster", "--data-dir",
                     str(tmp_path)]) == 2
    assert "--redis-cluster needs --redis-url" in capsys.readouterr().err
    assert cli.main(["archive", "--redis-cluster", "--data-dir", str(tmp_path)]) == 1
    assert "--redis-cluster needs --redis-url" in capsys.readouterr().err
    assert not (tmp_path / "redis").exists()  # no embedded Redis was started


# --- ClusterWire: routing, redirections, CROSSSLOT ---------------------------------


def test_slot_of_matches_the_server(cluster: LocalCluster) -> None:
    ks = [K.campaign, K.coupon("0123456789ABCDEFG"), keys.ACTIVE, "plain-key", "{}", "a{}b{c}",
          "{x", "x}{y}", "ü{tag}", keys.Keys("other").events]
    with cluster.client(cluster.nodes[0]) as c:
        for k in ks:
            want = c.execute_command("CLUSTER", "KEYSLOT", k)
            assert slot_of(k) == want, k
            assert slot_of(framed(k)) == want, k
            assert slot_of(k.encode()) == want, k


def _wire(cluster: LocalCluster) -> ClusterWire:
    return ClusterWire([Address(port=cluster.nodes[0].port)], scripts.all_scripts(),
                       timeout=2.0)


async def test_wire_follows_moved_when_its_map_is_wrong(
        cluster: LocalCluster, cluster_url: str, cclient: object) -> None:
    key = K.idempotency("m", "x")
    await cclient.set(key, "1")
    w = _wire(cluster)
    try:
        assert await w.call("EXISTS", key) == 1
        slot = slot_of(key)
        right = w.owner(slot)
        wrong = next(n for n in cluster.nodes if n.port != right.port)
        w._slots[slot] = w._wire("127.0.0.1", wrong.port)  # a stale map
        assert await w.call("EXISTS", key) == 1
        assert w.redirects == 1
        assert w.owner(slot) == right
    finally:
        await w.close()


async def test_wire_refuses_cross_slot_calls_without_sending(cluster: LocalCluster) -> None:
    w = _wire(cluster)
    try:
        grab = scripts.load("grab")
        with pytest.raises(CrossSlotError):
            await w.evalsha(grab, [K.campaign, keys.Keys("another").stock], [])
        assert w.in_flight == 0
    finally:
        await w.close()


async def test_a_crossslot_reply_is_raised_once_never_retried(cluster: LocalCluster) -> None:
    a, b = K.campaign, keys.Keys("another").campaign
    assert slot_of(a) != slot_of(b)
    before = crossslot_errors(cluster)
    w = _wire(cluster)
    try:
        # call() routes by its first key only, so the server sees this one.
        with pytest.raises(ReplyError) as exc:
            await w.call("MGET", a, b)
        assert exc.value.prefix == "CROSSSLOT"
        assert w.redirects == 0
    finally:
        await w.close()
    assert crossslot_errors(cluster) == before + 1


def _migrate(cluster: LocalCluster, slot: int, src, dst, *, before_move=None) -> None:
    """Move one slot from src to dst the way redis-cli --cluster reshard does."""
    src_id, dst_id = cluster.node_id(src), cluster.node_id(dst)
    with cluster.client(src) as s, cluster.client(dst) as d:
        d.execute_command("CLUSTER", "SETSLOT", slot, "IMPORTING", src_id)
        s.execute_command("CLUSTER", "SETSLOT", slot, "MIGRATING", dst_id)
        if before_move is not None:
            before_move()
        while True:
            ks = s.execute_command("CLUSTER", "GETKEYSINSLOT", slot, 100)
            if not ks:
                break
            s.execute_command("MIGRATE", "127.0.0.1", dst.port, "", 0, 5000, "KEYS", *ks)
        for n in cluster.nodes:
            with cluster.client(n) as c:
                c.execute_command("CLUSTER", "SETSLOT", slot, "NODE", dst_id)
    cluster.wait_ok()


def _give_back(cluster: LocalCluster, slot: int, owner) -> None:
    """Return the slot to ``owner`` whatever state a failed test left it in."""
    for n in cluster.nodes:
        with cluster.client(n) as c:
            c.execute_command("CLUSTER", "SETSLOT", slot, "STABLE")
    holder = cluster.owner_of_slot(slot)
    if holder is not owner:
        _migrate(cluster, slot, holder, owner)
    for n in cluster.nodes:  # keys a half-done move left behind
        if n is owner:
            continue
        with cluster.client(n) as c:
            ks = c.execute_command("CLUSTER", "GETKEYSINSLOT", slot, 1000)
            if ks:
                c.execute_command("MIGRATE", "127.0.0.1", owner.port, "", 0, 5000, "KEYS",
                                  *ks)
    cluster.wait_ok()


async def test_grabs_survive_a_live_slot_migration(
        cluster: LocalCluster, cluster_url: str, tmp_path: Path) -> None:
    """The campaign's slot moves to another primary (ASK while keys move, MOVED
    after); the hot path follows and nothing is lost or doubled."""
    before = crossslot_errors(cluster)
    c = cmp.parse_campaign(campaign_text(cluster, {"V01": 50}, quota=1))
    client = open_client(cluster_url, timeout=5.0)
    await load_campaign(client, c)
    store = Store(client, c, Settings(redis_timeout=2.0))
    slot = slot_of(K.campaign)
    src = cluster.owner_of(K.campaign)
    dst = next(n for n in cluster.nodes if n is not src)
    try:
        first = [await store.grab("R1", "V01", f"a{i}", f"k{i}") for i in range(10)]
        assert {r.outcome.name for r in first} == {"GRANTED"}

        asked: list[bool] = []

        def while_migrating() -> None:
            # A key not yet on the source during the move: the source answers ASK.
            loop_result = asyncio.run_coroutine_threadsafe(
                store.wire.call("EXISTS", K.idempotency("nobody", "x")), loop)
            asked.append(loop_result.result(10) == 0)

        loop = asyncio.get_running_loop()
        await asyncio.to_thread(_migrate, cluster, slot, src, dst, before_move=while_migrating)
        assert asked == [True]
        assert store.wire.redirects >= 1  # the ASK
        redirects = store.wire.redirects

        more = [await store.grab("R1", "V01", f"b{i}", f"k{i}") for i in range(10)]
        assert {r.outcome.name for r in more} == {"GRANTED"}
        assert store.wire.redirects == redirects + 1  # one MOVED, then the map is right
        assert store.wire.owner(slot).port == dst.port
        # A replay of a grant made before the move finds it on the new primary.
        again = await store.grab("R1", "V01", "a0", "k0")
        assert again.outcome.name == "REPLAYED" and again.code == first[0].code
        assert await client.hget(K.stock, "R1:V01") == "30"
    finally:
        await asyncio.to_thread(_give_back, cluster, slot, src)
        await store.close()
    assert crossslot_errors(cluster) == before


# --- a primary crashes mid-burst ----------------------------------------------------


async def burst_with_a_kill(http: TestClient, cluster: LocalCluster, victim: object,
                            members: list[str], stock: int, kill_after: int
                            ) -> dict[str, tuple[int, dict]]:
    """Each member grabs V01 with one Idempotency-Key, retrying on 503 (or a client
    timeout) for up to 40 s; after ``kill_after`` members have their answer, the
    ``victim`` primary is SIGKILLed and restarted 0.3 s later on its AOF. Returns
    each member's final answer, having checked the kill really fell mid-burst."""
    final: dict[str, tuple[int, dict]] = {}
    unavailable = 0

    async def client(m: str) -> None:
        nonlocal unavailable
        await asyncio.sleep(random.random() * 1.5)
        deadline = time.monotonic() + 40
        while True:
            try:
                st, body = await grab(http, m, "V01", f"{m}-tap")
            except Exception:  # noqa: BLE001 - the test client itself may time out
                st, body = 599, {}
            if st in (503, 599) and time.monotonic() < deadline:
                unavailable += 1
                await asyncio.sleep(0.05 + random.random() * 0.1)
                continue
            final[m] = (st, body)
            return

    wins_at_kill: list[int] = []

    async def crash() -> None:
        while len(final) < kill_after:
            await asyncio.sleep(0.01)
        wins_at_kill.append(sum(1 for st, _ in final.values() if st == 201))
        cluster.kill(victim)  # type: ignore[arg-type]
        await asyncio.sleep(0.3)
        await asyncio.to_thread(cluster.restart, victim)  # type: ignore[arg-type]

    await asyncio.gather(crash(), *(client(m) for m in members))
    assert unavailable > 0, "the crash happened after the burst"
    assert 0 < wins_at_kill[0] < stock, "the crash was not mid-burst"
    statuses = Counter(st for st, _ in final.values())
    assert set(statuses) <= {201, 410}, statuses
    return final


async def test_sigkill_of_the_campaign_primary_mid_burst_keeps_the_invariants(
        cluster: LocalCluster, cluster_url: str, tmp_path: Path) -> None:
    stock = 120
    async with engine(cluster_url, tmp_path, campaign_text(cluster, {"V01": stock}),
                      redis_timeout=1.0) as (http, r, c):
        victim = cluster.owner_of(K.campaign)
        members = [f"m{i:03d}" for i in range(300)]
        final = await burst_with_a_kill(http, cluster, victim, members, stock, kill_after=40)

        granted = {m: body["coupon"]["code"].replace("-", "")
                   for m, (st, body) in final.items() if st == 201}
        # The stock ran out: every coupon went to exactly one member who was told so.
        assert len(granted) == stock
        assert await r.hget(K.stock, "R1:V01") == "0"
        stats = await r.hgetall(K.stats)
        assert int(stats["issued:R1:V01"]) + int(await r.hget(K.stock, "R1:V01")) == stock
        for m, code in granted.items():
            rec = await r.hgetall(K.coupon(code))
            assert rec["member"] == m and rec["status"] == "issued"
            assert await r.hget(K.member(m), "c") == code
        # No member holds a grant they were not told about, nor two.
        for m in members:
            total = int(await r.hget(K.member(m), "total") or 0)
            assert total == (1 if m in granted else 0), m
        # The event stream survived too: the ledger gets exactly the grants.
        with Ledger(tmp_path / "ledger.sqlite3") as ledger:
            assert await archiver.archive_once(r, ledger) == stock
            rows = ledger.coupons_by_code(granted.values())
            assert {code: row.member_id for code, row in rows.items()} == {
                code: m for m, code in granted.items()}
        # A replay after the restart returns the first result.
        m0 = next(iter(granted))
        st, body = await grab(http, m0, "V01", f"{m0}-tap")
        assert st == 201 and body["coupon"]["code"].replace("-", "") == granted[m0]


# --- stock shards: uneven demand and a crash ------------------------------------

async def test_sharded_stock_runs_out_unevenly_across_three_primaries(
        cluster: LocalCluster, cluster_url: str, tmp_path: Path) -> None:
    """Demand only from shard 0's members: the other primaries' shares move to shard
    0's primary through journaled transfers; exactly the stock is granted and only
    the surplus hears sold_out; no call is ever CROSSSLOT."""
    before = crossslot_errors(cluster)
    cid = spread_campaign_id(cluster)
    stock = {"V01": 60}
    async with engine(cluster_url, tmp_path, campaign_text(cluster, stock, cid=cid),
                      stock_shards=SHARDS) as (http, r, _):
        ids = members_of(0, 80)
        results = await asyncio.gather(*(grab(http, m, "V01", f"k-{m}") for m in ids))
        granted = {m: body["coupon"]["code"].replace("-", "")
                   for m, (st, body) in zip(ids, results) if st == 201}
        assert len(granted) == 60
        assert Counter(body["error"]["code"] for st, body in results if st != 201) == \
            {"sold_out": 20}
        await check_sharded_invariants(r, cid, stock, granted)
        stats = [await r.hgetall(keys.Keys(cid, s).stats) for s in range(SHARDS)]
        assert int(stats[0]["xfer_in:R1:V01"]) == 40
        # Each shard's keys are on their own primary.
        for s in range(SHARDS):
            owner = cluster.owner_of(keys.Keys(cid, s).stock)
            with cluster.client(owner) as c:
                assert c.exists(keys.Keys(cid, s).stock) == 1
        with Ledger(tmp_path / "ledger.sqlite3") as ledger:
            await archiver.archive_once(r, ledger)
            assert ledger.coupons_by_code(granted.values()).keys() == set(granted.values())
    assert crossslot_errors(cluster) == before


async def test_sigkill_of_a_shard_primary_mid_burst_keeps_the_sharded_invariants(
        cluster: LocalCluster, cluster_url: str, tmp_path: Path) -> None:
    """Members of every shard, keyed retries on 503; shard 1's primary is killed
    mid-burst and restarted. Afterwards: exactly the stock granted, each grant told
    to its member, no transfer lost or doubled (the sweeper finishes any in flight)."""
    cid = spread_campaign_id(cluster)
    stock = 90
    async with engine(cluster_url, tmp_path, campaign_text(cluster, {"V01": stock}, cid=cid),
                      stock_shards=SHARDS, redis_timeout=1.0) as (http, r, _):
        victim = cluster.owner_of(keys.Keys(cid, 1).stock)
        # Twice as many members of shard 0 as of the others: transfers are needed.
        ids = members_of(0, 100) + members_of(1, 50) + members_of(2, 50)
        final = await burst_with_a_kill(http, cluster, victim, ids, stock, kill_after=30)
        store = http.server.app[ENGINE].store
        await store.transfers.sweep(grace_ms=0)
        granted = {m: body["coupon"]["code"].replace("-", "")
                   for m, (st, body) in final.items() if st == 201}
        assert len(granted) == stock
        await check_sharded_invariants(r, cid, {"V01": stock}, granted)
        for m in ids:
            k = keys.Keys(cid, shards.member_shard(m, SHARDS))
            assert int(await r.hget(k.member(m), "total") or 0) == (1 if m in granted else 0)
        # Every shard's event stream reaches the ledger: exactly the grants, once.
        with Ledger(tmp_path / "ledger.sqlite3") as ledger:
            assert await archiver.archive_once(r, ledger) == stock
            assert await archiver.archive_once(r, ledger) == 0
            assert await streams.lag(r, cid) == 0
            rows = ledger.coupons_by_code(granted.values())
            assert {code: row.member_id for code, row in rows.items()} == {
                code: m for m, code in granted.items()}
            assert len({shards.code_shard(code, SHARDS) for code in rows}) == SHARDS


# --- coupon-engine serve, as a process, on the cluster ----------------------------


def test_serve_on_the_cluster_end_to_end(cluster: LocalCluster, cluster_url: str,
                                         tmp_path: Path) -> None:
    import subprocess
    import sys

    from test_serve import env_for, free_port, http, wait_ready

    f = tmp_path / "c.toml"
    f.write_text(campaign_text(cluster, {"V01": 5, "V02": 5}), encoding="utf-8")
    data, port = tmp_path / "var", free_port()
    base = f"http://127.0.0.1:{port}"
    env = {**env_for(data), "COUPON_MEMBER_JWT_SECRET": SECRET, "COUPON_REDIS_CLUSTER": "1"}
    # A plain seed URL: the environment says it is a cluster.
    cmd = [sys.executable, "-m", "engine.cli", "serve", "--redis-url", cluster.seed_url,
           "--campaign", str(f), "--port", str(port), "--workers", "2"]
    with (tmp_path / "serve.log").open("wb") as log:
        proc = subprocess.Popen(cmd, env=env, stderr=log)
    try:
        wait_ready(base, proc, timeout=40)
        codes_ = []
        for i in range(6):
            st, body = http("POST", base + "/v1/rounds/R1/grab", {"venue_id": "V01"},
                            {**member(f"s{i}"), "Idempotency-Key": "t"})
            assert st in (201, 410), body
            if st == 201:
                codes_.append(body["coupon"]["code"].replace("-", ""))
        assert len(codes_) == 5
        # The archiver process drains the cluster's stream into the ledger.
        deadline = time.monotonic() + 20
        while True:
            with Ledger(data / "ledger.sqlite3") as ledger:
                if len(ledger.coupons_by_code(codes_)) == 5:
                    break
            assert time.monotonic() < deadline, "the archiver did not archive the grants"
            time.sleep(0.2)
    finally:
        proc.send_signal(2)
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
    assert proc.returncode == 0, (tmp_path / "serve.log").read_text()[-3000:]


def test_cluster_is_named_by_flag_environment_or_url_scheme() -> None:
    from engine.config import from_env
    from engine.store.connection import is_cluster_url, plain_url
    assert from_env({"COUPON_REDIS_CLUSTER": "1"}).redis_cluster
    assert not from_env({}).redis_cluster
    assert Settings(redis_url="redis+cluster://10.0.0.5:7000").cluster
    assert Settings(redis_url="redis://10.0.0.5:7000", redis_cluster=True).cluster
    assert not Settings(redis_url="redis://10.0.0.5:7000").cluster
    assert is_cluster_url("rediss+cluster://h:1") and not is_cluster_url("unix:///x")
    assert plain_url("redis+cluster://u:p@h:7000") == "redis://u:p@h:7000"

"""/metrics: bounded labels primed at start, counts that match the requests sent,
in one process and across ``serve --workers 2``, and a scrape promtool accepts."""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import timedelta
from pathlib import Path

import pytest
import redis.asyncio as aioredis
from conftest import ADMIN, SECRET, campaign_toml, open_round, redis_now
from prometheus_client.parser import text_string_to_metric_families

from engine import campaign as cmp
from engine.auth import mint_member_token
from engine.config import Settings
from engine.http.handlers import ENGINE
from engine.metrics import FLUSH_INTERVAL_S, GRAB_OUTCOMES, Metrics
from engine.store import Store

CLI = [sys.executable, "-m", "engine.cli"]
GRAB_ROUTE = "/v1/rounds/{round_id}/grab"


def samples(text: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    """(sample name, sorted labels) -> value, for one exposition text."""
    out = {}
    for fam in text_string_to_metric_families(text):
        for s in fam.samples:
            out[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return out


def total(scrape: dict, name: str, **match: str) -> float:
    return sum(v for (n, labels), v in scrape.items()
               if n == name and all(dict(labels).get(k) == w for k, w in match.items()))


def declared_names() -> set[str]:
    """Every sample name the engine can expose (counters with _total, histogram parts)."""
    m = Metrics.disabled()
    names = set()
    for fam in m.registry.collect():
        names.add(fam.name)
        for s in fam.samples:
            names.add(s.name)
        if fam.type == "counter":
            names.add(fam.name + "_total")
        if fam.type == "histogram":
            names |= {fam.name + x for x in ("_bucket", "_count", "_sum")}
    return names


# --- in one process (make_engine: no multiprocess directory) ------------------


async def test_single_process_counts_and_primed_labels(make_engine, redis_url: str) -> None:
    eng = await make_engine(campaign_toml(rounds=[open_round(redis_url)]))
    c = eng.client
    r = await c.post("/v1/rounds/R1/grab", json={"venue_id": "V01"}, headers=eng.member("m1"))
    assert r.status == 201
    code = (await r.json())["coupon"]["code"]
    assert (await c.post("/v1/rounds/R1/grab", json={"venue_id": "V01"},
                         headers=eng.member("m1"))).status == 409
    assert (await c.post("/v1/rounds/NOPE/grab", json={"venue_id": "V01"},
                         headers=eng.member("m2"))).status == 404
    venue = await eng.venue("V01")
    assert (await c.post("/v1/venue/redemptions", json={"code": code}, headers=venue)).status == 200
    r = await c.get("/metrics")
    assert r.status == 200 and r.headers["Content-Type"].startswith("text/plain")
    text = await r.text()
    s = samples(text)
    assert total(s, "coupon_grab_requests_total", round="R1", outcome="granted") == 1
    assert total(s, "coupon_grab_requests_total", round="R1", outcome="round_quota") == 1
    # A made-up round id never becomes a label value.
    assert total(s, "coupon_grab_requests_total", round="other", outcome="round_not_found") == 1
    assert "NOPE" not in text and "m1" not in text and code not in text
    assert total(s, "coupon_coupons_issued_total", round="R1", venue="V01") == 1
    assert total(s, "coupon_coupons_redeemed_total", round="R1", venue="V01") == 1
    assert total(s, "coupon_redemption_attempts_total", venue="V01", outcome="redeemed") == 1
    assert total(s, "coupon_http_request_duration_seconds_count", route=GRAB_ROUTE) == 3
    # One script call: the worker granted m1 the round's one coupon, so it answers
    # m1's second grab (round_quota) itself.
    assert total(s, "coupon_redis_script_duration_seconds_count", script="grab") == 1
    # Primed at start: every round x venue x outcome exists, at zero if unused.
    for v in ("V01", "V02"):
        assert ("coupon_coupons_voided_total", (("round", "R1"), ("venue", v))) in s
        assert ("coupon_stock_remaining", (("round", "R1"), ("venue", v))) in s
    for o in GRAB_OUTCOMES:
        assert ("coupon_grab_requests_total", (("outcome", o), ("round", "R1"))) in s
    assert s[("coupon_round_state", (("round", "R1"), ("state", "open")))] == 1
    assert s[("coupon_budget_fen", ())] == 10**9


async def test_polled_gauges_follow_redis(make_engine, redis_url: str) -> None:
    eng = await make_engine(campaign_toml(rounds=[open_round(redis_url, stock={"V01": 3})]))
    r = await eng.client.post("/v1/rounds/R1/grab", json={"venue_id": "V01"},
                              headers=eng.member("m1"))
    assert r.status == 201
    deadline = time.monotonic() + 5
    while True:
        s = samples(await (await eng.client.get("/metrics")).text())
        # /metrics renders in a thread, so it may catch a poll half applied: wait for both.
        if s[("coupon_stock_remaining", (("round", "R1"), ("venue", "V01")))] == 2 and \
                s[("coupon_budget_committed_fen", ())] == 9900:
            break
        assert time.monotonic() < deadline, "the poller did not update the stock gauge"
        await asyncio.sleep(0.2)
    assert s[("coupon_budget_committed_fen", ())] == 9900
    assert s[("coupon_budget_redeemed_fen", ())] == 0
    # No archiver runs here, so the one event is not archived.
    assert s[("coupon_ledger_lag_events", ())] == 1


@pytest.mark.skipif(shutil.which("promtool") is None and not os.environ.get("CI"),
                    reason="promtool is not installed")
async def test_promtool_accepts_the_scrape(make_engine, redis_url: str) -> None:
    eng = await make_engine(campaign_toml(rounds=[open_round(redis_url)]))
    await eng.client.post("/v1/rounds/R1/grab", json={"venue_id": "V01"},
                          headers=eng.member("m1"))
    text = await (await eng.client.get("/metrics")).text()
    proc = subprocess.run(["promtool", "check", "metrics"], input=text, capture_output=True,
                          text=True, timeout=30)
    assert proc.returncode == 0, proc.stdout + proc.stderr


# --- a real `serve --workers 2` ---------------------------------------------------

from test_serve import free_port  # noqa: E402


def http(method: str, url: str, body: dict | None = None,
         headers: dict | None = None) -> tuple[int, bytes]:
    data = json.dumps(body).encode() if body is not None else None
    h = {"Content-Type": "application/json", **(headers or {})}
    req = urllib.request.Request(url, data=data, method=method, headers=h)
    try:
        with urllib.request.urlopen(req, timeout=5) as resp:
            return resp.status, resp.read()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read()


class Served:
    def __init__(self, base: str, data: Path, redis_url: str, campaign: cmp.Campaign) -> None:
        self.base, self.data, self.redis_url, self.campaign = base, data, redis_url, campaign
        self.port = int(base.rsplit(":", 1)[1])

    def member(self, member_id: str) -> dict[str, str]:
        return {"Authorization": "Bearer " + mint_member_token(SECRET, member_id, 3600)}

    def venue(self, venue_id: str) -> dict[str, str]:
        async def add() -> str:
            client = aioredis.Redis.from_url(self.redis_url, decode_responses=True)
            try:
                return await Store(client, self.campaign, Settings()).add_venue_key(venue_id)
            finally:
                await client.aclose()
        return {"Authorization": "Bearer " + asyncio.run(add())}

    def scrape(self) -> str:
        with urllib.request.urlopen(self.base + "/metrics", timeout=5) as resp:
            return resp.read().decode()


def two_rounds(redis_url: str) -> str:
    """R1 open (V02's 2 coupons sell out in drive_traffic), R2 scheduled in an hour."""
    r1 = open_round(redis_url, stock={"V01": 50, "V02": 2})
    r2 = {"id": "R2", "opens": r1["closes"] + timedelta(minutes=1),
          "closes": r1["closes"] + timedelta(hours=2), "stock": {"V01": 5, "V02": 5}}
    return campaign_toml(rounds=[r1, r2])


@contextmanager
def serve_workers(tmp_path: Path, redis_url: str, workers: int = 2, port: int | None = None,
                  text: str | None = None) -> Iterator[Served]:
    """``serve --workers N`` against the session's Redis, with an open round R1 (or the
    campaign ``text``) on ``port`` (else a free one)."""
    text = text or two_rounds(redis_url)
    camp = tmp_path / "c.toml"
    camp.write_text(text, encoding="utf-8")
    data, port = tmp_path / "var", port or free_port()
    # A leftover file from an earlier run must not count: serve wipes the directory.
    (data / "metrics").mkdir(parents=True, exist_ok=True)
    (data / "metrics" / "counter_999999.db").write_bytes(b"stale")
    env = {k: v for k, v in os.environ.items()
           if not k.startswith("COUPON_") and k != "PROMETHEUS_MULTIPROC_DIR"}
    env.update(COUPON_DATA_DIR=str(data), COUPON_MEMBER_JWT_SECRET=SECRET,
               COUPON_ADMIN_TOKEN=ADMIN, COUPON_ALLOW_UNSAFE_REDIS="1",
               COUPON_MEMBER_RATE="1000", COUPON_MEMBER_BURST="1000")
    # A file, not a pipe: nobody reads the log while the test runs, and a full pipe
    # would block the engine.
    log = open(tmp_path / "serve.log", "wb")
    proc = subprocess.Popen([*CLI, "serve", "--port", str(port), "--workers", str(workers),
                             "--redis-url", redis_url, "--campaign", str(camp)],
                            env=env, stderr=log)
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 20
        while True:
            assert proc.poll() is None, (tmp_path / "serve.log").read_text()
            try:
                if http("GET", base + "/readyz")[0] == 200:
                    break
            except OSError:
                pass
            assert time.monotonic() < deadline, "engine did not become ready"
            time.sleep(0.1)
        # Both workers must be up before traffic, so that both take some of it.
        deadline = time.monotonic() + 20
        while len(list((data / "metrics").glob("counter_*.db"))) < workers:
            assert time.monotonic() < deadline, "workers did not start"
            time.sleep(0.1)
        yield Served(base, data, redis_url, cmp.parse_campaign(text))
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(30)
        log.close()


def drive_traffic(eng: Served) -> dict[str, int]:
    """Grabs, an error of each kind, voids and redemptions; the counts sent."""
    sent = {"granted": 0, "round_quota": 0, "round_not_found": 0, "venue_not_found": 0}
    codes = []
    for i in range(8):
        st, body = http("POST", eng.base + "/v1/rounds/R1/grab", {"venue_id": "V01"},
                        eng.member(f"m{i}"))
        assert st == 201
        codes.append(json.loads(body)["coupon"]["code"])
        sent["granted"] += 1
    for i in range(3):
        assert http("POST", eng.base + "/v1/rounds/R1/grab", {"venue_id": "V01"},
                    eng.member(f"m{i}"))[0] == 409
        sent["round_quota"] += 1
    for _ in range(2):
        assert http("POST", eng.base + "/v1/rounds/RX/grab", {"venue_id": "V01"},
                    eng.member("m9"))[0] == 404
        sent["round_not_found"] += 1
    assert http("POST", eng.base + "/v1/rounds/R1/grab", {"venue_id": "V99"},
                eng.member("m9"))[0] == 404
    sent["venue_not_found"] += 1
    # V02 has 2 coupons: both go, the third member finds it sold out.
    for i in range(2):
        assert http("POST", eng.base + "/v1/rounds/R1/grab", {"venue_id": "V02"},
                    eng.member(f"s{i}"))[0] == 201
        sent["granted"] += 1
    assert http("POST", eng.base + "/v1/rounds/R1/grab", {"venue_id": "V02"},
                eng.member("s2"))[0] == 410
    sent["sold_out"] = 1
    venue = eng.venue("V01")
    for code in codes[:3]:
        assert http("POST", eng.base + "/v1/venue/redemptions", {"code": code}, venue)[0] == 200
    assert http("POST", eng.base + "/v1/venue/redemptions", {"code": codes[0]}, venue)[0] == 409
    assert http("DELETE", eng.base + f"/v1/me/coupons/{codes[7]}", None,
                eng.member("m7"))[0] == 200
    return sent


def test_counts_across_two_workers(tmp_path: Path, redis_url: str) -> None:
    with serve_workers(tmp_path, redis_url) as eng:
        assert not (eng.data / "metrics" / "counter_999999.db").exists()
        sent = drive_traffic(eng)
        n = sum(sent.values())
        # Each worker applies its tallies to the shared files every FLUSH_INTERVAL_S;
        # the scraped worker flushes its own first. Wait out one interval, then every
        # answer of any worker must cover both.
        time.sleep(2 * FLUSH_INTERVAL_S)
        for _ in range(4):
            s = samples(eng.scrape())
            assert total(s, "coupon_grab_requests_total") == n
            for outcome, k in sent.items():
                assert total(s, "coupon_grab_requests_total", outcome=outcome) == k
            assert total(s, "coupon_http_request_duration_seconds_count", route=GRAB_ROUTE) == n
            assert total(s, "coupon_coupons_issued_total") == sent["granted"]
            assert total(s, "coupon_coupons_redeemed_total", venue="V01") == 3
            assert total(s, "coupon_coupons_voided_total", venue="V01") == 1
            assert total(s, "coupon_redemption_attempts_total", venue="V01",
                         outcome="already_redeemed") == 1
            assert total(s, "coupon_redis_script_duration_seconds_count", script="redeem") == 4
        # Each worker writes its own file; the merge above covered them all.
        assert len(list((eng.data / "metrics").glob("counter_*.db"))) >= 2


def test_buffered_tallies_equal_direct_prometheus_updates() -> None:
    """flush() must leave exactly what prometheus_client's own inc()/observe() would."""
    from prometheus_client import CollectorRegistry
    buffered, direct = Metrics(CollectorRegistry()), Metrics(CollectorRegistry())
    durations = [0.0, 0.0001, 0.00025, 0.0003, 0.001, 0.0049, 0.3, 2.5, 7.0, 0.00025]
    for i, d in enumerate(durations):
        status = 503 if i % 4 == 0 else 201
        buffered.http("/v1/rounds/{round_id}/grab", "POST", status, d)
        direct.http_duration.labels("/v1/rounds/{round_id}/grab", "POST", str(status)).observe(d)
        if status == 503:
            direct.store_unavailable.inc()
        buffered.grab("R1", "granted")
        direct.grab_requests.labels("other", "granted").inc()
    def values(m: Metrics) -> dict:
        # *_created samples hold creation times, which differ by construction, and the
        # process gauges are read from /proc when each Metrics is made: not tallies.
        return {k: v for k, v in samples(m.render().decode()).items()
                if not k[0].endswith("_created") and not k[0].startswith("coupon_process_")}
    assert values(buffered) != values(direct)
    buffered.flush()
    assert values(buffered) == values(direct)


async def test_totals_schedule_and_sold_out_gauges(make_engine, redis_url: str) -> None:
    """Totals come from Redis's stats (not the process's counters), the schedule is
    exported, and the first moment a line was seen sold out is kept in Redis."""
    from engine.store.keys import Keys
    eng = await make_engine(campaign_toml(rounds=[open_round(redis_url,
                                                             stock={"V01": 1, "V02": 3})]))
    r1 = eng.campaign.round("R1")
    before_ms = int(redis_now(redis_url).timestamp() * 1000)
    r = await eng.client.post("/v1/rounds/R1/grab", json={"venue_id": "V01"},
                              headers=eng.member("m1"))
    assert r.status == 201
    code = (await r.json())["coupon"]["code"]
    key = Keys(eng.campaign.id).sold_out
    deadline = time.monotonic() + 5
    while not await eng.redis.hget(key, "R1:V01"):
        assert time.monotonic() < deadline, "no poller recorded the sell-out"
        await asyncio.sleep(0.1)
    at_ms = int(await eng.redis.hget(key, "R1:V01"))
    # Seen by a poll after the grant, within a poll interval or two.
    assert before_ms <= at_ms <= before_ms + 3000
    assert await eng.redis.hget(key, "R1:V02") is None
    # Pretend the engine's counters restarted: the totals must not care.
    m = eng.client.app[ENGINE].metrics
    m.flush()
    m.coupons_issued.labels("R1", "V01")._value.set(0)
    s = samples(await (await eng.client.get("/metrics")).text())
    line = (("round", "R1"), ("venue", "V01"))
    assert s[("coupon_coupons_issued_total", line)] == 0
    assert s[("coupon_stock_issued", line)] == 1
    assert s[("coupon_stock_void", line)] == 0
    assert s[("coupon_stock_sold_out_at_seconds", line)] == at_ms / 1000
    assert ("coupon_stock_sold_out_at_seconds", (("round", "R1"), ("venue", "V02"))) not in s
    assert s[("coupon_round_opens_at_seconds", (("round", "R1"),))] == r1.opens_at_ms / 1000
    assert s[("coupon_round_closes_at_seconds", (("round", "R1"),))] == r1.closes_at_ms / 1000
    # A void puts the coupon back on sale; the first sell-out time stays.
    resp = await eng.client.delete(f"/v1/me/coupons/{code}", headers=eng.member("m1"))
    assert resp.status == 200
    deadline = time.monotonic() + 5
    while True:
        s = samples(await (await eng.client.get("/metrics")).text())
        if s[("coupon_stock_void", line)] == 1:
            break
        assert time.monotonic() < deadline
        await asyncio.sleep(0.1)
    assert s[("coupon_stock_remaining", line)] == 1
    assert s[("coupon_stock_sold_out_at_seconds", line)] == at_ms / 1000
    assert int(await eng.redis.hget(key, "R1:V01")) == at_ms
    # Two workers that both saw it: the earlier sighting is kept.
    await eng.client.app[ENGINE].store.mark_sold_out(["R1:V01"], at_ms + 5000)
    assert int(await eng.redis.hget(key, "R1:V01")) == at_ms
    # A poll that read the stock just before Redis lost its data writes nothing into
    # the empty Redis: no campaign key may come back (restore and the reload guard
    # take "no keys" for "nothing loaded").
    await eng.redis.flushall()
    await eng.client.app[ENGINE].store.mark_sold_out(["R1:V01"], at_ms + 6000)
    assert await eng.redis.keys("*") == []


def test_process_gauges_per_live_process(tmp_path: Path, redis_url: str) -> None:
    """CPU and memory per worker (and the archiver), labelled by pid; a worker that
    dies drops out of the scrape, its replacement appears."""
    import re
    with serve_workers(tmp_path, redis_url) as eng:
        cpu: dict[str, float] = {}

        def pids() -> dict[str, set[str]]:
            # Memory and CPU from one scrape: each worker renders /metrics at most once
            # a second, so two scrapes may be answered from two renders of different age.
            out: dict[str, set[str]] = {}
            cpu.clear()
            for (name, labels), v in samples(eng.scrape()).items():
                d = dict(labels)
                if name == "coupon_process_resident_memory_bytes":
                    assert v > 1_000_000, d   # a Python process holds megabytes
                    out.setdefault(d["role"], set()).add(d["pid"])
                elif name == "coupon_process_cpu_seconds":
                    cpu[d["pid"]] = v
            return out
        deadline = time.monotonic() + 15
        while (len((got := pids()).get("worker", ())) < 2 or not got.get("archiver")
               or set(cpu) != got["worker"] | got["archiver"]):
            assert time.monotonic() < deadline, (got, cpu)
            time.sleep(0.3)
        assert all(v > 0 for v in cpu.values()), cpu
        victim = sorted(got["worker"])[0]
        assert re.fullmatch(r"\d+", victim)
        os.kill(int(victim), signal.SIGKILL)
        deadline = time.monotonic() + 20
        while True:
            try:
                now = pids()
            except OSError:   # the victim may have held the connection
                now = {}
            if now.get("worker") and victim not in now["worker"] and len(now["worker"]) == 2:
                break
            assert time.monotonic() < deadline, now
            time.sleep(0.3)

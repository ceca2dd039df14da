"""The operators' controls on a real ``serve --workers 2`` under a burst, with the ledger.

One round, two stock lines, members grabbing concurrently (48 at a time) while an
operator pauses, resumes, adds stock to the sold-out line and closes the round, then
reverses redemptions at the counter. The archiver is run by hand and SIGKILLed twice
(after reading, after committing) before the ledger is checked: no grant stamped later
than the pause's or the close's acknowledgement (Redis time, the audit's ``at``), every
grab sent after an acknowledgement refused, the stock granted exactly, every action in
the ledger once; then reconciliation and settlement of reversed and re-redeemed codes,
and a reverse after settlement refused.
"""

from __future__ import annotations

import asyncio
import itertools
import json
import os
import signal
import sqlite3
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import aiohttp
import redis.asyncio as aioredis
from conftest import ADMIN, SECRET, campaign_toml, open_round
from test_serve import free_port, wait_ready

from engine import codes
from engine.auth import mint_member_token
from engine.domain import parse_rfc3339
from engine.store import Store, streams
from engine.store.keys import Keys

ROOT = Path(__file__).resolve().parent.parent
CLI = [sys.executable, "-m", "engine.cli"]
ALICE = "alice-operator-token-0123456789"
STOCK_V01, STOCK_V02, ADDED = 300, 5000, 40
CONCURRENCY = 48


@dataclass
class Served:
    base: str
    data: Path
    env: dict[str, str]


@contextmanager
def serve(tmp_path: Path, redis_url: str, text: str) -> Iterator[Served]:
    """``serve --workers 2`` on the test's Redis, without its own archiver (the test
    runs and kills ``coupon-engine archive`` itself)."""
    camp = tmp_path / "c.toml"
    camp.write_text(text, encoding="utf-8")
    data, port = tmp_path / "var", free_port()
    env = {k: v for k, v in os.environ.items()
           if not k.startswith("COUPON_") and k != "PROMETHEUS_MULTIPROC_DIR"}
    env.update(COUPON_DATA_DIR=str(data), COUPON_MEMBER_JWT_SECRET=SECRET,
               COUPON_ADMIN_TOKEN=ADMIN, COUPON_ADMIN_TOKENS=f"alice:{ALICE}",
               COUPON_ALLOW_UNSAFE_REDIS="1", COUPON_MEMBER_RATE="1000",
               COUPON_MEMBER_BURST="1000", COUPON_ARCHIVER="0", COUPON_REDIS_URL=redis_url,
               PYTHONPATH=str(ROOT))
    log = open(tmp_path / "serve.log", "wb")
    proc = subprocess.Popen([*CLI, "serve", "--port", str(port), "--workers", "2",
                             "--campaign", str(camp)], env=env, stderr=log)
    base = f"http://127.0.0.1:{port}"
    try:
        wait_ready(base, proc)
        deadline = time.monotonic() + 20
        while len(list((data / "metrics").glob("counter_*.db"))) < 2:
            assert time.monotonic() < deadline, "workers did not start"
            time.sleep(0.1)
        yield Served(base, data, env)
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(30)
        log.close()


@dataclass
class Answer:
    sent: float      # monotonic, before the request left
    status: int
    code: str        # the coupon code, or the error code
    retry_after: str | None


class Crowd:
    """Members grabbing at one venue, CONCURRENCY at a time, each member once."""

    members = itertools.count()

    def __init__(self, session: aiohttp.ClientSession, base: str) -> None:
        self.session, self.base = session, base
        self.answers: list[Answer] = []

    def granted(self) -> int:
        return sum(1 for a in self.answers if a.status == 201)

    async def run(self, venue: str, members: int, until: asyncio.Event | None = None) -> None:
        left = iter(range(members))

        async def one_at_a_time() -> None:
            for _ in left:
                if until is not None and until.is_set():
                    return
                member = f"m{next(Crowd.members)}"
                token = mint_member_token(SECRET, member, 3600)
                sent = time.monotonic()
                async with self.session.post(
                        f"{self.base}/v1/rounds/R1/grab", json={"venue_id": venue},
                        headers={"Authorization": f"Bearer {token}"}) as r:
                    body = await r.json()
                code = body["coupon"]["code"] if r.status == 201 else body["error"]["code"]
                self.answers.append(Answer(sent, r.status, code, r.headers.get("Retry-After")))

        await asyncio.gather(*[one_at_a_time() for _ in range(CONCURRENCY)])


async def admin(session: aiohttp.ClientSession, base: str, path: str, body: dict,
                token: str = ADMIN) -> tuple[int, dict, float]:
    async with session.post(f"{base}/v1/admin/{path}", json=body,
                            headers={"Authorization": f"Bearer {token}"}) as r:
        got = await r.json()
    return r.status, got, time.monotonic()


async def act_mid_burst(crowd: Crowd, venue: str, after_grants: int, action: str,
                        session: aiohttp.ClientSession, base: str) -> tuple[int, float]:
    """Run a burst at ``venue``; once ``after_grants`` coupons are out, pause or close the
    round; keep the crowd going 0.6 s longer. Returns (Redis ms of the acknowledgement,
    monotonic time it was received)."""
    stop = asyncio.Event()
    burst = asyncio.create_task(crowd.run(venue, 100_000, until=stop))
    while crowd.granted() < after_grants:
        assert not burst.done(), "the crowd ran out before the action"
        await asyncio.sleep(0.005)
    s, body, acked = await admin(session, base, f"rounds/R1/{action}",
                                 {"reason": f"{action} mid-burst"})
    assert s == 200, body
    await asyncio.sleep(0.6)
    stop.set()
    await burst
    return parse_rfc3339(body["audit"]["at"]), acked


def cli(env: dict[str, str], *args: str, crash: str | None = None
        ) -> subprocess.CompletedProcess:
    e = dict(env)
    e.pop("COUPON_ARCHIVER_CRASH_POINT", None)
    if crash:
        e["COUPON_ARCHIVER_CRASH_POINT"] = crash
    return subprocess.run([*CLI, *args], env=e, capture_output=True, text=True, timeout=120)


async def test_operator_controls_under_a_burst_on_serve(tmp_path: Path, redis_url: str) -> None:
    text = campaign_toml(rounds=[open_round(redis_url, stock={"V01": STOCK_V01,
                                                              "V02": STOCK_V02})])
    with serve(tmp_path, redis_url, text) as eng:
        async with aiohttp.ClientSession(
                connector=aiohttp.TCPConnector(limit=CONCURRENCY + 4)) as session:
            # 1. Pause mid-burst: from its acknowledgement on, every grab is refused.
            crowd = Crowd(session, eng.base)
            paused_at, acked = await act_mid_burst(crowd, "V01", 100, "pause", session,
                                                   eng.base)
            before = crowd.granted()
            assert 100 <= before < STOCK_V01
            after = [a for a in crowd.answers if a.sent > acked]
            assert len(after) >= 20, "the crowd sent too little after the pause to tell"
            assert {(a.status, a.code, a.retry_after) for a in after} == {
                (409, "round_paused", "30")}
            # 2. Resume: the burst goes on to exactly the stock.
            s, body, resumed = await admin(session, eng.base, "rounds/R1/resume",
                                           {"reason": "identity service back"}, ALICE)
            assert s == 200 and body["audit"]["by"] == "alice"
            resumed_at = parse_rfc3339(body["audit"]["at"])
            await crowd.run("V01", STOCK_V01 + 200)
            assert crowd.granted() == STOCK_V01
            assert crowd.answers[-1].code == "sold_out"
            # 3. Stock added to the sold-out line: exactly that many more, never more.
            s, body, _ = await admin(session, eng.base, "rounds/R1/stock",
                                     {"venue_id": "V01", "add": ADDED,
                                      "reason": "the line was entered 40 short"})
            assert s == 200, body
            added = Crowd(session, eng.base)
            await added.run("V01", ADDED * 6)
            assert added.granted() == ADDED
            assert {a.code for a in added.answers if a.status != 201} == {"sold_out"}
            # 4. Close mid-burst at the other line: refused from the acknowledgement on.
            closing = Crowd(session, eng.base)
            closed_at, acked = await act_mid_burst(closing, "V02", 150, "close", session,
                                                   eng.base)
            after = [a for a in closing.answers if a.sent > acked]
            assert len(after) >= 20
            assert {(a.status, a.code) for a in after} == {(410, "round_closed")}
            assert closing.granted() < STOCK_V02
            async with session.get(f"{eng.base}/v1/rounds/R1") as r:
                view = (await r.json())["round"]
            assert view["state"] == "closed" and parse_rfc3339(view["closes_at"]) == closed_at

            # 5. At the counter: redeem, reverse a mistake, redeem again; one stays reversed.
            mine = [a.code for a in crowd.answers if a.status == 201][:3]
            venue = {"Authorization": "Bearer " + await _venue_key(redis_url, "V01")}
            for code in mine:
                async with session.post(f"{eng.base}/v1/venue/redemptions", json={"code": code},
                                        headers=venue) as r:
                    assert r.status == 200
            again, kept_reversed, plain = mine
            for code in (again, kept_reversed):
                s, body, _ = await admin(session, eng.base, f"redemptions/{code}/reverse",
                                         {"reason": "scanned the wrong member's phone"})
                assert s == 200 and body["coupon"]["status"] == "issued", body
            async with session.post(f"{eng.base}/v1/venue/redemptions", json={"code": again},
                                    headers=venue) as r:
                assert r.status == 200
            async with session.get(f"{eng.base}/v1/venue/redemptions", headers=venue) as r:
                listed = {c["code"] for c in (await r.json())["redemptions"]}
            assert listed == {again, plain}

        # 6. The archiver, killed after reading and after committing, then run to the end.
        k = Keys("test-c")
        client = aioredis.Redis.from_url(redis_url, decode_responses=True)
        try:
            stream = {eid: f for eid, f in await client.xrange(k.events)}
            actions = {eid: f for eid, f in stream.items() if "actor" in f}
            assert sorted(f["type"] for f in actions.values()) == [
                "add_stock", "close", "pause", "resume", "reverse", "reverse"]
            for crash in ("after_read:1", "after_commit:1"):
                p = cli(eng.env, "archive", crash=crash)
                assert p.returncode == -signal.SIGKILL, p.stderr
            p = cli(eng.env, "archive")
            assert p.returncode == 0, p.stderr
            assert await streams.lag(client, "test-c") == 0
        finally:
            await client.aclose()
        db = sqlite3.connect(eng.data / "ledger.sqlite3")
        try:
            audit = db.execute("SELECT event_id, action, actor FROM audit").fetchall()
            assert sorted(a[0] for a in audit) == sorted(actions)  # each action once
            assert {a[0]: a[1] for a in audit} == {i: f["type"] for i, f in actions.items()}
            assert {a[2] for a in audit} == {"admin", "alice"}
            ids = [r[0] for r in db.execute("SELECT event_id FROM events")]
            assert sorted(ids) == sorted(i for i, f in stream.items() if "code" in f)
            grants = [at for (at,) in db.execute(
                "SELECT at_ms FROM events WHERE type = 'grant'")]
            # No grant stamped (Redis time) while paused, nor after the close.
            assert not [t for t in grants if paused_at < t < resumed_at]
            assert max(grants) <= closed_at
            by_line = dict(db.execute("SELECT venue_id, count(*) FROM events WHERE type ="
                                      " 'grant' GROUP BY venue_id"))
            assert by_line["V01"] == STOCK_V01 + ADDED
            assert by_line["V02"] == closing.granted()
        finally:
            db.close()

        # 7. Reconciliation: a reversed redemption is not_redeemed, a re-redeemed one matches.
        claims = tmp_path / "claims.csv"
        claims.write_text("code,redeemed_at,amount_fen\n" + "".join(
            f"{c},2024-12-20T10:00:00+08:00,10000\n" for c in (again, kept_reversed, plain)),
            encoding="utf-8")
        p = cli(eng.env, "reconcile", "--venue", "V01", "--claims", str(claims), "--out",
                str(tmp_path / "rec"))
        assert p.returncode == 0, p.stderr
        counts = json.loads(p.stdout)["counts"]
        assert (counts["matched"], counts["not_redeemed"]) == (2, 1)
        rows = (tmp_path / "rec" / "reconciliation.csv").read_text("utf-8-sig")
        assert "its redemption was reversed" in rows
        p = cli(eng.env, "settle", "--venue", "V01", "--claims", str(claims), "--out",
                str(tmp_path / "set"))
        assert p.returncode == 0, p.stderr
        assert json.loads(p.stdout)["settled_codes"] == 2

        # 8. A settled redemption cannot be reversed, through the API or the CLI.
        async with aiohttp.ClientSession() as session:
            s, body, _ = await admin(session, eng.base, f"redemptions/{plain}/reverse",
                                     {"reason": "too late"})
            assert (s, body["error"]["code"]) == (409, "already_settled")
        p = cli(eng.env, "redemption", "reverse", again, "--reason", "too late")
        assert p.returncode == 2 and "already_settled" in p.stderr
        # The statement counts the reversal and nothing paid without a redemption.
        p = cli(eng.env, "statement", "--out", str(tmp_path / "st"))
        assert p.returncode == 0, p.stderr
        doc = json.loads((tmp_path / "st" / "statement.json").read_text("utf-8"))
        v01 = next(v for v in doc["venues"] if v["venue_id"] == "V01")
        assert (v01["redeemed"], v01["reversed"], v01["settled"], v01["unclaimed"]) == (
            2, 2, 2, 0)
        assert doc["settled_not_redeemed"] == []
        # `audit` lists the actions from the ledger, the round's only with --round.
        p = cli(eng.env, "audit", "--json")
        assert p.returncode == 0, p.stderr
        listed = [json.loads(line) for line in p.stdout.splitlines()]
        assert [x["action"] for x in listed] == [
            "pause", "resume", "add_stock", "close", "reverse", "reverse"]
        assert listed[0]["at"] == _rfc(paused_at, listed[0]["at"])
        assert listed[4]["code"] == codes.display(codes.normalize(again))
        p = cli(eng.env, "audit", "--round", "R9")
        assert p.returncode == 2 and p.stderr.count("\n") == 1


def _rfc(ms: int, shown: str) -> str:
    assert parse_rfc3339(shown) == ms
    return shown


async def _venue_key(redis_url: str, venue: str) -> str:
    from engine import campaign as cmp
    from engine.config import Settings
    from engine.store import active_campaign
    client = aioredis.Redis.from_url(redis_url, decode_responses=True)
    try:
        c = await active_campaign(client)
        assert isinstance(c, cmp.Campaign)
        return await Store(client, c, Settings()).add_venue_key(venue)
    finally:
        await client.aclose()

"""Benchmark: archive 300,000 events and reconcile a 100,000-row claims file.

    .venv/bin/python loadtest/bench_reconcile.py [--events 300000] [--claims 100000]
                                                 [--direct] [--keep DIR]

By default the events go through a private redis-server (XADD as the Lua
scripts write them) and the real archiver; ``--direct`` writes them straight
into the ledger to time reconciliation alone. Prints one line per phase.
"""

from __future__ import annotations

import argparse
import asyncio
import random
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import redis  # noqa: E402
import redis.asyncio as aioredis  # noqa: E402

from engine import campaign as cmp  # noqa: E402
from engine import codes  # noqa: E402
from engine.campaign import Campaign, Round, Venue  # noqa: E402
from engine.ledger import (
    Ledger,  # noqa: E402
    archiver,  # noqa: E402
    reconcile,  # noqa: E402
)
from engine.store import keys  # noqa: E402
from engine.store.embedded import EmbeddedRedis  # noqa: E402

BASE_MS = 1_734_660_000_000  # 2024-12-20T10:00:00+08:00
VENUES = [f"V{i:02d}" for i in range(1, 11)]


def make_campaign(stock: int) -> Campaign:
    venues = tuple(Venue(v, f"场馆{v}", "ski", "吉林市") for v in VENUES)
    rnd = Round("R1", BASE_MS, BASE_MS + 12 * 3_600_000, 3, BASE_MS, BASE_MS + 60 * 86_400_000,
                {v: stock for v in VENUES})
    return Campaign("bench", "基准测试", "Asia/Shanghai", 10**12, 10_000, 100, 9_900, 3, venues,
                    (rnd,))


def make_events(n_events: int, n_claims: int, rng: random.Random
                ) -> tuple[list[dict[str, str]], list[str], list[str], list[str]]:
    """Grants (half of the events), redeems and voids; V01 gets enough
    redemptions for the claims file. Returns events, V01 redeemed, V01 not
    redeemed, and some codes of other venues."""
    n_grants = n_events // 2
    n_v01 = min(n_grants, int(n_claims * 1.05))
    events: list[dict[str, str]] = []
    redeemed_v01: list[str] = []
    issued_v01: list[str] = []
    later: list[dict[str, str]] = []
    other_venues: list[str] = []
    budget = n_events - n_grants
    for i in range(n_grants):
        v = "V01" if i < n_v01 else VENUES[1 + i % 9]
        code = codes.new_code()
        base = {"code": code, "round": "R1", "venue": v, "member": f"m{i}"}
        events.append({"type": "grant", **base, "at": str(BASE_MS + i)})
        if budget <= 0:
            if v == "V01":
                issued_v01.append(code)
            continue
        budget -= 1
        if (v == "V01" and i < n_claims) or (v != "V01" and i % 5 < 4):
            later.append({"type": "redeem", **base, "at": str(BASE_MS + 3_600_000 + i)})
            if v == "V01":
                redeemed_v01.append(code)
        else:
            later.append({"type": "void", **base, "at": str(BASE_MS + 60_000 + i),
                          "restocked": "1"})
            if v == "V01":
                issued_v01.append(code)  # void: claiming it is not_redeemed too
            else:
                other_venues.append(code)
    return events + later, redeemed_v01, issued_v01, other_venues


def write_claims(path: Path, n: int, redeemed: list[str], issued: list[str],
                 others: list[str], rng: random.Random) -> None:
    lines = ["code,redeemed_at,amount_fen,门店"]
    for i in range(n):
        r = rng.random()
        if r < 0.005 or not redeemed:
            code, amount = codes.new_code(), "10000"                     # unknown
        elif r < 0.01:
            code, amount = "NOT-A-CODE", "10000"                         # invalid
        elif r < 0.02:
            code, amount = rng.choice(redeemed), "10000"                 # duplicate
        elif r < 0.025 and issued:
            code, amount = rng.choice(issued), "10000"                   # not redeemed
        elif r < 0.03:
            code, amount = redeemed[i % len(redeemed)], "9000"           # amount mismatch
        elif r < 0.035 and others:
            code, amount = rng.choice(others), "10000"                   # wrong venue
        else:
            code, amount = redeemed[i % len(redeemed)], "10000"
        lines.append(f"{codes.display(code) if len(code) == 17 else code},"
                     f"2024-12-20T11:00:00+08:00,{amount},北大湖")
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")


async def via_redis(url: str, c: Campaign, events: list[dict[str, str]], ledger: Ledger) -> float:
    r = redis.Redis.from_url(url, decode_responses=True)
    k = keys.Keys(c.id)
    r.set(keys.ACTIVE, c.id)
    r.hset(k.campaign, "doc", cmp.to_json(c).decode())
    t = time.perf_counter()
    for i in range(0, len(events), 5000):
        p = r.pipeline(transaction=False)
        for e in events[i:i + 5000]:
            p.xadd(k.events, e)
        p.execute()
    print(f"xadd {len(events)} events: {time.perf_counter() - t:.2f} s")
    r.close()
    client = aioredis.Redis.from_url(url, decode_responses=True)
    t = time.perf_counter()
    n = await archiver.archive_once(client, ledger)
    took = time.perf_counter() - t
    await client.aclose()
    assert n == len(events), (n, len(events))
    return took


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--events", type=int, default=300_000)
    ap.add_argument("--claims", type=int, default=100_000)
    ap.add_argument("--direct", action="store_true", help="skip Redis, fill the ledger directly")
    ap.add_argument("--keep", type=Path, help="work in DIR and keep it")
    args = ap.parse_args()
    rng = random.Random(7)
    with tempfile.TemporaryDirectory() as tmp:
        work = args.keep or Path(tmp)
        work.mkdir(parents=True, exist_ok=True)
        c = make_campaign(args.events)
        events, redeemed, issued, others = make_events(args.events, args.claims, rng)
        claims = work / "claims.csv"
        write_claims(claims, args.claims, redeemed, issued, others, rng)
        ledger = Ledger(work / "ledger.sqlite3")
        if args.direct:
            ledger.save_campaign(c)
            t = time.perf_counter()
            batch = [(f"{BASE_MS + i}-0", e) for i, e in enumerate(events)]
            for i in range(0, len(batch), 1000):
                ledger.insert_events(c.id, batch[i:i + 1000])
            print(f"ledger insert {len(events)} events: {time.perf_counter() - t:.2f} s")
        else:
            server = EmbeddedRedis(work / "redis")
            server.start(extra={"appendfsync": "everysec"})  # benchmark data, not money
            try:
                took = asyncio.run(via_redis(server.url, c, events, ledger))
            finally:
                server.stop()
            print(f"archive {len(events)} events: {took:.2f} s"
                  f" ({len(events) / took:,.0f} events/s)")
        t = time.perf_counter()
        summary = reconcile.reconcile(ledger, "V01", claims, work / "out")
        took = time.perf_counter() - t
        print(f"reconcile {summary['claims']} claims against {len(events)} events:"
              f" {took:.2f} s")
        print(f"counts: {summary['counts']}")
        t = time.perf_counter()
        reconcile.statement(ledger, work / "out")
        print(f"statement: {time.perf_counter() - t:.2f} s")
        ledger.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())

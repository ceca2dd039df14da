"""Capacity run: how long a 34,000-coupon round takes to sell out on this machine.

    .venv/bin/python loadtest/capacity.py [--members 100000] [--stock 34000] [--venues 50]
                                          [--connections 64] [--workers 2] [--duration 20]
                                          [--stock-shards 1]

One engine (embedded Redis, appendfsync always), one open round; wrk sends POST grab,
each request from the next of `--members` distinct members (round-robin over the
venues); the engine's /metrics is polled every 0.2 s so the time at which the last
coupon went and the time at which every member had an answer are measured rather
than computed. docs/capacity.md extrapolates from these numbers to 1,000,000 members.
--stock-shards S loads the campaign with S stock shards (all on the one embedded Redis);
the run then also reports the stock transfers between shards (every credited transfer
stays in its receiving shard's xfer_in journal).
"""

from __future__ import annotations

import argparse
import json
import re
import shutil
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from datetime import UTC, datetime, timedelta
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench import WRK_GRAB, Engine, write_tokens  # noqa: E402
from support import campaign_toml  # noqa: E402

_GRAB = re.compile(r'^coupon_grab_requests_total\{([^}]*)\} ([0-9.e+]+)$', re.M)


def grab_counts(base: str) -> dict[str, float]:
    """Grab answers of R1 so far, by outcome, summed over workers."""
    with urllib.request.urlopen(base + "/metrics", timeout=2) as resp:
        text = resp.read().decode()
    out: dict[str, float] = {}
    for labels, value in _GRAB.findall(text):
        if 'round="R1"' in labels:
            m = re.search(r'outcome="([^"]+)"', labels)
            if m:
                out[m.group(1)] = out.get(m.group(1), 0.0) + float(value)
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--members", type=int, default=100_000)
    p.add_argument("--stock", type=int, default=34_000)
    p.add_argument("--venues", type=int, default=50)
    p.add_argument("--connections", type=int, default=64)
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--wrk-threads", type=int, default=2)
    p.add_argument("--duration", type=int, default=20)
    p.add_argument("--json", type=Path)
    p.add_argument("--stock-shards", type=int, default=1)
    a = p.parse_args(argv)

    venues = [f"V{i:02d}" for i in range(1, a.venues + 1)]
    per, extra = divmod(a.stock, a.venues)
    now = datetime.now(UTC)
    text = campaign_toml(cid="capacity", venues=venues, budget_fen=10**12, rounds=[
        {"id": "R1", "opens": now - timedelta(minutes=1), "closes": now + timedelta(hours=1),
         "quota": 1, "stock": {v: per + (1 if i < extra else 0) for i, v in enumerate(venues)}}])
    tmp = Path(tempfile.mkdtemp(prefix="coupon-capacity-"))
    engine = Engine(tmp, a.workers, text, cid="capacity", shards=a.stock_shards)
    transfers = None
    samples: list[tuple[float, dict[str, float]]] = []
    try:
        tokens = tmp / "tokens.txt"
        write_tokens(tokens, engine.member_secret, a.members)
        script = tmp / "grab.lua"
        script.write_text(WRK_GRAB)
        stop = threading.Event()

        def poll(t0: float) -> None:
            while not stop.is_set():
                try:
                    samples.append((time.monotonic() - t0, grab_counts(engine.base)))
                except OSError:
                    pass
                stop.wait(0.2)

        t0 = time.monotonic()
        poller = threading.Thread(target=poll, args=(t0,), daemon=True)
        poller.start()
        out = subprocess.run(
            ["wrk", f"-t{a.wrk_threads}", f"-c{a.connections}", f"-d{a.duration}s", "--timeout",
             "5s", "-s", str(script), f"{engine.base}/v1/rounds/R1/grab", "--", str(tokens),
             str(a.wrk_threads), "/v1/rounds/R1/grab", ",".join(venues), "0"],
            capture_output=True, text=True, timeout=a.duration + 60)
        stop.set()
        poller.join(5)
        m = re.search(r"^BENCH_RESULT (.*)$", out.stdout, re.M)
        wrk = json.loads(m.group(1)) if m else {"raw": out.stdout + out.stderr}
        stats = engine.stats()
        problems = engine.check()
        transfers = 0
        for s in range(a.stock_shards):
            with engine.redis(s) as r:
                transfers += int(r.hlen(engine.keys(s).xfer_in))
    finally:
        engine.stop()
        shutil.rmtree(tmp, ignore_errors=True)

    def first(pred: str) -> tuple[float, dict[str, float]] | None:
        for t, c in samples:
            if (pred == "sold" and c.get("granted", 0) >= a.stock) or \
               (pred == "all" and sum(c.values()) >= a.members):
                return t, c
        return None

    sold, answered = first("sold"), first("all")
    issued = stats["totals"]["issued"]
    # Sold-out answer rate: slope of all answers between the sell-out and the last sample.
    rate_after = None
    if sold and samples and samples[-1][0] > sold[0] + 1:
        t_end, c_end = samples[-1]
        rate_after = (sum(c_end.values()) - sum(sold[1].values())) / (t_end - sold[0])
    grant_rate = a.stock / sold[0] if sold else None
    result = {
        "members": a.members, "stock": a.stock, "venues": a.venues,
        "connections": a.connections, "workers": a.workers,
        "sold_out_after_s": round(sold[0], 2) if sold else None,
        "answers_at_sell_out": int(sum(sold[1].values())) if sold else None,
        "all_members_answered_after_s": round(answered[0], 2) if answered else None,
        "grant_rate_per_s": round(grant_rate) if grant_rate else None,
        "answer_rate_after_sell_out_per_s": round(rate_after) if rate_after else None,
        "issued": issued, "problems": problems, "stock_shards": a.stock_shards,
        "transfers": transfers,
        "wrk": wrk, "outcomes_at_end": samples[-1][1] if samples else {},
    }
    print(json.dumps(result, indent=1))
    if a.json:
        a.json.parent.mkdir(parents=True, exist_ok=True)
        a.json.write_text(json.dumps(result, indent=1))
    if problems or issued != a.stock:
        print(f"CHECK FAILED: issued {issued} of {a.stock}; {problems}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
